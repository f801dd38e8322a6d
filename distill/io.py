"""Atomic writes: everything goes to a temporary name first and is renamed into place, so a crash
or a kill never leaves a half-written file where a finished one is expected. Also what a process
hands back to the system: its freed memory (`return_freed_memory`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from distill.errors import DistillError


# the temp names of every writer in a run dir: `.name.tmp<pid>` files (atomic_write), `.step_N.tmp`
# checkpoint dirs, and `.tmpXXXXXX`, where the safetensors library writes a file (also inside our own
# temp name, and in save_pretrained dirs) before it renames it
TEMP_PATTERN = re.compile(r"^\..+\.tmp\d*$|^\.tmp[A-Za-z0-9]{6}$")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete the temp files and dirs a killed writer left under `root` (call it only while no
    other process can be writing there, i.e. under the run dir's lock). Returns what was removed."""
    removed = []
    if not root.is_dir():
        return removed
    for directory, subdirs, files in os.walk(root):
        for name in [*files, *subdirs]:
            if TEMP_PATTERN.match(name):
                path = Path(directory) / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed.append(path)
        subdirs[:] = [name for name in subdirs if not TEMP_PATTERN.match(name)]
    return removed


# a write that fails with less than this free on its filesystem failed for want of space
FULL_DISK_BYTES = 1 << 20


def write_failure(error: BaseException, path: Path) -> BaseException:
    """The error to raise for a failed write to `path`: OSError(ENOSPC) when its filesystem is full
    (torch and safetensors report a full disk as RuntimeError or their own error types), else
    `error`. Call it before removing the half-written temp files, which free space again."""
    if isinstance(error, OSError):
        return error
    for code in (errno.ENOSPC, errno.EDQUOT):  # the safetensors library says so in words, after removing its temp
        if os.strerror(code) in str(error):
            return OSError(code, os.strerror(code), str(path))
    existing = next((parent for parent in [path, *path.parents] if parent.exists()), None)
    try:
        free = shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return error
    if free is not None and free < FULL_DISK_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return error


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)`, then rename the result to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(path)
    try:
        write(temp)
        os.replace(temp, path)
    except Exception as error:
        failure = write_failure(error, temp)
        if failure is not error:
            raise failure from error
        raise
    finally:
        if temp.exists():
            temp.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DistillError(f"missing file: {path}") from None
    except json.JSONDecodeError as error:
        raise DistillError(f"corrupt JSON file {path}: {error.msg} at line {error.lineno}") from None


def save_tensors(path: str | Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] | None = None) -> Path:
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    return atomic_write(path, lambda temp: save_file(contiguous, str(temp), metadata=metadata))


# safetensors' names of the dtypes distill writes
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}

TensorLayout = list[tuple[str, torch.dtype, tuple[int, ...]]]  # (name, dtype, shape) in file order


def stream_tensors(path: str | Path, layout: TensorLayout, tensors: Iterable[torch.Tensor],
                   metadata: Dict[str, str] | None = None) -> Path:
    """Write a safetensors file one tensor at a time: the header from `layout` first, then each of
    `tensors` (in the layout's order) as it comes, so only one of them need exist at once (the
    safetensors library writes from a dict of them all). Atomic, as every write here."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the library writes it

    def write(temp: Path) -> None:
        with open(temp, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            for (name, dtype, shape), tensor in zip(layout, tensors, strict=True):
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: a {tensor.dtype} tensor of shape {tuple(tensor.shape)} where the header "
                                     f"says {dtype} {tuple(shape)}")
                handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    return atomic_write(path, write)


def load_tensors(path: str | Path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"missing file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise DistillError(f"corrupt safetensors file {path}: {str(error).splitlines()[0]}") from None


def open_mapped(path: str | Path):
    """A safetensors file's handle, memory-mapped (tensors and slices are read as asked for, not the
    file whole) and kept open for the next reads; a file written anew since has another stamp, so it is
    opened afresh."""
    stat = os.stat(path)
    return _open_stamped(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _open_stamped(path: str, mtime_ns: int, size: int):
    return safe_open(path, framework="pt")


def replace_dir(source: Path, target: Path) -> None:
    """Move the finished directory `source` to `target`, replacing what was there only at the end."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    if old.exists():
        shutil.rmtree(old)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(data: Any) -> str:
    """A short stable hash of JSON-serialisable data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Giving freed memory back to the operating system.
# glibc's malloc serves allocations below its mmap threshold (which grows to 32 MB once large blocks
# are freed) from its heap, and keeps what is freed there for reuse rather than returning it. Loading
# a model frees a lot at once: the bool masks read from the student file before they are packed into
# bits, and under FSDP the whole loaded student once its shards are copied out. Without a trim, the
# process keeps that memory (0.75 GB after loading a 1B student) for the rest of the stage.


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def return_freed_memory() -> None:
    """Return the heap's free memory to the operating system (glibc's malloc_trim; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
