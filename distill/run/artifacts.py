"""What the stages leave in a run dir, in one place: the names, and typed readers and writers. A stage
writes through these and later stages read through them, so no stage imports another and no file
is parsed in two places.

    <run_dir>/teacher/DATA_FILE            TokenBlocks: training and held-out token blocks
    <run_dir>/teacher/CALIBRATION_FILE     per-projection input square sums (Wanda), plus "tokens"
    <run_dir>/teacher_logits/TOPK_FILE     the teacher's top-k at every training position (TopK)
    <run_dir>/prune/STUDENT_DIR            the one-shot student (distill.student's layout)
    <run_dir>/distill/STUDENT_DIR          the distilled student
    <run_dir>/distill/METRICS_FILE         the logged training rows, one JSON object per line
    <dir>/SPARSITY_FILE                    SparsitySpec (distill.sparsity.spec), in every student dir
                                           and the packed export (masks, input thresholds, streaming heads)
    <run_dir>/<stage>/MANIFEST_FILE        what the stage ran on and its summary (distill.run.pipeline)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.errors import DistillError
from distill.io import load_tensors, read_json, save_tensors, write_text
from distill.losses import TopK

DATA_FILE = "data.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
TOPK_FILE = "teacher_topk.safetensors"
STUDENT_DIR = "student"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"


def read_summary(stage_dir: Path) -> dict:
    """The summary a finished stage returned, from its manifest."""
    path = Path(stage_dir) / MANIFEST_FILE
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("summary"), dict):
        raise DistillError(f"corrupt file {path}: no summary")
    return manifest["summary"]


@dataclass
class TokenBlocks:
    """Token blocks [count, block_size]: the training blocks and each source's held-out blocks."""

    train: torch.Tensor
    heldout: dict[str, torch.Tensor] = field(default_factory=dict)

    def heldout_sets(self) -> dict[str, torch.Tensor]:
        """The sources that hold any held-out blocks, by name."""
        return {name: blocks for name, blocks in sorted(self.heldout.items()) if len(blocks)}

    def all_heldout(self) -> torch.Tensor | None:
        """Every held-out block of every source, in source-name order (None when there are none)."""
        sets = list(self.heldout_sets().values())
        return torch.cat(sets) if sets else None


def write_token_blocks(directory: Path, blocks: TokenBlocks) -> None:
    tensors = {"train": blocks.train.to(torch.int32)}
    tensors.update({f"heldout.{name}": part.to(torch.int32) for name, part in blocks.heldout.items()})
    save_tensors(Path(directory) / DATA_FILE, tensors)


def read_token_blocks(directory: Path) -> TokenBlocks:
    tensors = load_tensors(Path(directory) / DATA_FILE)
    if "train" not in tensors:
        raise DistillError(f"corrupt file {Path(directory) / DATA_FILE}: no training blocks")
    return TokenBlocks(tensors["train"].long(), {key.removeprefix("heldout."): value.long()
                                                 for key, value in tensors.items() if key.startswith("heldout.")})


def write_calibration(directory: Path, square_sums: dict[str, torch.Tensor]) -> None:
    save_tensors(Path(directory) / CALIBRATION_FILE, square_sums)


def read_calibration(directory: Path) -> dict[str, torch.Tensor]:
    """{projection name: sum of x_j^2 over the calibration tokens} plus "tokens"."""
    return load_tensors(Path(directory) / CALIBRATION_FILE)


def write_teacher_topk(directory: Path, cached: TopK) -> None:
    save_tensors(Path(directory) / TOPK_FILE, {"logp": cached.logp, "index": cached.index})


def read_teacher_topk(directory: Path, blocks_shape: tuple[int, int], k: int) -> TopK:
    """The cached top-k, refused in one line unless it covers `blocks_shape` training blocks at `k`."""
    path = Path(directory) / TOPK_FILE
    tensors = load_tensors(path)
    cached = TopK(tensors["logp"], tensors["index"])
    if tuple(cached.logp.shape[:2]) != tuple(blocks_shape) or cached.logp.shape[-1] != k:
        raise DistillError(f"{path} holds {tuple(cached.logp.shape)} for {tuple(blocks_shape)} training blocks "
                           f"at k={k}; rerun the stage")
    return cached


def write_metrics(directory: Path, rows: list[dict]) -> None:
    write_text(Path(directory) / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def read_metrics(directory: Path) -> list[dict]:
    """The logged training rows (none when nothing was logged yet)."""
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
