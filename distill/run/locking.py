"""One launch at a time per run dir: an OS file lock held for the whole launch by its main process.

The lock lives beside the run dir (`<output_dir>/.<name>.lock`), so `--restart` can delete the run
dir while holding it. It is an flock: the OS drops it when the holder exits, even by SIGKILL, so a
lock never goes stale locally; on a network filesystem Linux maps it to a POSIX lock the server holds
for the client. The file names the holder (host, PID, start time), which a refused launch reports.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def _holder(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 4096, 0).decode()
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"PID {holder['pid']} on host {holder['host']} (since {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another launch"


class RunDirLock:
    """The run dir's lock, taken by one process (the main one) for all the ranks of a launch."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), lock_path(Path(run_dir))
        self.descriptor: int | None = None

    def try_acquire(self) -> str | None:
        """Take the lock; None when taken, else the one-line reason it could not be."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            return f"cannot create the run dir's lock {self.path}: {error.strerror}"
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            return f"run dir {self.run_dir} is in use by {holder}; wait for that launch to end, or stop it"
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                          "started": time.time()}).encode(), 0)
        self.descriptor = descriptor
        return None

    def release(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing drops the lock
            self.descriptor = None
