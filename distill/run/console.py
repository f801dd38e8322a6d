"""What a launch prints: the project's own lines and progress bars. A few libraries warn about things
distill does on purpose; those warnings are dropped by their message, on the logger that emits
them, so anything else those libraries say still shows. `--verbose` keeps everything.

The filters live on the libraries' loggers for the life of the process: logging is process-wide by
design, and the entry point (pipelines/run.py) is the one caller.
"""

from __future__ import annotations

import logging
import os
import re

# (logger name, start of the message): why distill does what the message warns about
EXPECTED_WARNINGS = [
    # the student's output head shares the embedding's weights (tied); a checkpoint stores the tensor
    # once and the load ties them again
    ("accelerate.utils.other", "Removed shared tensor"),
    # zero-shot accuracy scores the models the evaluate stage already holds, in one process
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
]


class _DropExpected(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        # accelerate's loggers put "[RANK n] " before the message
        return not re.sub(r"^\[RANK \d+\] ", "", str(record.msg)).startswith(self.prefixes)


def quiet_expected_warnings() -> None:
    """Drop EXPECTED_WARNINGS, and the datasets library's "Generating ... split" bars of the local
    lm-eval tasks (their tokens are counted in the report already)."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix in EXPECTED_WARNINGS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logging.getLogger(name).addFilter(_DropExpected(prefixes))
    # read by the datasets library when it loads (it need not be loaded yet, nor at all)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
