"""Stamps of a stage's input files for its fingerprint: what the bytes are, not when they were written.

A stamp is {path, size, sha256}. Hashing a teacher's weights takes seconds per GB, so each file's
hash is kept in the run dir (`file_hashes.json`) under its size and modification time, and the file
is read again only when those change. A copy of the same bytes with a new mtime (a re-provisioned
data dir, a fresh checkout, a `touch`) then costs one read and still matches; a stamp of size and
mtime alone ran the stage that reads the file, and everything after it, again.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.io import sha256_file, write_json

CACHE_FILE = "file_hashes.json"


class FileStamps:
    """Content stamps of files, with the hashes cached in `run_dir` (written by `save`, by the main
    process only; every process computes the same stamps)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / CACHE_FILE
        self._known = self._load()  # {path: {"size", "mtime_ns", "sha256"}}
        self._changed = False

    def _load(self) -> dict:
        """The cached hashes; a missing or damaged cache is rebuilt by hashing again, never trusted."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {path: entry for path, entry in data.items() if isinstance(entry, dict)
                and isinstance(entry.get("size"), int) and isinstance(entry.get("mtime_ns"), int)
                and isinstance(entry.get("sha256"), str)}

    def stamp(self, path: str) -> dict:
        """{path, size, sha256} of the file at `path` (as the config names it), or {path, missing}."""
        file = Path(path)
        if not file.is_file():
            return {"path": path, "missing": True}
        stat = file.stat()
        known = self._known.get(path)
        if known is None or (known["size"], known["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
            known = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(file)}
            self._known[path] = known
            self._changed = True
        return {"path": path, "size": known["size"], "sha256": known["sha256"]}

    def save(self) -> None:
        """Write the hashes computed since the last save (when the run dir exists)."""
        if self._changed and self.path.parent.is_dir():
            write_json(self.path, self._known)
            self._changed = False
