"""Stage 3, distill: train the masked student against the frozen teacher under accelerate.

The global batch of every optimizer step is fixed by the config and by the step number alone
(`BlockSchedule`), then split over processes and accumulation micro-steps, so one process and N
processes see the same data and follow the same loss curve, and a resumed run continues exactly
where the checkpoint left off (distill.checkpoints). What is optimized, the student with its loss,
is distill.objective.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from distill.checkpoints import CHECKPOINTS, latest_checkpoint, resume, save_checkpoint
from distill.config import Config, NonFinite, SpeedConfig, TrainConfig
from distill.data import to_device
from distill.errors import DistillError
from distill.evaluation import score_models
from distill.io import load_tensors, write_text
from distill.losses import IDENTITY, TopK, logit_transform
from distill.mask_modes import DynamicMasks, LearnableMasks, revive_pruned_weights
from distill.models import load_teacher
from distill.objective import DistillationObjective, cached_teacher_outputs, teacher_outputs
from distill.patterns import Pattern, group_dropout_mask
from distill.pipeline import StageContext
from distill.sharding import ShardedCheckpoint, full_student_state, mask_local_shards_, shard_objective, shard_teacher
from distill.sparsity import apply_masks_, mask_pairs, masked_modules
from distill.artifacts import CALIBRATION_FILE, DATA_FILE, METRICS_FILE, STUDENT_DIR, TOPK_FILE
from distill.student import load_student, nonfinite_problem, save_student
from distill.targets import decoder_layers
from distill.throughput import flops_per_token, measured_peak_flops
from distill.tracking import log_row, resend_rows, start_tracking



class BlockSchedule:
    """Which training blocks each optimizer step uses: consecutive slices of a seeded permutation
    per epoch. Its state (the next step) is saved with every checkpoint."""

    def __init__(self, num_blocks: int, global_batch_size: int, seed: int):
        if num_blocks < global_batch_size:
            raise DistillError(f"train.global_batch_size {global_batch_size} is larger than the {num_blocks} training blocks")
        self.num_blocks, self.global_batch_size, self.seed = num_blocks, global_batch_size, seed
        self.step = 0

    def global_batch(self, step: int) -> torch.Tensor:
        steps_per_epoch = self.num_blocks // self.global_batch_size
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[index * self.global_batch_size:(index + 1) * self.global_batch_size]

    def micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[torch.Tensor]:
        mine = self.global_batch(step).reshape(world, -1)[rank]
        return list(mine.split(micro_batch_size))

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def accumulation_steps(train: TrainConfig, world: int) -> int:
    per_process, remainder = divmod(train.global_batch_size, world)
    if remainder or per_process % train.micro_batch_size:
        raise DistillError(
            f"train.global_batch_size {train.global_batch_size} does not split into {world} processes x "
            f"micro batches of train.micro_batch_size {train.micro_batch_size}"
        )
    return per_process // train.micro_batch_size


def _read_metrics(path: Path) -> list[dict]:
    """The rows logged so far (a resumed run keeps those up to its checkpoint and recomputes the rest)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def speed_up(model: nn.Module, speed: SpeedConfig, training: bool) -> None:
    """Activation checkpointing (training models only) and per-layer torch.compile, in place. Layers
    compile one by one so the chunked loss and the optimizer stay eager and a change of batch shape
    recompiles one small graph, reused by every layer."""
    if training and speed.activation_checkpointing:
        # transformers renamed the switch (gradient_ -> activation_checkpointing_enable) in 5.x
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if speed.compile:
        found = decoder_layers(model)
        if found is None:
            raise DistillError(f"speed.compile: {type(model).__name__} has no list of decoder layers to compile")
        for layer in found[1]:
            layer.compile()


def forward_backward(accelerator: Accelerator, objective: nn.Module, teacher_signal: Callable[[], dict],
                     input_ids: torch.Tensor, scale: float, sync: bool) -> tuple[torch.Tensor, dict]:
    """One micro-batch: the teacher's signal without grad (`teacher_outputs`, or the cache), student
    forward and loss, backward of `loss * scale`; gradients are all-reduced only when `sync` (the last
    micro-batch of a step)."""
    if hasattr(objective, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
        objective.set_requires_gradient_sync(sync)
    with (nullcontext() if sync else accelerator.no_sync(objective)):
        with accelerator.autocast():
            with torch.no_grad():
                teacher_out = teacher_signal()
            total, parts = objective(input_ids, teacher_out)
        accelerator.backward(total * scale)
    return total.detach(), parts


def optimizer_step(accelerator: Accelerator, optimizer, trainable: list[torch.Tensor], max_grad_norm: float,
                   loss: torch.Tensor | None = None, skip_nonfinite: bool = False):
    """Clip (when max_grad_norm > 0), step, clear the gradients. Returns (grad norm as a device tensor
    or None, finite: a device bool saying the loss and grad norm were finite), both read on the host
    only at log time, except with `skip_nonfinite`: then a non-finite step is not applied, which needs
    one host read of `finite` per step."""
    grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm) if max_grad_norm else None
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    for value in (loss, grad_norm):
        if torch.is_tensor(value):
            finite = finite & torch.isfinite(value.detach()).all()
    if skip_nonfinite:  # every process skips the same steps: a loss is local to its process
        finite = accelerator.reduce(finite.float(), "sum") == accelerator.num_processes
    if not skip_nonfinite or bool(finite):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def run(ctx: StageContext) -> dict:
    config: Config = ctx.config
    accelerator = ctx.accelerator
    train = config.train
    accumulation = accumulation_steps(train, accelerator.num_processes)

    data = load_tensors(ctx.stage_dir("teacher") / DATA_FILE)
    blocks = data["train"].long()
    heldout = [tensor.long() for name, tensor in sorted(data.items()) if name.startswith("heldout.") and len(tensor)]
    heldout = torch.cat(heldout) if heldout and train.eval_every else None
    schedule = BlockSchedule(len(blocks), train.global_batch_size, config.run.seed)
    cached = None
    if train.loss.teacher_topk and train.loss.kd_weight:
        tensors = load_tensors(ctx.stage_dir("teacher_logits") / TOPK_FILE)
        cached = TopK(tensors["logp"], tensors["index"])
        if cached.logp.shape[:2] != blocks.shape or cached.logp.shape[-1] != train.loss.teacher_topk:
            raise DistillError(f"{ctx.stage_dir('teacher_logits') / TOPK_FILE} holds {tuple(cached.logp.shape)} "
                               f"for {tuple(blocks.shape)} training blocks at k={train.loss.teacher_topk}; rerun the stage")
    needs_teacher = (train.loss.kd_weight > 0 and cached is None) or train.loss.hidden_weight > 0
    teacher = load_teacher(config.teacher, accelerator.device) if needs_teacher else None
    if cached is not None:
        ctx.log(f"[distill] teacher from the cache of its top-{train.loss.teacher_topk} tokens; the teacher is not loaded")
    student = load_student(ctx.stage_dir("prune") / STUDENT_DIR, accelerator.device).train()
    step_flops = flops_per_token(student, teacher, context=blocks.shape[1])
    # the chunked loss applies each head itself: what the head does after its projection, probed
    # before compile and sharding
    chunked = train.loss.chunk_tokens > 0
    student_transform = logit_transform(student) if chunked else IDENTITY
    teacher_transform = logit_transform(teacher) if chunked and teacher is not None else IDENTITY
    speed_up(student, config.speed, training=True)
    if teacher is not None:
        speed_up(teacher, config.speed, training=False)
    spec = json.loads((ctx.stage_dir("prune") / STUDENT_DIR / "sparsity.json").read_text())

    pattern = Pattern.from_spec(spec)
    if train.mask_mode in ("dynamic", "learnable"):  # moving masks start from the teacher's dense values
        source = teacher if teacher is not None else load_teacher(config.teacher, accelerator.device)
        revive_pruned_weights(student, source)
        del source
    learnable = (LearnableMasks(student, pattern, train.mask_init_logit, train.gumbel_temperature, train.mask_noise)
                 if train.mask_mode == "learnable" else None)
    if train.group_dropout:
        for _, module in masked_modules(student):
            module.drop_groups = partial(group_dropout_mask, pattern, rate=train.group_dropout)
            module.drop_rate = train.group_dropout
    objective = DistillationObjective(student, train.loss, pattern, train.group_lasso, student_transform)
    sharded = None  # the masked projections, when the student is sharded (train.sharding=fsdp)
    if train.sharding == "fsdp":
        if accelerator.num_processes < 2:
            raise DistillError("config key 'train.sharding': fsdp shards over processes; launch at least 2")
        sharded = shard_objective(objective, student, accelerator.mixed_precision)
        if teacher is not None:
            shard_teacher(teacher)
    mask_logits = learnable.parameters() if learnable is not None else []
    weights = [p for p in student.parameters() if p.requires_grad and all(p is not q for q in mask_logits)]
    groups = [{"params": weights}]
    if mask_logits:
        groups.append({"params": mask_logits, "lr": train.mask_lr, "weight_decay": 0.0})
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                                  fused=accelerator.device.type in ("cuda", "cpu"))  # one vectorized pass per step
    # Not passed to prepare(): accelerate would step a prepared scheduler once per process.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, train.warmup_steps, train.steps,
                                                            min_lr_rate=train.min_lr_ratio)
    if sharded is None:
        objective, optimizer = accelerator.prepare(objective, optimizer)
        accelerator.register_for_checkpointing(scheduler, schedule)
        masks = mask_pairs(student)
    else:  # accelerate does not know the sharded model: checkpoints save it beside accelerate's state
        accelerator.register_for_checkpointing(scheduler, schedule)
    sharded_checkpoint = ShardedCheckpoint(objective, optimizer) if sharded is not None else None
    dynamic = None
    if train.mask_mode == "dynamic":  # re-chosen by Wanda's score unless the student was cut by magnitude
        square_sums = (load_tensors(ctx.stage_dir("teacher") / CALIBRATION_FILE)
                       if spec.get("criterion") != "magnitude" else None)
        dynamic = DynamicMasks(student, pattern, train.mask_update_every, train.refine_decay, square_sums)

    checkpoints = ctx.work_dir / CHECKPOINTS
    resume_from = resume(accelerator, checkpoints, sharded_checkpoint, ctx.log)
    if resume_from is not None:
        ctx.log(f"[distill] resumed from {resume_from} at step {schedule.step}")
    metrics_path = ctx.work_dir / METRICS_FILE
    history = [row for row in _read_metrics(metrics_path) if row["step"] <= schedule.step]
    start_tracking(accelerator, config, ctx.work_dir)
    if resume_from is not None:
        resend_rows(accelerator, history, prefix="train/")

    tokens_per_step = train.global_batch_size * blocks.shape[1]
    peak_flops = config.speed.peak_tflops * 1e12
    if not peak_flops and accelerator.device.type == "cuda":
        peak_flops = measured_peak_flops(accelerator.device)
    if peak_flops:
        ctx.log(f"[distill] MFU against {peak_flops / 1e12:.0f} TFLOP/s per device, {step_flops / 1e9:.2f} GFLOP per token")
    window: list[dict[str, torch.Tensor]] = []  # device tensors, read on the host only at log time
    skip = train.on_nonfinite is NonFinite.SKIP
    skipped_steps = int(history[-1].get("skipped_steps", 0)) if history else 0  # on resume, from the log
    window_start = time.perf_counter()
    progress = tqdm(range(schedule.step, train.steps), initial=schedule.step, total=train.steps,
                    desc="distill", disable=not accelerator.is_main_process)
    for step in progress:
        step_losses: dict[str, torch.Tensor] = {}
        if learnable is not None:
            learnable.anneal(step, train.steps)
        micro_batches = schedule.micro_batches(step, accelerator.process_index, accelerator.num_processes, train.micro_batch_size)
        for micro, indices in enumerate(micro_batches):
            input_ids = to_device(blocks[indices], accelerator.device)
            if train.group_dropout or learnable is not None:  # the same random draws per micro-batch whatever the process count
                torch.manual_seed(config.run.seed * 1_000_003 + step * 1009 + accelerator.process_index * accumulation + micro)
            if cached is not None:
                signal = partial(cached_teacher_outputs, cached, indices, accelerator.device)
            else:
                signal = partial(teacher_outputs, teacher, input_ids, train.loss, teacher_transform)
            loss, parts = forward_backward(accelerator, objective, signal, input_ids, 1 / accumulation,
                                           sync=micro == len(micro_batches) - 1)
            for name, value in {"loss": loss, **parts}.items():
                step_losses[name] = step_losses.get(name, 0) + value / accumulation
        if sharded is not None:  # the projections ran unmasked: their pruned weights got gradients
            mask_local_shards_([module.weight.grad for module in sharded], sharded)
        grad_norm, finite = optimizer_step(accelerator, optimizer, trainable, train.max_grad_norm,
                                           step_losses["loss"], skip_nonfinite=skip)
        scheduler.step()
        if dynamic is not None:
            dynamic.after_step(step + 1)
        elif learnable is not None:
            learnable.after_step()
        elif sharded is not None:
            mask_local_shards_([module.weight for module in sharded], sharded)
        else:
            apply_masks_(masks)
        schedule.step = step + 1
        if grad_norm is not None:
            step_losses["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
        if skip and not bool(finite):  # read already by optimizer_step: no further sync
            skipped_steps += 1
        else:
            step_losses["nonfinite"] = (~finite).float()
            window.append(step_losses)

        done = step + 1
        if done % train.log_every == 0 or done == train.steps:
            if accelerator.device.type == "cuda":  # count the window's queued GPU work in its time
                torch.cuda.synchronize(accelerator.device)
            tokens_per_s = tokens_per_step * len(window) / (time.perf_counter() - window_start)
            if window:
                row = _log_window(accelerator, window, done, scheduler.get_last_lr()[0], tokens_per_s)
            else:  # every step of the window was skipped (train.on_nonfinite=skip): nothing to average
                row = {"step": done, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s}
            if row.pop("nonfinite", 0.0) > 0:  # stop: before this window's weights reach any checkpoint
                raise DistillError(_nonfinite_message(ctx.work_dir, checkpoints, done - len(window) + 1, done))
            if skip:
                row["skipped_steps"] = skipped_steps
            if peak_flops:
                row["mfu"] = tokens_per_s * step_flops / (peak_flops * accelerator.num_processes)
            if heldout is not None and (done % train.eval_every == 0 or done == train.steps):
                row["heldout_ppl"] = heldout_perplexity(accelerator, student, heldout, train.micro_batch_size,
                                                        objective if sharded is not None else None)
            history.append(row)
            if accelerator.is_main_process:
                write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
                progress.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
            log_row(accelerator, row, prefix="train/")
            window, window_start = [], time.perf_counter()
        if done % train.checkpoint_every == 0 and done < train.steps:
            save_checkpoint(accelerator, checkpoints, done, train.keep_checkpoints, sharded_checkpoint)

    accelerator.wait_for_everyone()
    if sharded is None:
        final = accelerator.unwrap_model(objective).student
    else:  # gathered onto the main process, into an unsharded student with the prune stage's masks
        state = full_student_state(objective)
        final = load_student(ctx.stage_dir("prune") / STUDENT_DIR) if accelerator.is_main_process else None
        if final is not None:
            missing, unexpected = final.load_state_dict(state, strict=False)
            if unexpected or any(not key.endswith(".mask") for key in missing):
                raise DistillError(f"the sharded student's state does not fit its architecture: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
    for masks_in_training in (dynamic, learnable):
        if masks_in_training is not None:
            masks_in_training.finish(final)
    # under fsdp only the main process holds the gathered student: it decides for every process
    problem = nonfinite_problem(final, f"the distilled student (after {train.steps} steps)") if final is not None else None
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise DistillError(problem)
    if accelerator.is_main_process:
        save_student(final, ctx.work_dir / STUDENT_DIR, {k: v for k, v in spec.items() if k != "masked"})
        # the finished student replaces the checkpoints; the pointer goes first so a crash midway
        # never leaves it naming a deleted checkpoint
        (checkpoints / "latest.json").unlink(missing_ok=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
    for tracker in accelerator.trackers:  # not end_training(): that would tear down the process group
        tracker.finish()
    summary = {"steps": train.steps, "tokens": train.steps * tokens_per_step, "processes": accelerator.num_processes,
               "sharding": train.sharding, "final": history[-1] if history else {}}
    if teacher is not None:
        summary["teacher_layers_sharded"] = all(isinstance(p, DTensor) for p in decoder_layers(teacher)[1].parameters())
    if final is not None:
        summary["masked_weights_zero"] = all(bool((module.weight[~module.mask] == 0).all())
                                             for _, module in masked_modules(final))
    return summary


def _nonfinite_message(work_dir: Path, checkpoints: Path, first: int, last: int) -> str:
    latest = latest_checkpoint(checkpoints)
    kept = (f"the last good checkpoint, {latest}, is kept" if latest is not None
            else f"no checkpoint was written before it; {work_dir} holds no weights worth keeping")
    return (f"the loss or gradient norm is not finite within steps {first}-{last}; stopped before saving anything "
            f"from them: {kept}. Lower train.lr (or set train.on_nonfinite=skip) and delete {work_dir} to start "
            f"distill over")


def heldout_perplexity(accelerator: Accelerator, student: nn.Module, heldout: torch.Tensor, batch_size: int,
                       sharded_root: nn.Module | None = None) -> float:
    """The student's perplexity on the held-out blocks (ranks share them), in eval mode: learnable
    masks take their most likely pattern and group dropout is off.

    sharded_root: the FSDP root (the objective) when the student is sharded. The root owns the
    embeddings, final norm and output projection, which it gathers only in its own forward, so they
    are gathered here for the student's forward; its decoder layers gather themselves."""
    student.eval()
    try:
        if sharded_root is not None:
            sharded_root.unshard()
        with accelerator.autocast():
            return score_models({"student": student}, heldout, accelerator, batch_size, reference=None,
                                desc="held-out", lockstep=sharded_root is not None)["student"]["ppl"]
    finally:
        if sharded_root is not None:
            sharded_root.reshard()
        student.train()


def _log_window(accelerator: Accelerator, window: list[dict[str, torch.Tensor]], step: int, lr: float, tokens_per_s: float) -> dict:
    """Mean of each logged value over the window and over processes (one host sync per log)."""
    names = sorted(window[0])
    local = torch.stack([torch.stack([torch.as_tensor(entry[name], dtype=torch.float32, device=accelerator.device)
                                      for name in names]) for entry in window]).mean(0)
    values = accelerator.reduce(local, "mean").tolist()
    row = {"step": step, **dict(zip(names, values)), "lr": lr, "tokens_per_s": tokens_per_s}
    return row
