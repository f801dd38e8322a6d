"""The sparsity spec: what a sparse model dir holds (its pattern, which projections carry masks, the
input thresholds of activation sparsity, the streaming heads of attention sparsity) and how its
weights are laid out, as `sparsity.json` in every student dir and packed export."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.io import read_json, write_json
from distill.sections import Choice
from distill.sparsity.patterns import Pattern
from distill.sparsity.prune_config import Criterion

SPARSITY_FILE = "sparsity.json"


class Layout(Choice):
    MASKED = "masked"  # dense weights with zeros where pruned, plus bool masks (distill.student)
    PACKED = "nm_packed.v2"  # kept values and their positions in each group (distill.sparsity.packing)
    DENSE = "dense"  # a Hugging Face model dir, zeros where pruned or removed channels cut out (export/hf)

    @property
    def packed(self) -> bool:
        return self is Layout.PACKED


# a packed dir's config.json names this quantization method, so that transformers loads it through
# distill.export.hf_quantizer once `import distill` has registered the method
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
    threshold of every projection whose small inputs are zeroed (activation sparsity) with the
    allocation they were calibrated to, and the streaming attention heads (attention sparsity)."""

    pattern: Pattern
    masked: list[str]
    layout: Layout = Layout.MASKED
    criterion: Criterion | None = None
    dense: dict[str, str] = field(default_factory=dict)
    input_thresholds: dict[str, float] = field(default_factory=dict)
    streaming: StreamingHeads | None = None
    # {input (its first projection's name): the fraction of its entries the thresholds zero}: what a
    # re-calibration of the thresholds aims at again (version 4 added it)
    input_allocation: dict[str, float] = field(default_factory=dict)

    VERSION = 4  # the schema this distill writes and reads; a dir of another is refused, never upgraded

    def to_json(self) -> dict:
        return {"schema": "distill.sparsity", "version": self.VERSION, "layout": self.layout.value,
                "pattern": self.pattern.to_spec(), "criterion": self.criterion.value if self.criterion else None,
                "masked": list(self.masked), "dense": dict(self.dense), "input_thresholds": dict(self.input_thresholds),
                "input_allocation": dict(self.input_allocation),
                "streaming": self.streaming.to_json() if self.streaming else None}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "SparsitySpec":
        """The spec written by `to_json`; another schema version is refused in one line naming both."""
        if not isinstance(data, dict) or not isinstance(data.get("masked"), list):
            raise DistillError(f"corrupt file {path}: expected a JSON object with a 'masked' list")
        version = data.get("version", 1)  # the first schema had no version key
        if version != cls.VERSION:
            raise DistillError(f"{path} has sparsity schema version {version} and this distill reads version "
                               f"{cls.VERSION}: export the student again with this distill, or load it with the "
                               f"distill that wrote it")
        try:
            pattern, layout = Pattern.from_spec(data["pattern"]), Layout(data["layout"])
            criterion = Criterion(data["criterion"]) if data.get("criterion") else None
            thresholds = {str(name): float(value) for name, value in (data.get("input_thresholds") or {}).items()}
            allocation = {str(name): float(value) for name, value in (data.get("input_allocation") or {}).items()}
            streaming = StreamingHeads.from_json(data["streaming"]) if data.get("streaming") else None
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise DistillError(f"corrupt file {path}: {type(error).__name__} {error}") from None
        return cls(pattern, list(data["masked"]), layout, criterion, dict(data.get("dense") or {}), thresholds, streaming,
                   allocation)

    def replace(self, **changes) -> "SparsitySpec":
        return dataclasses.replace(self, **changes)


def write_sparsity_spec(directory: Path, spec: SparsitySpec) -> None:
    write_json(Path(directory) / SPARSITY_FILE, spec.to_json())


def read_sparsity_spec(directory: Path) -> SparsitySpec:
    path = Path(directory) / SPARSITY_FILE
    if not path.is_file():
        raise DistillError(f"{directory} holds no {SPARSITY_FILE}: not a sparse model dir")
    return SparsitySpec.from_json(read_json(path), path)
