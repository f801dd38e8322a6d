"""The weight-pruning section of the config (`prune`): which criterion scores the weights, which
pattern a mask follows, which projections are pruned. The prune stage reads it through
distill.sparsity.pruning, patterns and criteria."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from distill.errors import DistillError
from distill.sections import Choice, Section, positive, within


class Criterion(Choice):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"
    TAYLOR = "taylor"
    FISHER = "fisher"


class PatternKind(Choice):
    NM = "nm"
    BLOCK = "block"
    CHANNEL = "channel"
    UNSTRUCTURED = "unstructured"
    MLP_CHANNELS = "mlp_channels"
    HEADS = "heads"
    NONE = "none"  # no weight pruned: the sparsity is activations.target's or attention.streaming_fraction's alone


class ChannelAxis(Choice):
    INPUT = "input"
    OUTPUT = "output"


class Scope(Choice):
    LAYER = "layer"
    GLOBAL = "global"


class Incompatible(Choice):
    ERROR = "error"
    DENSE = "dense"


@dataclass
class PruneConfig(Section):
    KEY = "prune"

    criterion: Criterion = Criterion.WANDA  # how weights are scored
    # only 2:4 (nm, n=2, m=4) runs on sparse kernels; mlp_channels and heads remove whole channels /
    # head groups across their projections
    pattern: PatternKind = PatternKind.NM
    n: int = 2  # nm: keep n weights ...
    m: int = 4  # ... in every group of m consecutive input weights
    sparsity: float = 0.5  # block, channel, unstructured, mlp_channels, heads: fraction removed per layer
    block: int = 4  # block: b x b tiles
    channel_axis: ChannelAxis = ChannelAxis.INPUT  # channel: remove input columns or output rows
    scope: Scope = Scope.LAYER  # unstructured: the fraction per layer, or over all layers at once (global)
    # which decoder projections to prune (distill.targets): names or globs matched against a
    # projection's last name (q_proj), its path in the layer (mlp.*) or its full name; "*" is every
    # linear projection inside the decoder layers. `exclude` removes from that set.
    targets: List[str] = field(default_factory=lambda: ["*"])
    exclude: List[str] = field(default_factory=list)  # names or globs of projections left dense
    incompatible: Incompatible = Incompatible.ERROR  # a target whose input size is not a multiple of m
    # nm: reorder each gated MLP's intermediate channels (function unchanged) so down_proj's groups keep
    # more score, by `permute_sweeps` sweeps of pairwise group exchanges (distill.sparsity.permutation)
    permute: bool = False
    permute_sweeps: int = 100  # permute: passes of the channel-swap search

    def check(self, where: str) -> None:
        for key in ("m", "n", "block", "permute_sweeps"):
            positive(f"{where}.{key}", getattr(self, key))
        if self.n >= self.m:
            raise DistillError(f"config key '{where}.n': N:M sparsity needs N < M, got {self.n}:{self.m}")
        within(f"{where}.sparsity", self.sparsity, 0.0, 1.0, "()")
        if self.permute and self.pattern is not PatternKind.NM:
            raise DistillError(f"config key '{where}.permute': channel permutation serves N:M patterns, not '{self.pattern}'")
        if self.criterion is Criterion.SPARSEGPT and self.pattern is not PatternKind.NM:
            raise DistillError(f"config key '{where}.criterion': sparsegpt prunes N:M patterns only, not '{self.pattern}'")
        if self.scope is Scope.GLOBAL and (self.pattern is not PatternKind.UNSTRUCTURED or self.criterion is Criterion.MAGNITUDE):
            raise DistillError(f"config key '{where}.scope': global needs pattern unstructured and a criterion whose "
                               "scores compare across layers (wanda, taylor, fisher)")
        if not self.targets:
            raise DistillError(f"config key '{where}.targets': name at least one projection to prune (\"*\" for all)")
