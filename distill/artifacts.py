"""What the stages leave in a run dir, in one place: the names, and typed readers and writers. A stage
writes through these and later stages read through them, so no stage imports another and no file
is parsed in two places.

    <run_dir>/teacher/DATA_FILE            TokenBlocks: training and held-out token blocks
    <run_dir>/teacher/CALIBRATION_FILE     per-projection input square sums (Wanda), plus "tokens"
    <run_dir>/teacher_logits/TOPK_FILE     the teacher's top-k at every training position (TopK)
    <run_dir>/prune/STUDENT_DIR            the one-shot student (distill.student's layout)
    <run_dir>/distill/STUDENT_DIR          the distilled student
    <run_dir>/distill/METRICS_FILE         the logged training rows, one JSON object per line
    <dir>/SPARSITY_FILE                    SparsitySpec, in every student dir and the packed export (masks,
                                           input thresholds, streaming heads)
    <run_dir>/<stage>/MANIFEST_FILE        what the stage ran on and its summary (distill.pipeline)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.config import Choice, Criterion
from distill.errors import DistillError
from distill.io import load_tensors, read_json, save_tensors, write_json, write_text
from distill.losses import TopK
from distill.sparsity.patterns import NM, Pattern

DATA_FILE = "data.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
TOPK_FILE = "teacher_topk.safetensors"
STUDENT_DIR = "student"
METRICS_FILE = "metrics.jsonl"
SPARSITY_FILE = "sparsity.json"
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


class Layout(Choice):
    MASKED = "masked"  # dense weights with zeros where pruned, plus bool masks (distill.student)
    # kept values and their positions in each group (distill.sparsity.packing); v2 adds the input
    # thresholds of activation sparsity to the spec, v1 dirs still load
    PACKED = "nm_packed.v2"
    PACKED_V1 = "nm_packed.v1"

    @property
    def packed(self) -> bool:
        return self in (Layout.PACKED, Layout.PACKED_V1)


# a packed dir's config.json names this quantization method, so that transformers loads it through
# distill.hf_quantizer once `import distill` has registered the method
QUANT_METHOD = "distill_nm_packed"


@dataclass(frozen=True)
class StreamingHeads:
    """Attention sparsity: the KV heads (per attention module name) that attend only to the first
    `sink` and the last `window` tokens."""

    sink: int
    window: int
    heads: dict[str, list[int]]

    def to_json(self) -> dict:
        return {"sink": self.sink, "window": self.window, "heads": {name: list(heads) for name, heads in self.heads.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "StreamingHeads":
        return cls(int(data["sink"]), int(data["window"]),
                   {str(name): [int(head) for head in heads] for name, heads in data["heads"].items()})

    def count(self) -> int:
        return sum(len(heads) for heads in self.heads.values())


@dataclass(frozen=True)
class SparsitySpec:
    """What a sparse model dir holds: its pattern, which projections carry masks, which were left
    dense and why, the criterion that chose the masks, how the weights are laid out, and the input
    threshold of every projection whose small inputs are zeroed (activation sparsity), and the
    streaming attention heads (attention sparsity)."""

    pattern: Pattern
    masked: list[str]
    layout: Layout = Layout.MASKED
    criterion: Criterion | None = None
    dense: dict[str, str] = field(default_factory=dict)
    input_thresholds: dict[str, float] = field(default_factory=dict)
    streaming: StreamingHeads | None = None

    VERSION = 3  # 2 added input_thresholds, 3 the streaming heads

    def to_json(self) -> dict:
        return {"schema": "distill.sparsity", "version": self.VERSION, "layout": self.layout.value,
                "pattern": self.pattern.to_spec(), "criterion": self.criterion.value if self.criterion else None,
                "masked": list(self.masked), "dense": dict(self.dense), "input_thresholds": dict(self.input_thresholds),
                "streaming": self.streaming.to_json() if self.streaming else None}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "SparsitySpec":
        """Today's schema, or version 1 (no version key: a student's spec, or a packed export's with
        its `format`)."""
        if not isinstance(data, dict) or not isinstance(data.get("masked"), list):
            raise DistillError(f"corrupt file {path}: expected a JSON object with a 'masked' list")
        version = data.get("version", 1)
        if version > cls.VERSION:
            raise DistillError(f"{path} has sparsity schema version {version}; this distill reads up to "
                               f"{cls.VERSION}: upgrade distill")
        try:
            if version == 1:
                pattern = Pattern.from_spec(data["pattern"]) if "pattern" in data else NM(data["n"], data["m"])
                layout = Layout.PACKED_V1 if "format" in data else Layout.MASKED
            else:
                pattern, layout = Pattern.from_spec(data["pattern"]), Layout(data["layout"])
            criterion = Criterion(data["criterion"]) if data.get("criterion") else None
            thresholds = {str(name): float(value) for name, value in (data.get("input_thresholds") or {}).items()}
            streaming = StreamingHeads.from_json(data["streaming"]) if data.get("streaming") else None
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise DistillError(f"corrupt file {path}: {type(error).__name__} {error}") from None
        return cls(pattern, list(data["masked"]), layout, criterion, dict(data.get("dense") or {}), thresholds, streaming)

    def replace(self, **changes) -> "SparsitySpec":
        return dataclasses.replace(self, **changes)


def write_sparsity_spec(directory: Path, spec: SparsitySpec) -> None:
    write_json(Path(directory) / SPARSITY_FILE, spec.to_json())


def read_sparsity_spec(directory: Path) -> SparsitySpec:
    path = Path(directory) / SPARSITY_FILE
    if not path.is_file():
        raise DistillError(f"{directory} holds no {SPARSITY_FILE}: not a sparse model dir")
    return SparsitySpec.from_json(read_json(path), path)
