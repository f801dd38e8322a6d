"""Stage 3, distill: train the masked student against the frozen teacher under accelerate.

Setup, loop, finish. The global batch of every optimizer step is fixed by the config and by the step
number alone (distill.train.step.BlockSchedule), then split over processes and accumulation
micro-steps, so one process and N processes see the same data and follow the same loss curve, and a
resumed run continues exactly where the checkpoint left off (distill.train.checkpoints). The step itself is
distill.train.step.DistillStep; what it optimizes, the student with its loss, is distill.train.objective;
how the masks behave is distill.sparsity.modes.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from distill.run.artifacts import (STUDENT_DIR, DistillRecord, read_calibration, read_metrics, read_teacher_cache, read_token_blocks,
                                   write_distill_record, write_metrics)
from distill.sparsity.spec import SparsitySpec, read_sparsity_spec
from distill.train.checkpoints import CHECKPOINTS, latest_checkpoint, resume, save_checkpoint
from distill.sparsity.calibration import calibration_blocks
from distill.config import NonFinite, Sharding
from distill.data.corpus import to_device
from distill.data.teacher_cache import TeacherCache
from distill.errors import DistillError
from distill.eval.scoring import evaluating, heldout_scores, log_probs
from distill.io import return_freed_memory
from distill.losses import IDENTITY, logit_transform
from distill.models import load_teacher
from distill.train.objective import DistillationObjective, cached_teacher_outputs, teacher_outputs
from distill.run.pipeline import StageContext
from distill.train.sharding import ShardedCheckpoint, shard_objective, shard_teacher
from distill.sparsity.activations import (install_thresholds, ramp_scale, ramped, recalibrate_thresholds, set_thresholds,
                                          thresholded)
from distill.sparsity.masks_config import MaskMode
from distill.sparsity.modes import FixedMasks, add_group_dropout, mask_upkeep, revive_pruned_weights
from distill.sparsity.prune_config import Criterion
from distill.student import load_student, nonfinite_problem, save_student
from distill.targets import decoder_layers
from distill.train.throughput import flops_per_token, measured_peak_flops
from distill.run.tracking import log_row, resend_rows
from distill.train.step import (BlockSchedule, DistillStep, MicroBatch, accumulation_steps, build_optimizer, speed_up,
                              window_means)


@dataclass
class Training:
    """What the loop works with, built by `_setup`."""

    student: nn.Module
    teacher: nn.Module | None
    objective: nn.Module  # prepared (DDP) or sharded (FSDP)
    step: DistillStep
    masks: FixedMasks
    schedule: BlockSchedule
    blocks: torch.Tensor
    heldout: torch.Tensor | None
    heldout_teacher_logp: torch.Tensor | None  # the teacher's log-probs of the held-out blocks, on the CPU
    cached: TeacherCache | None  # the teacher_logits stage's, read a batch of blocks at a time
    teacher_transform: object
    spec: SparsitySpec
    sharded_checkpoint: ShardedCheckpoint | None
    step_flops: float
    calibration: torch.Tensor  # blocks the activation thresholds are re-calibrated on
    history: list[dict] = field(default_factory=list)


def run(ctx: StageContext) -> dict:
    training = _setup(ctx)
    _resume(ctx, training)
    _loop(ctx, training)
    return _finish(ctx, training)


def _load_inputs(ctx: StageContext):
    """(training blocks, held-out blocks or None, cached teacher top-k or None, teacher or None)."""
    config, accelerator, train = ctx.config, ctx.accelerator, ctx.config.train
    data = read_token_blocks(ctx.stage_dir("teacher"))
    heldout = data.all_heldout() if train.eval_every else None
    if heldout is not None:
        heldout = heldout[:train.eval_blocks]
    cached = None
    if train.loss.teacher_topk and train.loss.kd_weight:
        cached = read_teacher_cache(ctx.stage_dir("teacher_logits"), tuple(data.train.shape), train.loss.teacher_topk)
        ctx.log(f"[distill] teacher from the cache of its top-{train.loss.teacher_topk} tokens; the teacher is not loaded")
    needs_teacher = (train.loss.kd_weight > 0 and cached is None) or train.loss.hidden_weight > 0
    teacher = load_teacher(config.teacher, accelerator.device) if needs_teacher else None
    return data.train, heldout, cached, teacher


def _mask_modes(ctx: StageContext, student: nn.Module, teacher: nn.Module | None, spec: SparsitySpec) -> FixedMasks:
    """The masks' behaviour during training (train.masks), plus group dropout."""
    config, train = ctx.config, ctx.config.train
    square_sums = None
    if train.masks.mode is MaskMode.DYNAMIC and spec.criterion is not Criterion.MAGNITUDE:
        square_sums = read_calibration(ctx.stage_dir("teacher"))  # re-chosen by Wanda's score, as pruned
    masks = mask_upkeep(train.masks, student, spec.pattern, square_sums)
    if train.masks.mode is not MaskMode.FIXED:
        # moving masks start from the teacher's dense values, put in once their rules (which read
        # the pruned weights, unlike a FixedMask) are in place
        source = teacher if teacher is not None else load_teacher(config.teacher, ctx.accelerator.device)
        revive_pruned_weights(student, source)
        del source
    if train.group_dropout:
        add_group_dropout(student, spec.pattern, train.group_dropout)
    return masks


def _setup(ctx: StageContext) -> Training:
    config, accelerator, train = ctx.config, ctx.accelerator, ctx.config.train
    accumulation = accumulation_steps(train, accelerator.num_processes)
    blocks, heldout, cached, teacher = _load_inputs(ctx)
    spec = read_sparsity_spec(ctx.stage_dir("prune") / STUDENT_DIR)
    student = load_student(ctx.stage_dir("prune") / STUDENT_DIR, accelerator.device).train()
    # the prune stage's, calibrated on the one-shot student; a ramp starts from none zeroed (a threshold
    # of 0 keeps every entry) until its first re-calibration. A resumed run's come from its checkpoint.
    thresholds = dict.fromkeys(spec.input_thresholds, 0.0) if config.activations.ramp_steps else spec.input_thresholds
    set_thresholds(student, thresholds, config.activations.straight_through)
    step_flops = flops_per_token(student, teacher, context=blocks.shape[1])
    # the chunked loss applies each head itself: what the head does after its projection, probed
    # before compile and sharding
    chunked = train.loss.chunk_tokens > 0
    student_transform = logit_transform(student) if chunked else IDENTITY
    teacher_transform = logit_transform(teacher) if chunked and teacher is not None else IDENTITY
    speed_up(student, config.speed, training=True)
    if teacher is not None:
        speed_up(teacher, config.speed, training=False)
    masks = _mask_modes(ctx, student, teacher, spec)
    heldout_teacher_logp = _heldout_teacher_logp(ctx, teacher, heldout)
    objective = DistillationObjective(student, train.loss, spec.pattern, train.group_lasso, student_transform)
    sharded = train.sharding is Sharding.FSDP
    if sharded:
        if accelerator.num_processes < 2:
            raise DistillError("config key 'train.sharding': fsdp shards over processes; launch at least 2")
        shard_objective(objective, student, accelerator.mixed_precision)
        if teacher is not None:
            shard_teacher(teacher)
        return_freed_memory()  # the whole student (and teacher) as loaded, now that each rank keeps its shards
    optimizer, scheduler, trainable = build_optimizer(student, train, masks, accelerator.device)
    schedule = BlockSchedule(len(blocks), train.global_batch_size, config.run.seed)
    if not sharded:  # accelerate does not know the sharded model: checkpoints save it beside accelerate's state
        objective, optimizer = accelerator.prepare(objective, optimizer)
    # the scheduler is not passed to prepare(): accelerate would step a prepared scheduler once per process
    accelerator.register_for_checkpointing(scheduler, schedule)

    reseed = None
    if train.group_dropout or train.masks.mode is MaskMode.LEARNABLE:
        def reseed(step: int, micro: int) -> None:  # the same draws per micro-batch whatever the process count
            torch.manual_seed(config.run.seed * 1_000_003 + step * 1009 + accelerator.process_index * accumulation + micro)
    step = DistillStep(accelerator, objective, optimizer, scheduler, trainable, masks, train.max_grad_norm,
                       skip_nonfinite=train.on_nonfinite is NonFinite.SKIP, reseed=reseed)
    return Training(student, teacher, objective, step, masks, schedule, blocks, heldout, heldout_teacher_logp, cached,
                    teacher_transform, spec, ShardedCheckpoint(objective, optimizer) if sharded else None, step_flops,
                    calibration_blocks(blocks, config.calibration.num_blocks))


@torch.no_grad()
def _heldout_teacher_logp(ctx: StageContext, teacher: nn.Module | None, heldout: torch.Tensor | None) -> torch.Tensor | None:
    """The teacher's log-probs of the held-out blocks, for the recovery curve's KL, computed once; a
    run that trains from the cached top-k loads the teacher for this alone and lets it go."""
    if heldout is None:
        return None
    source = teacher if teacher is not None else load_teacher(ctx.config.teacher, ctx.accelerator.device)
    with ctx.accelerator.autocast():
        return log_probs(source.eval(), heldout, ctx.config.train.micro_batch_size)


def _resume(ctx: StageContext, training: Training) -> None:
    """Load the latest checkpoint (if any), keep the logged rows up to it, start tracking."""
    accelerator = ctx.accelerator
    resume_from = resume(accelerator, ctx.work_dir / CHECKPOINTS, training.sharded_checkpoint, ctx.log)
    if resume_from is not None:
        ctx.log(f"[distill] resumed from {resume_from} at step {training.schedule.step}")
    training.history = [row for row in read_metrics(ctx.work_dir) if row["step"] <= training.schedule.step]
    ctx.start_tracking()
    if resume_from is not None:
        resend_rows(accelerator, training.history, prefix="train/")


def _micro_batches(ctx: StageContext, training: Training, step: int) -> list[MicroBatch]:
    accelerator, train = ctx.accelerator, ctx.config.train
    batches = []
    for indices in training.schedule.micro_batches(step, accelerator.process_index, accelerator.num_processes,
                                                   train.micro_batch_size):
        input_ids = to_device(training.blocks[indices], accelerator.device)
        if training.cached is not None:
            signal = partial(cached_teacher_outputs, training.cached, indices, accelerator.device)
        else:
            signal = partial(teacher_outputs, training.teacher, input_ids, train.loss, training.teacher_transform)
        batches.append(MicroBatch(input_ids, signal))
    return batches


def _peak_flops(ctx: StageContext, step_flops: float) -> float:
    """The per-device bf16 peak the logged MFU is against (0: no MFU)."""
    peak = ctx.config.speed.peak_tflops * 1e12
    if not peak and ctx.accelerator.device.type == "cuda":
        peak = measured_peak_flops(ctx.accelerator.device)
    if peak:
        ctx.log(f"[distill] MFU against {peak / 1e12:.0f} TFLOP/s per device, {step_flops / 1e9:.2f} GFLOP per token")
    return peak


def _loop(ctx: StageContext, training: Training) -> None:
    accelerator, train = ctx.accelerator, ctx.config.train
    peak_flops = _peak_flops(ctx, training.step_flops)
    history = training.history
    skipped = int(history[-1].get("skipped_steps", 0)) if history else 0  # on resume, from the log
    window: list[dict[str, torch.Tensor]] = []  # device tensors, read on the host only at log time
    window_start = time.perf_counter()
    start = training.schedule.step
    progress = tqdm(range(start, train.steps), initial=start, total=train.steps, desc="distill",
                    disable=not accelerator.is_main_process)
    for step in progress:
        losses, applied = training.step(step, train.steps, _micro_batches(ctx, training, step))
        training.schedule.step = done = step + 1
        if applied:
            window.append(losses)
        else:
            skipped += 1
        if done % train.log_every == 0 or done == train.steps:
            row = _log_window(ctx, training, window, done, time.perf_counter() - window_start, peak_flops)
            if train.on_nonfinite is NonFinite.SKIP:
                row["skipped_steps"] = skipped
            history.append(row)
            if accelerator.is_main_process:
                write_metrics(ctx.work_dir, history)
                progress.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
            log_row(accelerator, row, prefix="train/")
            window, window_start = [], time.perf_counter()
        every = ctx.config.activations.recalibrate_every
        if training.spec.input_thresholds and every and done % every == 0 and done < train.steps:
            _recalibrate_thresholds(ctx, training, done)
        if done % train.checkpoint_every == 0 and done < train.steps:
            save_checkpoint(accelerator, ctx.work_dir / CHECKPOINTS, done, train.keep_checkpoints,
                            training.sharded_checkpoint)


def _recalibrate_thresholds(ctx: StageContext, training: Training, done: int) -> None:
    """Thresholds calibrated again on the student as it is now (activations.recalibrate_every), each
    input zeroed at the fraction the prune stage allocated to it (a greedy allocation is not searched
    again), or at step `done` of the ramp to it (activations.ramp_steps); every process computes the
    same ones from the same blocks, in eval mode and the training precision."""
    activations, accelerator = ctx.config.activations, ctx.accelerator
    sharded_root = training.objective if training.sharded_checkpoint is not None else None
    blocks = training.calibration.to(accelerator.device)
    scale = ramp_scale(done, activations.ramp_steps)
    with evaluating(training.student, sharded_root), accelerator.autocast():
        calibrated = recalibrate_thresholds(training.student, blocks, activations.where,
                                            ramped(training.spec.input_allocation, done, activations.ramp_steps),
                                            ctx.config.calibration.batch_size)
    install_thresholds(training.student, calibrated.groups, calibrated.thresholds, activations.straight_through)
    mean = sum(calibrated.thresholds.values()) / len(calibrated.thresholds)
    ramp = f", {scale:.0%} of the allocation" if activations.ramp_steps else ""
    ctx.log(f"[distill] step {done}: activation thresholds re-calibrated on {len(calibrated.groups)} inputs "
            f"(mean {mean:.4g}{ramp})")


def _log_window(ctx: StageContext, training: Training, window: list[dict], done: int, seconds: float,
                peak_flops: float) -> dict:
    """The row logged at step `done`: mean losses over the window, lr, tokens/s, MFU, and the held-out
    perplexity and KL to the teacher at eval steps. Stops before a non-finite window reaches any checkpoint."""
    accelerator, train = ctx.accelerator, ctx.config.train
    if accelerator.device.type == "cuda":  # count the window's queued GPU work in its time
        torch.cuda.synchronize(accelerator.device)
    tokens_per_s = train.global_batch_size * training.blocks.shape[1] * len(window) / seconds
    # a window whose every step was skipped (train.on_nonfinite=skip) has nothing to average
    means = window_means(accelerator, window) if window else {}
    row = {"step": done, **means, "lr": training.step.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s}
    if training.spec.input_thresholds:  # moves when activations.recalibrate_every re-calibrates them
        values = thresholded(training.student).values()
        row["mean_input_threshold"] = sum(values) / len(values)
    if row.pop("nonfinite", 0.0) > 0:
        raise DistillError(_nonfinite_message(ctx.work_dir, done - len(window) + 1, done))
    if peak_flops:
        row["mfu"] = tokens_per_s * training.step_flops / (peak_flops * accelerator.num_processes)
    if training.heldout is not None and (done % train.eval_every == 0 or done == train.steps):
        sharded_root = training.objective if training.sharded_checkpoint is not None else None
        row.update(heldout_scores(accelerator, training.student, training.heldout, train.micro_batch_size,
                                  training.heldout_teacher_logp, sharded_root))
    return row


def _finish(ctx: StageContext, training: Training) -> dict:
    accelerator, train = ctx.accelerator, ctx.config.train
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(training.objective).student  # sharded in place under fsdp
    sharded = training.sharded_checkpoint is not None
    if sharded:
        # fsdp trains fixed masks only, so nothing settles; the file gets each weight times its mask.
        # The optimizer state and gradients go first: saving gathers one tensor at a time beside them
        training.step.optimizer.state.clear()
        training.objective.zero_grad(set_to_none=True)
    else:
        training.masks.finish(student)
    problem = nonfinite_problem(student, f"the distilled student (after {train.steps} steps)")  # this process's shards under fsdp
    problem = problem or _unrecovered(training.history, train)
    if accelerator.num_processes > 1:
        problem = next((found for found in gather_object([problem]) if found), None)
    if problem:
        raise DistillError(problem)
    checkpoints = ctx.work_dir / CHECKPOINTS
    pruned_zero = None
    if sharded or accelerator.is_main_process:  # every process gathers a sharded student's tensors
        pruned_zero = save_student(student, ctx.work_dir / STUDENT_DIR, training.spec, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        # the finished student replaces the checkpoints; the pointer goes first so a crash midway
        # never leaves it naming a deleted checkpoint
        (checkpoints / "latest.json").unlink(missing_ok=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
    for tracker in accelerator.trackers:  # not end_training(): that would tear down the process group
        tracker.finish()
    record = _record(ctx, training, pruned_zero)
    if accelerator.is_main_process:
        write_distill_record(ctx.work_dir, record)
    return dataclasses.asdict(record)


def _record(ctx: StageContext, training: Training, pruned_zero: bool | None) -> DistillRecord:
    accelerator, train = ctx.accelerator, ctx.config.train
    sharded = None
    if training.teacher is not None:
        layers = decoder_layers(training.teacher)[1]
        sharded = all(isinstance(p, DTensor) for p in layers.parameters())
    return DistillRecord(train.steps, train.steps * train.global_batch_size * training.blocks.shape[1],
                         accelerator.num_processes, train.sharding.value,
                         training.history[-1] if training.history else {}, sharded, pruned_zero)


def _unrecovered(history: list[dict], train) -> str | None:
    """Why a run under train.on_nonfinite=skip must not finish: every step of its last logged window
    was skipped, so whatever the weights hold now never gave a finite loss. None when the loss
    recovered (or nothing was skipped)."""
    last = history[-1] if history else {}
    if train.on_nonfinite is not NonFinite.SKIP or "loss" in last:
        return None
    return (f"the loss never recovered: train.on_nonfinite=skip skipped every step from the last log to step "
            f"{last.get('step')} ({last.get('skipped_steps')} skipped in all), so the student is not saved; lower "
            f"train.lr and rerun with --discard-partial distill")


def _nonfinite_message(work_dir: Path, first: int, last: int) -> str:
    latest = latest_checkpoint(work_dir / CHECKPOINTS)
    kept = (f"the last good checkpoint, {latest}, is kept" if latest is not None
            else f"no checkpoint was written before it; {work_dir} holds no weights worth keeping")
    return (f"the loss or gradient norm is not finite within steps {first}-{last}; stopped before saving anything "
            f"from them: {kept}. Lower train.lr (or set train.on_nonfinite=skip) and delete {work_dir} to start "
            f"distill over")
