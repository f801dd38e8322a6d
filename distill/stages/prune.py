"""Stage 2, prune: the student is the teacher with its target projections replaced by masked ones.

Masks follow a pattern (distill.sparsity.patterns: N:M, block, channel, unstructured) and rank weights by a
criterion:
  magnitude: |W_ij|
  wanda:     |W_ij| * ||X_j||_2, X the teacher's inputs to that projection on calibration text
             (Sun et al., 2023); the statistics come from the teacher stage
  taylor, fisher: gradient saliencies on calibration text (distill.sparsity.criteria), ranks sharing batches
  sparsegpt: layer-by-layer pruning with second-order weight updates (distill.sparsity.criteria); runs on
             the main process (it is sequential over layers)
A projection whose input size is not a multiple of M is refused or left dense (prune.incompatible).
With prune.pattern none no weight is pruned: the student is the teacher with the activation or
attention sparsity below.
With attention.streaming_fraction > 0, that fraction of the student's KV heads is chosen to stream
(sink + window only): by the attention mass those heads already keep (select=mass), or by gates
trained against the teacher (select=distill, DuoAttention); see distill.sparsity.head_selection. Then,
with activations.target > 0, input thresholds are calibrated on the student as it now runs.
With prune.permute, the intermediate channels of every gated MLP are first reordered so that
down_proj's N:M groups keep more of the Wanda (or, for magnitude, |W|) score (distill.sparsity.permutation);
the model computes the same function, and every criterion then runs on the reordered model.
"""

from __future__ import annotations

import torch

from distill.run.artifacts import STUDENT_DIR, PruneRecord, read_calibration, read_token_blocks, write_prune_record
from distill.sparsity.spec import SparsitySpec
from distill.sparsity.calibration import calibration_blocks
from distill.errors import DistillError
from distill.models import load_teacher
from distill.run.pipeline import StageContext
from distill.sparsity.pruning import (DENSE_WARNING_FRACTION, GRADIENT_CRITERIA, incompatible_projections, masks_from_scores,
                             permute_mlp_channels_for_nm, pruning_coverage, weight_scores)
from distill.sparsity.activations import calibrate_thresholds, install_thresholds
from distill.sparsity.attention import install_heads
from distill.sparsity.attention_config import HeadSelection
from distill.sparsity.head_selection import choose_streaming, head_statistics
from distill.sparsity.criteria import gradient_saliency, sparsegpt_masks
from distill.sparsity.masks import install_masks, sparsity_report
from distill.sparsity.patterns import Pattern
from distill.sparsity.prune_config import Criterion, PatternKind
from distill.student import save_student
from distill.targets import resolve_targets
from distill.train.head_gates import train_gates


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    prune = config.prune
    pruned = prune.pattern is not PatternKind.NONE
    on_all_ranks = pruned and prune.criterion in GRADIENT_CRITERIA
    if not (on_all_ranks or accelerator.is_main_process):
        return {}
    device = accelerator.device if on_all_ranks else torch.device("cpu")
    model = load_teacher(config.teacher, device).float()
    # every step below, and later stages, use this list (none under prune.pattern none)
    targets = resolve_targets(model, prune.targets, prune.exclude) if pruned else []
    dense = incompatible_projections(model, prune, targets) if pruned else {}
    calibration = calibration_blocks(read_token_blocks(ctx.stage_dir("teacher")).train, config.calibration.num_blocks)
    statistics = read_calibration(ctx.stage_dir("teacher"))
    gains = {}
    if prune.permute:
        gains = permute_mlp_channels_for_nm(model, prune, targets, statistics, set(dense))
        if not gains:
            raise DistillError("config key 'prune.permute': no gated MLP (gate_proj, up_proj, down_proj) with down_proj "
                               "among prune.targets to permute")
        ctx.log(f"[prune] MLP channels permuted in {len(gains)} layers: down_proj keeps "
                f"{100 * sum(gains.values()) / len(gains):+.2f}% score under {prune.n}:{prune.m} on average")
    if not pruned:
        masks = {}
    elif prune.criterion is Criterion.SPARSEGPT:
        masks = sparsegpt_masks(model, calibration, targets, prune.n, prune.m, skip=set(dense))
    else:
        if on_all_ranks:
            scores = gradient_saliency(model, calibration, targets, accelerator, prune.criterion)
        else:
            scores = weight_scores(model, prune, targets, statistics)
        if not accelerator.is_main_process:
            return {}
        masks = masks_from_scores(model, prune, targets, scores, dense)
    model = model.cpu()
    install_masks(model, masks)
    coverage = pruning_coverage(model, prune, targets, masks, dense)
    ctx.log(f"[prune] {coverage['pruned']} of {coverage['decoder_linears']} decoder linear projections pruned, "
            f"{coverage['pruned_weight_fraction']:.1%} of the decoder's linear weights")
    if pruned:
        for name, reason in coverage["left_dense"].items():
            ctx.log(f"[prune] {name} stays dense: {reason}")
    if coverage["unasked_dense_fraction"] > DENSE_WARNING_FRACTION:
        ctx.log(f"[prune] warning: {coverage['unasked_dense_fraction']:.1%} of the decoder's linear weights stay dense "
                f"without prune.targets or prune.exclude asking for it (see the lines above)")
    pattern = Pattern.from_config(prune)
    streaming = None
    if config.attention.enabled:
        try:
            streaming = _choose_streaming_heads(ctx, model, calibration)
        except ValueError as error:  # an architecture the registered attention function cannot run
            raise DistillError(f"config key 'attention.streaming_fraction': {error}") from None
    allocation = _install_activation_thresholds(ctx, model, calibration) if config.activations.enabled else {}
    criterion = prune.criterion if pruned else None  # none: nothing was scored
    save_student(model, ctx.work_dir / STUDENT_DIR, SparsitySpec(pattern, list(masks), criterion=criterion,
                                                                 dense=dense, input_allocation=allocation))
    sparsity = sparsity_report(model)
    ctx.log(f"[prune] {prune.criterion} {pattern.describe()} masks on {len(masks)} projections" if pruned
            else "[prune] prune.pattern none: no weight pruned")
    record = PruneRecord(targets, dense, coverage, sum(sparsity.values()) / max(len(sparsity), 1), gains, streaming)
    write_prune_record(ctx.work_dir, record)
    return {"masked": len(masks), "targets": len(targets), "dense": dense, "mean_sparsity": record.mean_sparsity}


def _choose_streaming_heads(ctx: StageContext, model: torch.nn.Module, calibration: torch.Tensor) -> dict:
    """Install streaming heads on the one-shot student (attention.*); what chose them, for the record."""
    attention, accelerator = ctx.config.attention, ctx.accelerator
    if attention.select is HeadSelection.DISTILL:
        teacher = load_teacher(ctx.config.teacher, accelerator.device)
        learned = train_gates(model.to(accelerator.device), teacher, calibration, attention, accelerator,
                              ctx.config.run.seed)
        model.cpu()
        del teacher
        scores, history = learned.gates, learned.history
        chosen = choose_streaming(scores, attention.streaming_fraction, stream_highest=False)
        ctx.log(f"[prune] head gates trained {attention.gate_steps} steps: KL {history[0]['kl']:.4f} -> "
                f"{history[-1]['kl']:.4f}, mean gate {history[-1]['mean_gate']:.3f}")
    else:
        statistics = head_statistics(model, calibration[:attention.measure_blocks], attention.sink, attention.window)
        scores, history = {name: values["local_mass"] for name, values in statistics.items()}, []
        chosen = choose_streaming(scores, attention.streaming_fraction, stream_highest=True)
    install_heads(model, chosen, attention.sink, attention.window)
    count = sum(len(heads) for heads in chosen.values())
    ctx.log(f"[prune] {count} of {sum(len(values) for values in scores.values())} KV heads stream "
            f"(sink {attention.sink} + window {attention.window}, chosen by {attention.select})")
    return {"select": attention.select.value, "scores": scores, "heads": chosen, "gate_history": history}


def _install_activation_thresholds(ctx: StageContext, model: torch.nn.Module, calibration: torch.Tensor) -> dict[str, float]:
    """Thresholds of the one-shot student's own projection inputs (activations.*), installed on it;
    the fraction of each input they zero (distill re-calibrates to it)."""
    activations = ctx.config.activations
    calibrated = calibrate_thresholds(model, calibration, activations, ctx.config.calibration.batch_size)
    install_thresholds(model, calibrated.groups, calibrated.thresholds)
    ctx.log(f"[prune] activation thresholds on {len(calibrated.groups)} projection inputs: {activations.target:.0%} of "
            f"them zeroed ({activations.allocation} allocation, calibrated on the one-shot student)")
    return calibrated.sparsity

