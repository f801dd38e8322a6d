"""Choosing the masks of a model: which projections can take the pattern, scores from weights and
input statistics, masks from scores (per projection, over all layers, or across projections), the
channel permutation before N:M pruning, and how much of the decoder the masks cover. The prune stage
orchestrates these; benchmarks and tests call them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Sequence

import torch

from distill.sparsity.calibration import wanda_score
from distill.errors import DistillError
from distill.sparsity.patterns import Pattern, Unstructured, global_unstructured_masks
from distill.sparsity.permutation import gated_mlps, kept_score, nm_channel_permutation, permute_mlp_channels
from distill.sparsity.prune_config import Criterion, Incompatible, PatternKind, PruneConfig, Scope
from distill.sparsity.structured import structured_masks
from distill.targets import decoder_linears, matches, named_linears, unprunable_weights

GRADIENT_CRITERIA = (Criterion.TAYLOR, Criterion.FISHER)


def incompatible_projections(model: torch.nn.Module, prune: PruneConfig, targets: Sequence[str]) -> dict[str, str]:
    """{name: reason} for the target projections (`targets`, resolved by distill.targets.resolve_targets)
    that cannot take the pattern, and for matrix weights in the decoder layers that no nn.Linear holds;
    raises unless they may stay dense."""
    pattern = Pattern.from_config(prune)
    dense = {}
    for name, shape in unprunable_weights(model).items():
        reason = f"a {len(shape)}-D weight {list(shape)} outside any linear projection (e.g. fused experts)"
        if prune.incompatible is Incompatible.ERROR:
            raise DistillError(f"cannot prune {name}: {reason}, which distill does not prune yet (set "
                               f"prune.incompatible=dense to keep such weights dense, listed in the report)")
        dense[name] = reason
    for name, linear in named_linears(model, targets):
        reason = pattern.incompatible(tuple(linear.weight.shape))
        if reason:
            if prune.incompatible is Incompatible.ERROR:
                raise DistillError(f"cannot prune {name} to {pattern.describe()}: {reason} (set prune.incompatible=dense to keep it dense)")
            dense[name] = reason
    return dense


def masks_from_scores(model: torch.nn.Module, prune: PruneConfig, targets: Sequence[str],
                      scores: Mapping[str, torch.Tensor], dense: dict) -> dict:
    """{projection name: bool mask} from `scores` (a dict, or WeightScores, read one projection at a time)."""
    pattern = Pattern.from_config(prune)
    across = (isinstance(pattern, Unstructured) and pattern.scope is Scope.GLOBAL) or pattern.spans_projections
    chosen = {}
    for name, linear in named_linears(model, targets):
        if name in dense:
            continue
        if name not in scores:
            raise DistillError(f"no {prune.criterion} scores for {name}; rerun the teacher stage")
        score = scores[name].to(linear.weight.device)
        # a pattern within each projection takes its mask at once, so only one projection's scores exist
        chosen[name] = score if across else pattern.mask(score)
    if not chosen:
        raise DistillError(f"prune.targets {prune.targets} matched no projection that can be pruned")
    if not across:
        return chosen
    if pattern.spans_projections:
        return structured_masks(model, pattern.kind, chosen, pattern.sparsity)
    return global_unstructured_masks(chosen, pattern.sparsity)


class WeightScores(Mapping):
    """The scores of the criteria computed from weights (and the teacher stage's input statistics), by
    projection name, each computed when it is read: a model's scores are as large as its weights, so
    they are never all held at once unless a pattern across projections needs them."""

    def __init__(self, model: torch.nn.Module, prune: PruneConfig, targets: Sequence[str], statistics: dict[str, torch.Tensor]):
        self.criterion, self.statistics = prune.criterion, statistics
        self.linears = {name: linear for name, linear in named_linears(model, targets)
                        if prune.criterion is not Criterion.WANDA or name in statistics}

    def __getitem__(self, name: str) -> torch.Tensor:
        statistics = self.statistics[name] if self.criterion is Criterion.WANDA else None
        return wanda_score(self.linears[name].weight, statistics)

    def __iter__(self):
        return iter(self.linears)

    def __len__(self) -> int:
        return len(self.linears)


def weight_scores(model: torch.nn.Module, prune: PruneConfig, targets: Sequence[str],
                  statistics: dict[str, torch.Tensor]) -> WeightScores:
    """Scores of the criteria computed from weights (and the teacher stage's input statistics)."""
    return WeightScores(model, prune, targets, statistics)


def permute_mlp_channels_for_nm(model: torch.nn.Module, prune: PruneConfig, targets: Sequence[str],
                                statistics: dict[str, torch.Tensor], skip: set[str]) -> dict[str, float]:
    """Reorder each gated MLP's intermediate channels (in place, with down_proj's input statistics)
    so down_proj's N:M mask keeps more score; returns {mlp name: relative gain in kept score}."""
    targets = set(targets)
    gains = {}
    for name, mlp in gated_mlps(model):
        down = f"{name}.down_proj"
        if down not in targets or down in skip:
            continue
        score = wanda_score(mlp.down_proj.weight, statistics.get(down) if prune.criterion is not Criterion.MAGNITUDE else None)
        perm = nm_channel_permutation(score, prune.n, prune.m, prune.permute_sweeps)  # seed 0: prune is not fingerprinted by run.seed
        gains[name] = kept_score(score[:, perm], prune.n, prune.m) / kept_score(score, prune.n, prune.m) - 1
        permute_mlp_channels(mlp, perm)
        if down in statistics:
            statistics[down] = statistics[down][perm.to(statistics[down].device)]
    return gains


# a run that leaves more than this share of the decoder's linear weights dense, unasked, says so
DENSE_WARNING_FRACTION = 0.05


def pruning_coverage(model: torch.nn.Module, prune: PruneConfig, targets: Sequence[str], masks: dict,
                     dense: dict[str, str]) -> dict:
    """How much of the decoder the masks cover: every decoder weight matrix left dense, with why (the
    globs are matched only to say which of them left a projection out of `targets`)."""
    targets = set(targets)
    left, linears, weights, pruned_weights, unasked = {}, 0, 0, 0, 0
    for name, path, module in decoder_linears(model):
        linears += 1
        weights += module.weight.numel()
        if name in masks:
            pruned_weights += module.weight.numel()
            continue
        if prune.pattern is PatternKind.NONE:
            left[name] = "prune.pattern none"
        elif name not in targets:
            left[name] = "excluded by prune.exclude" if matches(name, path, prune.exclude) else "not among prune.targets"
        else:
            left[name] = dense.get(name, "no mask was chosen for it")
            unasked += module.weight.numel()
    for name, shape in unprunable_weights(model).items():  # kept dense only under prune.incompatible=dense
        weights += math.prod(shape)
        if prune.pattern is PatternKind.NONE:
            left[name] = "prune.pattern none"
            continue
        unasked += math.prod(shape)
        left[name] = dense.get(name, "outside any linear projection")
    return {"decoder_linears": linears, "pruned": len(masks), "pruned_weight_fraction": pruned_weights / max(weights, 1),
            "unasked_dense_fraction": unasked / max(weights, 1), "left_dense": left}
