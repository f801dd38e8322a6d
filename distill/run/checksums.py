"""Checksums of what distill writes, so that a flipped byte or a truncated file is found and named
before anything reads it, never used.

A finished stage's manifest lists every file of its dir with its size and sha256 (`digest_tree`);
every checkpoint dir holds the same list for itself in CHECKSUMS_FILE. Whoever reads a stage dir or
a checkpoint asks `damage` first. It compares every file's size before it hashes any, so a
truncated file costs a stat to find. Files whose reader checks every part it reads (the teacher
cache's shards: a checksum per block) are listed by size alone (`checked_by_reader`): hashing a
cache of billions of tokens at every launch would cost more than the training step it guards.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Collection

from distill.io import sha256_file

CHECKSUMS_FILE = "checksums.json"  # inside a checkpoint dir


def digest_tree(directory: Path, skip: Collection[str] = (), checked_by_reader: Collection[str] = ()) -> dict[str, dict]:
    """{path relative to `directory`: {"size", "sha256"}} for every file under it, except those that
    match a pattern of `skip` (fnmatch, on the relative path); those matching `checked_by_reader` get
    {"size", "checked_by_reader": true} (module docstring)."""
    directory = Path(directory)
    digests = {}
    for path in sorted(path for path in directory.rglob("*") if path.is_file()):
        name = path.relative_to(directory).as_posix()
        if any(fnmatch(name, pattern) for pattern in skip):
            continue
        if any(fnmatch(name, pattern) for pattern in checked_by_reader):
            digests[name] = {"size": path.stat().st_size, "checked_by_reader": True}
        else:
            digests[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return digests


def _well_formed(recorded) -> bool:
    return isinstance(recorded, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("size"), int)
        and (isinstance(entry.get("sha256"), str) or entry.get("checked_by_reader") is True)
        for entry in recorded.values())


def damage(directory: Path, recorded, what: str) -> str | None:
    """What is wrong with the files of `directory` against the `recorded` digest_tree (the first
    problem, naming the file and `what` recorded it), or None when every file is as written."""
    directory = Path(directory)
    if recorded is None:
        return f"{what} records no checksums (an older distill wrote it)"
    if not _well_formed(recorded):
        return f"the checksums in {what} are unreadable"
    for name, entry in recorded.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} is {size} bytes where {what} recorded {entry['size']} (truncated or overwritten)"
    for name, entry in recorded.items():
        if "sha256" in entry and sha256_file(directory / name) != entry["sha256"]:
            return f"{directory / name} does not match the sha256 {what} recorded (its bytes changed)"
    return None
