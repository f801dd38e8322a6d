"""Checkpoints of the distill stage: accelerate `save_state` dirs (model with masks, optimizer,
scheduler, RNG, data position; under train.sharding=fsdp the sharded model and optimizer beside
them), written under a temporary name and renamed when complete, with a `latest.json` pointer
written last, so a kill at any moment leaves the previous checkpoint whole and named. Each holds the
checksums of its files (distill.run.checksums): a checkpoint whose bytes changed is passed over for the
previous one, as an unreadable one is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from distill.run.checksums import CHECKSUMS_FILE, damage, digest_tree
from distill.errors import DistillError
from distill.io import read_json, write_failure, write_json
from distill.train.sharding import ShardedCheckpoint

CHECKPOINTS = "checkpoints"  # inside the stage's work dir
SHARDED_DIR = "sharded"  # inside a checkpoint: the sharded model and optimizer (train.sharding=fsdp)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    data = read_json(pointer)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "/" in data["name"]:
        raise DistillError(f"corrupt checkpoint pointer {pointer}: expected {{\"name\": \"step_...\"}}")
    path = root / data["name"]
    if not path.is_dir():
        raise DistillError(f"checkpoint pointer {pointer} names {path.name}, which does not exist")
    return path


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int,
                    sharded: ShardedCheckpoint | None = None) -> None:
    name = f"step_{step:08d}"
    temp = root / f".{name}.tmp"
    if accelerator.is_main_process and temp.exists():
        shutil.rmtree(temp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temp), safe_serialization=True)
        if sharded is not None:
            sharded.save(temp / SHARDED_DIR)
    except Exception as error:  # a full disk or a lost permission: drop the half-written copy, keep the older ones
        failure = write_failure(error, temp)  # before the removal frees space again
        shutil.rmtree(temp, ignore_errors=True)
        if failure is not error:
            raise failure from error
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # every process's files are written now; resume checks them before it loads any
        write_json(temp / CHECKSUMS_FILE, digest_tree(temp))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        write_json(root / "latest.json", {"name": name, "step": step})
        finished = sorted(path for path in root.glob("step_*") if path.is_dir())
        for old in finished[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, path: Path, sharded: ShardedCheckpoint | None = None) -> None:
    checksums = path / CHECKSUMS_FILE
    problem = damage(path, read_json(checksums) if checksums.is_file() else None, f"its {CHECKSUMS_FILE}")
    if problem:
        raise DistillError(f"checkpoint {path} is damaged: {problem}")
    try:
        accelerator.load_state(str(path))
        if sharded is not None:
            sharded.load(path / SHARDED_DIR)
    except Exception as error:  # a truncated or foreign checkpoint fails in many ways
        raise DistillError(f"checkpoint {path} could not be loaded ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None


def _candidates(root: Path) -> list[Path]:
    """Finished checkpoints, newest first: the one `latest.json` names, then the others by step."""
    found = sorted((path for path in root.glob("step_*") if path.is_dir()), reverse=True)
    try:
        latest = latest_checkpoint(root)
    except DistillError:  # a pointer to a deleted checkpoint: the dirs themselves still tell
        latest = None
    return ([latest] if latest is not None else []) + [path for path in found if path != latest]


def resume(accelerator: Accelerator, root: Path, sharded: ShardedCheckpoint | None = None,
           log: Callable[[str], None] = print) -> Path | None:
    """Load the newest checkpoint every process can read, saying so when it is not the latest;
    None when there is none. Refuses in one line, keeping the files, when none is readable."""
    unreadable = []
    for path in _candidates(root):
        try:
            load_checkpoint(accelerator, path, sharded)
            loaded = 1.0
        except DistillError as error:
            unreadable.append(str(error))
            loaded = 0.0
        # every process must resume from the same checkpoint, also when one of them could not read it
        agreed = accelerator.reduce(torch.tensor(loaded, device=accelerator.device), "sum")
        if float(agreed) == accelerator.num_processes:
            if unreadable:
                log(f"[distill] {unreadable[0]}; resuming from the older {path.name} instead")
            return path
        if loaded and not unreadable:
            unreadable.append(f"checkpoint {path} could not be loaded by every process")
    if unreadable:
        stage = root.parent.name.removesuffix(".partial")
        raise DistillError(f"{unreadable[0]}, and no older checkpoint is readable; the files are kept: delete "
                           f"{root.parent} (or rerun with --discard-partial {stage}) to start the stage over")
    return None
