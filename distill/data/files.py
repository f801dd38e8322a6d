"""The data files a config names, checked before any work: present, and a text file neither empty nor
binary."""

from __future__ import annotations

from pathlib import Path

from distill.config import Config
from distill.errors import DistillError


def check_input_paths(config: Config) -> None:
    """Fail before any work when a named input file is missing, or a text file is empty or binary."""
    named = [(f"data.sources[{index}].files", path) for index, source in enumerate(config.data.sources)
             for path in source.files] + [("eval.files", path) for path in config.eval.files]
    for key, path in named:
        if not Path(path).is_file():
            raise DistillError(f"config key '{key}': file not found: {path}")
        if Path(path).suffix in (".txt", ".text"):
            try:
                check_text_file(Path(path))
            except DistillError as error:
                raise DistillError(f"config key '{key}': {error}") from None


def check_text_file(path: Path, prefix_bytes: int = 1 << 20) -> None:
    """Refuse, in one line, a text file that is empty or not UTF-8 text (judged on its first MiB;
    a later bad byte is reported by the reader)."""
    with open(path, "rb") as handle:
        head = handle.read(prefix_bytes)
    if not head.strip():
        raise DistillError(f"data file {path} holds no text (it is empty or only whitespace)")
    if b"\0" in head:
        offset = head.index(b"\0")
        raise DistillError(f"data file {path} is binary, not text (a NUL byte at offset {offset})")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not merely a character cut at the end of the prefix
            raise DistillError(f"data file {path} is not UTF-8 text (byte offset {error.start})") from None

