"""Stage 2, prune: the student is the teacher with its target projections replaced by masked ones.

Masks follow a pattern (distill.patterns: N:M, block, channel, unstructured) and rank weights by a
criterion:
  magnitude: |W_ij|
  wanda:     |W_ij| * ||X_j||_2, X the teacher's inputs to that projection on calibration text
             (Sun et al., 2023); the statistics come from the teacher stage
  taylor, fisher: gradient saliencies on calibration text (distill.criteria), ranks sharing batches
  sparsegpt: layer-by-layer pruning with second-order weight updates (distill.criteria); runs on
             the main process (it is sequential over layers)
A projection whose input size is not a multiple of M is refused or left dense (prune.incompatible).
With prune.permute, the intermediate channels of every gated MLP are first reordered so that
down_proj's N:M groups keep more of the Wanda (or, for magnitude, |W|) score (distill.permutation);
the model computes the same function, and every criterion then runs on the reordered model.
"""

from __future__ import annotations

import math

import torch

from distill.config import PruneConfig
from distill.calibration import calibration_blocks, wanda_score
from distill.criteria import gradient_saliency, sparsegpt_masks
from distill.errors import DistillError
from distill.io import load_tensors
from distill.models import load_teacher
from distill.patterns import SPANNING, Pattern, global_unstructured_masks
from distill.permutation import gated_mlps, kept_score, nm_channel_permutation, permute_mlp_channels
from distill.pipeline import StageContext
from distill.sparsity import install_masks, sparsity_report
from distill.targets import decoder_linears, matches, target_linears, unprunable_weights
from distill.artifacts import CALIBRATION_FILE, DATA_FILE, STUDENT_DIR
from distill.structured import structured_masks
from distill.student import save_student

GRADIENT_CRITERIA = ("taylor", "fisher")


def incompatible_projections(model: torch.nn.Module, prune: PruneConfig) -> dict[str, str]:
    """{name: reason} for target projections that cannot take the pattern, and for matrix weights in
    the decoder layers that no nn.Linear holds; raises unless they may stay dense."""
    pattern = Pattern.from_config(prune)
    dense = {}
    for name, shape in unprunable_weights(model).items():
        reason = f"a {len(shape)}-D weight {list(shape)} outside any linear projection (e.g. fused experts)"
        if prune.incompatible == "error":
            raise DistillError(f"cannot prune {name}: {reason}, which distill does not prune yet (set "
                               f"prune.incompatible=dense to keep such weights dense, listed in the report)")
        dense[name] = reason
    for name, linear in target_linears(model, prune.targets, prune.exclude):
        reason = pattern.incompatible(tuple(linear.weight.shape))
        if reason:
            if prune.incompatible == "error":
                raise DistillError(f"cannot prune {name} to {pattern.describe()}: {reason} (set prune.incompatible=dense to keep it dense)")
            dense[name] = reason
    return dense


def masks_from_scores(model: torch.nn.Module, prune: PruneConfig, scores: dict[str, torch.Tensor], dense: dict) -> dict:
    pattern = Pattern.from_config(prune)
    chosen = {}
    for name, linear in target_linears(model, prune.targets, prune.exclude):
        if name in dense:
            continue
        if name not in scores:
            raise DistillError(f"no {prune.criterion} scores for {name}; rerun the teacher stage")
        chosen[name] = scores[name].to(linear.weight.device)
    if not chosen:
        raise DistillError(f"prune.targets {prune.targets} matched no projection that can be pruned")
    if pattern.kind == "unstructured" and pattern.scope == "global":
        return global_unstructured_masks(chosen, pattern.sparsity)
    if pattern.kind in SPANNING:
        return structured_masks(model, pattern.kind, chosen, pattern.sparsity)
    return {name: pattern.mask(score) for name, score in chosen.items()}


def weight_scores(model: torch.nn.Module, prune: PruneConfig, statistics: dict[str, torch.Tensor]) -> dict:
    """Scores of the criteria computed from weights (and the teacher stage's input statistics)."""
    scores = {}
    for name, linear in target_linears(model, prune.targets, prune.exclude):
        if prune.criterion == "wanda" and name not in statistics:
            continue
        scores[name] = wanda_score(linear.weight, statistics[name] if prune.criterion == "wanda" else None)
    return scores


def permute_mlp_channels_for_nm(model: torch.nn.Module, prune: PruneConfig, statistics: dict[str, torch.Tensor],
                                skip: set[str]) -> dict[str, float]:
    """Reorder each gated MLP's intermediate channels (in place, with down_proj's input statistics)
    so down_proj's N:M mask keeps more score; returns {mlp name: relative gain in kept score}."""
    targets = dict(target_linears(model, prune.targets, prune.exclude))
    gains = {}
    for name, mlp in gated_mlps(model):
        down = f"{name}.down_proj"
        if down not in targets or down in skip:
            continue
        score = wanda_score(mlp.down_proj.weight, statistics.get(down) if prune.criterion != "magnitude" else None)
        perm = nm_channel_permutation(score, prune.n, prune.m, prune.permute_sweeps)  # seed 0: prune is not fingerprinted by run.seed
        gains[name] = kept_score(score[:, perm], prune.n, prune.m) / kept_score(score, prune.n, prune.m) - 1
        permute_mlp_channels(mlp, perm)
        if down in statistics:
            statistics[down] = statistics[down][perm.to(statistics[down].device)]
    return gains


# a run that leaves more than this share of the decoder's linear weights dense, unasked, says so
DENSE_WARNING_FRACTION = 0.05


def pruning_coverage(model: torch.nn.Module, prune: PruneConfig, masks: dict, dense: dict[str, str]) -> dict:
    """How much of the decoder the masks cover: every decoder weight matrix left dense, with why."""
    left, linears, weights, pruned_weights, unasked = {}, 0, 0, 0, 0
    for name, path, module in decoder_linears(model):
        linears += 1
        weights += module.weight.numel()
        if name in masks:
            pruned_weights += module.weight.numel()
            continue
        if matches(name, path, prune.exclude):
            left[name] = "excluded by prune.exclude"
        elif not matches(name, path, prune.targets):
            left[name] = "not among prune.targets"
        else:
            left[name] = dense.get(name, "no mask was chosen for it")
            unasked += module.weight.numel()
    for name, shape in unprunable_weights(model).items():  # kept dense only under prune.incompatible=dense
        weights += math.prod(shape)
        unasked += math.prod(shape)
        left[name] = dense.get(name, "outside any linear projection")
    return {"decoder_linears": linears, "pruned": len(masks), "pruned_weight_fraction": pruned_weights / max(weights, 1),
            "unasked_dense_fraction": unasked / max(weights, 1), "left_dense": left}


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    prune = config.prune
    on_all_ranks = prune.criterion in GRADIENT_CRITERIA
    if not (on_all_ranks or accelerator.is_main_process):
        return {}
    device = accelerator.device if on_all_ranks else torch.device("cpu")
    model = load_teacher(config.teacher, device).float()
    dense = incompatible_projections(model, prune)
    calibration = calibration_blocks(load_tensors(ctx.stage_dir("teacher") / DATA_FILE)["train"].long(),
                                      config.calibration.num_blocks)
    statistics = load_tensors(ctx.stage_dir("teacher") / CALIBRATION_FILE)
    gains = {}
    if prune.permute:
        gains = permute_mlp_channels_for_nm(model, prune, statistics, set(dense))
        if not gains:
            raise DistillError("config key 'prune.permute': no gated MLP (gate_proj, up_proj, down_proj) with down_proj "
                               "among prune.targets to permute")
        ctx.log(f"[prune] MLP channels permuted in {len(gains)} layers: down_proj keeps "
                f"{100 * sum(gains.values()) / len(gains):+.2f}% score under {prune.n}:{prune.m} on average")
    if prune.criterion == "sparsegpt":
        masks = sparsegpt_masks(model, calibration, prune.targets, prune.n, prune.m, skip=set(dense), exclude=prune.exclude)
    else:
        if on_all_ranks:
            scores = gradient_saliency(model, calibration, prune.targets, accelerator, prune.criterion, exclude=prune.exclude)
        else:
            scores = weight_scores(model, prune, statistics)
        if not accelerator.is_main_process:
            return {}
        masks = masks_from_scores(model, prune, scores, dense)
    model = model.cpu()
    install_masks(model, masks)
    coverage = pruning_coverage(model, prune, masks, dense)
    ctx.log(f"[prune] {coverage['pruned']} of {coverage['decoder_linears']} decoder linear projections pruned, "
            f"{coverage['pruned_weight_fraction']:.1%} of the decoder's linear weights")
    for name, reason in coverage["left_dense"].items():
        ctx.log(f"[prune] {name} stays dense: {reason}")
    if coverage["unasked_dense_fraction"] > DENSE_WARNING_FRACTION:
        ctx.log(f"[prune] warning: {coverage['unasked_dense_fraction']:.1%} of the decoder's linear weights stay dense "
                f"without prune.targets or prune.exclude asking for it (see the lines above)")
    pattern = Pattern.from_config(prune)
    spec = {"n": prune.n, "m": prune.m, "pattern": pattern.to_spec(), "criterion": prune.criterion, "dense": dense}
    save_student(model, ctx.work_dir / STUDENT_DIR, spec)
    sparsity = sparsity_report(model)
    ctx.log(f"[prune] {prune.criterion} {pattern.describe()} masks on {len(masks)} projections")
    summary = {"masked": len(masks), "dense": dense, "mean_sparsity": sum(sparsity.values()) / len(sparsity),
               "coverage": coverage}
    if gains:
        summary["permutation_gain"] = gains
    return summary
