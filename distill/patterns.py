"""Sparsity patterns: which weights a mask may remove together.

  nm            N of every M consecutive input weights kept (2:4 is what GPU sparse kernels run)
  block         whole b x b tiles removed, the lowest-scoring `sparsity` fraction of tiles per layer
  channel       whole input columns or output rows removed, the lowest-scoring fraction per layer
  unstructured  any weights, the lowest-scoring fraction per layer or over all layers at once
  mlp_channels  whole intermediate channels of gated MLPs, across gate/up/down (distill.structured)
  heads         whole attention head groups, across q/k/v/o (distill.structured)

Only 2:4 goes to the sparse runtime; mlp_channels and heads export as smaller dense models
(export.shrink), the other patterns as dense-with-zeros models, and the report says which.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from distill.config import PruneConfig
from distill.sparsity import nm_mask
from distill.structured import structure_violations

SPANNING = ("mlp_channels", "heads")  # patterns whose groups span several projections


@dataclass(frozen=True)
class Pattern:
    kind: str = "nm"
    n: int = 2
    m: int = 4
    sparsity: float = 0.5
    block: int = 4
    axis: str = "input"  # channel: input (columns) or output (rows)
    scope: str = "layer"  # unstructured: layer or global

    @classmethod
    def from_config(cls, prune: PruneConfig) -> "Pattern":
        return cls(prune.pattern, prune.n, prune.m, prune.sparsity, prune.block, prune.channel_axis, prune.scope)

    @classmethod
    def from_spec(cls, spec: dict) -> "Pattern":
        return cls(**spec["pattern"]) if "pattern" in spec else cls(n=spec["n"], m=spec["m"])

    def to_spec(self) -> dict:
        return asdict(self)

    @property
    def accelerated(self) -> bool:
        """Whether a sparse kernel of the runtime runs this pattern."""
        return self.kind == "nm" and (self.n, self.m) == (2, 4)

    def describe(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"{self.block}x{self.block} blocks, {self.sparsity:.0%} removed"
        if self.kind == "channel":
            return f"{self.axis} channels, {self.sparsity:.0%} removed"
        if self.kind == "mlp_channels":
            return f"MLP channels, {self.sparsity:.0%} removed"
        if self.kind == "heads":
            return f"attention head groups, {self.sparsity:.0%} removed"
        return f"unstructured ({self.scope}), {self.sparsity:.0%} removed"

    def incompatible(self, shape: tuple[int, int]) -> str | None:
        """Why a weight of this shape cannot take the pattern, or None."""
        rows, cols = shape
        if self.kind == "nm" and cols % self.m:
            return f"input size {cols} is not a multiple of {self.m}"
        if self.kind == "block" and (rows % self.block or cols % self.block):
            return f"shape {rows}x{cols} is not a multiple of the {self.block}x{self.block} block"
        return None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """The bool mask (True = kept) of one layer from its weight scores."""
        if self.kind in SPANNING:
            raise ValueError(f"{self.kind} masks span several projections: use distill.structured.structured_masks")
        rows, cols = scores.shape
        if self.kind == "nm":
            return nm_mask(scores, self.n, self.m)
        if self.kind == "block":
            b = self.block
            tiles = scores.reshape(rows // b, b, cols // b, b).sum((1, 3))
            kept = _keep_top(tiles, self.sparsity)
            return kept.repeat_interleave(b, 0).repeat_interleave(b, 1)
        if self.kind == "channel":
            dim = 0 if self.axis == "input" else 1  # summing over rows scores each input column
            kept = _keep_top(scores.sum(dim), self.sparsity)
            return kept[None, :].expand(rows, cols).clone() if self.axis == "input" else kept[:, None].expand(rows, cols).clone()
        return _keep_top(scores, self.sparsity)

    def violations(self, mask: torch.Tensor) -> int:
        """How many groups, tiles, channels of `mask` break the pattern (0: it holds)."""
        if self.kind in SPANNING:
            return structure_violations(mask)
        rows, cols = mask.shape
        if self.kind == "nm":
            return int((mask.reshape(rows, cols // self.m, self.m).sum(-1) > self.n).sum())
        if self.kind == "block":
            b = self.block
            kept = mask.reshape(rows // b, b, cols // b, b).sum((1, 3))
            return int(((kept != 0) & (kept != b * b)).sum())
        if self.kind == "channel":
            kept = mask.sum(0 if self.axis == "input" else 1)
            full = rows if self.axis == "input" else cols
            return int(((kept != 0) & (kept != full)).sum())
        return 0


def group_norms(pattern: Pattern, weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every group the pattern removes together (|w| for unstructured): group lasso
    sums these to push whole groups to zero. The norm's gradient at zero is zero, not NaN."""
    rows, cols = weight.shape
    if pattern.kind == "nm":
        return torch.linalg.vector_norm(weight.reshape(rows, cols // pattern.m, pattern.m), dim=-1)
    if pattern.kind == "block":
        b = pattern.block
        return torch.linalg.vector_norm(weight.reshape(rows // b, b, cols // b, b), dim=(1, 3))
    if pattern.kind == "channel":
        return torch.linalg.vector_norm(weight, dim=0 if pattern.axis == "input" else 1)
    return weight.abs()


def group_dropout_mask(pattern: Pattern, shape: tuple[int, int], rate: float, device=None) -> torch.Tensor:
    """A bool mask that drops each of the pattern's groups with probability `rate` (structured dropout)."""
    rows, cols = shape
    if pattern.kind == "nm":
        keep = torch.rand(rows, cols // pattern.m, 1, device=device) >= rate
        return keep.expand(rows, cols // pattern.m, pattern.m).reshape(rows, cols)
    if pattern.kind == "block":
        b = pattern.block
        keep = torch.rand(rows // b, cols // b, device=device) >= rate
        return keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
    if pattern.kind == "channel":
        if pattern.axis == "input":
            return (torch.rand(1, cols, device=device) >= rate).expand(rows, cols)
        return (torch.rand(rows, 1, device=device) >= rate).expand(rows, cols)
    return torch.rand(rows, cols, device=device) >= rate


def _keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
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
