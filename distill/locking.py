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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from distill.errors import DistillError


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


@contextmanager
def run_dir_lock(run_dir: Path, hold: bool = True) -> Iterator[None]:
    """Hold the run dir's lock for the `with` block (when `hold`; the main process holds it for all
    ranks); refuse in one line, naming the holder, when another launch holds it."""
    if not hold:
        yield
        return
    path = lock_path(Path(run_dir))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise DistillError(f"cannot create the run dir's lock {path}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DistillError(f"run dir {run_dir} is in use by {_holder(descriptor)}; wait for that launch "
                               f"to end, or stop it") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                          "started": time.time()}).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # closing drops the lock
