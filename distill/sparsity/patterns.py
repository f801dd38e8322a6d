"""Sparsity patterns: which weights a mask may remove together, one class per pattern.

  NM            N of every M consecutive input weights kept (2:4 is what GPU sparse kernels run)
  Blocks        whole b x b tiles removed, the lowest-scoring `sparsity` fraction of tiles per layer
  Channels      whole input columns or output rows removed, the lowest-scoring fraction per layer
  Unstructured  any weights, the lowest-scoring fraction per layer or over all layers at once
  MLPChannels   whole intermediate channels of gated MLPs, across gate/up/down (distill.sparsity.structured)
  HeadGroups    whole attention head groups, across q/k/v/o (distill.sparsity.structured)
  NoPruning     no weight removed (prune.pattern none: activation or attention sparsity alone)

Each answers the same questions about one projection's weight: its mask from scores, how many of
its groups a mask breaks, the norm of every group (group lasso), and a random mask of whole groups
(group dropout). Only 2:4 goes to the sparse runtime; MLPChannels and HeadGroups export as smaller
dense models (export.shrink), the other patterns as dense-with-zeros models, and the report says which.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from distill.sparsity.masks import nm_mask
from distill.sparsity.prune_config import ChannelAxis, PatternKind, PruneConfig, Scope
from distill.sparsity.structured import structure_violations


@dataclass(frozen=True)
class Pattern:
    """The base: a pattern whose group is a single weight (subclasses widen the group)."""

    kind: ClassVar[PatternKind]
    spans_projections: ClassVar[bool] = False  # groups reach across several projections

    @staticmethod
    def from_config(prune: PruneConfig) -> "Pattern":
        fields = {"n": prune.n, "m": prune.m, "block": prune.block, "sparsity": prune.sparsity,
                  "axis": prune.channel_axis, "scope": prune.scope}
        return _build(prune.pattern, fields)

    @staticmethod
    def from_spec(spec: dict) -> "Pattern":
        """From `to_spec`'s dict (keys of other patterns, as older files carry, are ignored)."""
        return _build(PatternKind(spec["kind"]), spec)

    def to_spec(self) -> dict:
        return {"kind": self.kind.value, **{key: getattr(value, "value", value)
                                            for key, value in dataclasses.asdict(self).items()}}

    @property
    def accelerated(self) -> bool:
        """Whether a sparse kernel of the runtime runs this pattern."""
        return False

    def describe(self) -> str:
        raise NotImplementedError

    def incompatible(self, shape: tuple[int, int]) -> str | None:
        """Why a weight of this shape cannot take the pattern, or None."""
        return None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """The bool mask (True = kept) of one projection from its weight scores."""
        raise NotImplementedError

    def violations(self, mask: torch.Tensor) -> int:
        """How many groups of `mask` break the pattern (0: it holds)."""
        return 0

    def group_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """The L2 norm of every group the pattern removes together: group lasso sums these to push
        whole groups to zero. The norm's gradient at zero is zero, not NaN."""
        return weight.abs()

    def dropout_mask(self, shape: tuple[int, int], rate: float, device=None) -> torch.Tensor:
        """A bool mask that drops each of the pattern's groups with probability `rate`."""
        return torch.rand(shape, device=device) >= rate


@dataclass(frozen=True)
class NM(Pattern):
    n: int = 2
    m: int = 4
    kind: ClassVar[PatternKind] = PatternKind.NM

    @property
    def accelerated(self) -> bool:
        return (self.n, self.m) == (2, 4)

    def describe(self) -> str:
        return f"{self.n}:{self.m}"

    def incompatible(self, shape: tuple[int, int]) -> str | None:
        return f"input size {shape[1]} is not a multiple of {self.m}" if shape[1] % self.m else None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return nm_mask(scores, self.n, self.m)

    def violations(self, mask: torch.Tensor) -> int:
        rows, cols = mask.shape
        return int((mask.reshape(rows, cols // self.m, self.m).sum(-1) > self.n).sum())

    def group_norms(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        return torch.linalg.vector_norm(weight.reshape(rows, cols // self.m, self.m), dim=-1)

    def dropout_mask(self, shape: tuple[int, int], rate: float, device=None) -> torch.Tensor:
        rows, cols = shape
        keep = torch.rand(rows, cols // self.m, 1, device=device) >= rate
        return keep.expand(rows, cols // self.m, self.m).reshape(rows, cols)


@dataclass(frozen=True)
class Blocks(Pattern):
    block: int = 4
    sparsity: float = 0.5
    kind: ClassVar[PatternKind] = PatternKind.BLOCK

    def describe(self) -> str:
        return f"{self.block}x{self.block} blocks, {self.sparsity:.0%} removed"

    def incompatible(self, shape: tuple[int, int]) -> str | None:
        rows, cols = shape
        if rows % self.block or cols % self.block:
            return f"shape {rows}x{cols} is not a multiple of the {self.block}x{self.block} block"
        return None

    def _tiles(self, tensor: torch.Tensor) -> torch.Tensor:
        rows, cols = tensor.shape
        return tensor.reshape(rows // self.block, self.block, cols // self.block, self.block)

    def _spread(self, tiles: torch.Tensor) -> torch.Tensor:
        return tiles.repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return self._spread(keep_top(self._tiles(scores).sum((1, 3)), self.sparsity))

    def violations(self, mask: torch.Tensor) -> int:
        kept = self._tiles(mask).sum((1, 3))
        return int(((kept != 0) & (kept != self.block ** 2)).sum())

    def group_norms(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(self._tiles(weight), dim=(1, 3))

    def dropout_mask(self, shape: tuple[int, int], rate: float, device=None) -> torch.Tensor:
        rows, cols = shape
        return self._spread(torch.rand(rows // self.block, cols // self.block, device=device) >= rate)


@dataclass(frozen=True)
class Channels(Pattern):
    axis: ChannelAxis = ChannelAxis.INPUT  # input: whole columns; output: whole rows
    sparsity: float = 0.5
    kind: ClassVar[PatternKind] = PatternKind.CHANNEL

    @property
    def _dim(self) -> int:
        """The dimension summed over to get one value per channel."""
        return 0 if self.axis is ChannelAxis.INPUT else 1

    def _spread(self, channels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return channels.unsqueeze(self._dim).expand(shape)

    def describe(self) -> str:
        return f"{self.axis} channels, {self.sparsity:.0%} removed"

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return self._spread(keep_top(scores.sum(self._dim), self.sparsity), tuple(scores.shape)).clone()

    def violations(self, mask: torch.Tensor) -> int:
        kept = mask.sum(self._dim)
        return int(((kept != 0) & (kept != mask.shape[self._dim])).sum())

    def group_norms(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight, dim=self._dim)

    def dropout_mask(self, shape: tuple[int, int], rate: float, device=None) -> torch.Tensor:
        return self._spread(torch.rand(shape[1 - self._dim], device=device) >= rate, shape)


@dataclass(frozen=True)
class Unstructured(Pattern):
    sparsity: float = 0.5
    scope: Scope = Scope.LAYER  # layer: the fraction per projection; global: over all at once
    kind: ClassVar[PatternKind] = PatternKind.UNSTRUCTURED

    def describe(self) -> str:
        return f"unstructured ({self.scope}), {self.sparsity:.0%} removed"

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return keep_top(scores, self.sparsity)


@dataclass(frozen=True)
class _Spanning(Pattern):
    """Groups across several projections: masks come from distill.sparsity.structured."""

    sparsity: float = 0.5
    spans_projections: ClassVar[bool] = True

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.kind} masks span several projections: use distill.sparsity.structured.structured_masks")

    def violations(self, mask: torch.Tensor) -> int:
        return structure_violations(mask)

    def group_norms(self, weight: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.kind} groups span several projections; group lasso needs a per-projection pattern")

    def dropout_mask(self, shape: tuple[int, int], rate: float, device=None) -> torch.Tensor:
        raise ValueError(f"{self.kind} groups span several projections; group dropout needs a per-projection pattern")


@dataclass(frozen=True)
class MLPChannels(_Spanning):
    kind: ClassVar[PatternKind] = PatternKind.MLP_CHANNELS

    def describe(self) -> str:
        return f"MLP channels, {self.sparsity:.0%} removed"


@dataclass(frozen=True)
class HeadGroups(_Spanning):
    kind: ClassVar[PatternKind] = PatternKind.HEADS

    def describe(self) -> str:
        return f"attention head groups, {self.sparsity:.0%} removed"


@dataclass(frozen=True)
class NoPruning(Pattern):
    """prune.pattern none: every weight kept; the prune stage chooses no mask."""

    kind: ClassVar[PatternKind] = PatternKind.NONE

    def describe(self) -> str:
        return "dense weights"

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(scores, dtype=torch.bool)


PATTERNS: dict[PatternKind, type[Pattern]] = {cls.kind: cls for cls in (NM, Blocks, Channels, Unstructured,
                                                                       MLPChannels, HeadGroups, NoPruning)}


def _build(kind: PatternKind, values: dict) -> Pattern:
    """The pattern class of `kind` with its own fields taken from `values` (choices typed)."""
    cls = PATTERNS[PatternKind(kind)]
    fields = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    if "axis" in fields:
        fields["axis"] = ChannelAxis(fields["axis"])
    if "scope" in fields:
        fields["scope"] = Scope(fields["scope"])
    return cls(**fields)


def keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the highest-scoring (1 - sparsity) fraction of entries."""
    flat = scores.flatten()
    removed = int(round(flat.numel() * sparsity))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if removed:
        keep[flat.topk(removed, largest=False).indices] = False
    return keep.reshape(scores.shape)


def global_unstructured_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Remove the lowest-scoring `sparsity` fraction of all weights of all layers together (scores
    must be comparable across layers, e.g. Wanda's or the gradient saliencies)."""
    flat = torch.cat([score.flatten().float() for score in scores.values()])
    removed = int(round(flat.numel() * sparsity))
    if removed == 0:
        return {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
    threshold = flat.kthvalue(removed).values
    return {name: score.float() > threshold for name, score in scores.items()}
