"""The distillation training step, shared by the distill stage and benchmarks/train_throughput.py, so
the benchmark times the loop users run.

One `DistillStep` call is one optimizer step: the micro-batches of this process with gradient
accumulation (gradients all-reduced on the last one only), clipping, the optimizer (a non-finite
step skipped when asked), the scheduler, and the masks' upkeep between steps
(distill.sparsity.modes). Nothing in it reads a value on the host unless `skip_nonfinite` needs to
know whether to apply the step: losses stay device tensors until the caller logs them.

Around it: `BlockSchedule` decides which training blocks each step uses, `build_optimizer` the
optimizer and schedule from the config, `speed_up` compile and activation checkpointing, and
`window_means` the logged averages.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from distill.config import SpeedConfig, TrainConfig
from distill.errors import DistillError
from distill.sparsity.masks import plain_parameters
from distill.sparsity.modes import FixedMasks
from distill.targets import decoder_layers
from distill.train.optimizer import build_adamw


class BlockSchedule:
    """Which training blocks each optimizer step uses: consecutive slices of a seeded permutation
    per epoch. The global batch of a step depends on the step number alone, so one process and N
    processes see the same data. Its state (the next step) is saved with every checkpoint."""

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


def build_optimizer(student: nn.Module, train: TrainConfig, masks: FixedMasks, device: torch.device):
    """(AdamW over the student's weights, with the masks' own parameters at their learning rate and
    no weight decay; its warmup-cosine schedule; every trained tensor in the unmasked model's order)."""
    mask_parameters = masks.parameters()
    weights = [p for p in plain_parameters(student) if p.requires_grad and all(p is not q for q in mask_parameters)]
    groups = [{"params": weights}]
    if mask_parameters:
        groups.append({"params": mask_parameters, "lr": masks.lr, "weight_decay": 0.0})
    optimizer = build_adamw(train.optimizer_state, groups, lr=train.lr, betas=tuple(train.betas),
                            weight_decay=train.weight_decay, device=device)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, train.warmup_steps, train.steps,
                                                            min_lr_rate=train.min_lr_ratio)
    return optimizer, scheduler, weights + mask_parameters


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    teacher: Callable[[], dict]  # the teacher's side of the loss (distill.train.objective), run without grad


class DistillStep:
    """One optimizer step over this process's micro-batches. `reseed(step, micro)` (optional) seeds
    the random draws of a micro-batch (group dropout, learnable masks) so they do not depend on the
    process count. Returns the step's mean losses, grad norm and non-finite flag as device tensors
    (the flag counts only when the step was applied), and whether it was applied."""

    def __init__(self, accelerator: Accelerator, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, trainable: list[torch.Tensor], masks: FixedMasks, max_grad_norm: float,
                 skip_nonfinite: bool = False, reseed: Callable[[int, int], None] | None = None):
        self.accelerator, self.objective, self.optimizer, self.scheduler = accelerator, objective, optimizer, scheduler
        self.trainable, self.masks, self.max_grad_norm = trainable, masks, max_grad_norm
        self.skip_nonfinite, self.reseed = skip_nonfinite, reseed

    def __call__(self, step: int, steps: int, micro_batches: list[MicroBatch]) -> tuple[dict[str, torch.Tensor], bool]:
        self.masks.before_step(step, steps)
        losses: dict[str, torch.Tensor] = {}
        count = len(micro_batches)
        for micro, batch in enumerate(micro_batches):
            if self.reseed is not None:
                self.reseed(step, micro)
            loss, parts = self.forward_backward(batch, 1 / count, sync=micro == count - 1)
            for name, value in {"loss": loss, **parts}.items():
                losses[name] = losses.get(name, 0) + value / count
        grad_norm, finite = self.optimizer_step(losses["loss"])
        if self.scheduler is not None:
            self.scheduler.step()
        self.masks.after_step(step + 1)
        if grad_norm is not None:
            losses["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
        applied = not self.skip_nonfinite or bool(finite)  # read already by optimizer_step: no further sync
        if applied:
            losses["nonfinite"] = (~finite).float()
        return losses, applied

    def forward_backward(self, batch: MicroBatch, scale: float, sync: bool) -> tuple[torch.Tensor, dict]:
        """Teacher's signal without grad, student forward and loss, backward of `loss * scale`;
        gradients are all-reduced only when `sync` (the last micro-batch of a step)."""
        accelerator, objective = self.accelerator, self.objective
        if hasattr(objective, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            objective.set_requires_gradient_sync(sync)
        with (nullcontext() if sync else accelerator.no_sync(objective)):
            with accelerator.autocast():
                with torch.no_grad():
                    teacher_out = batch.teacher()
                total, parts = objective(batch.input_ids, teacher_out)
            accelerator.backward(total * scale)
        return total.detach(), parts

    def optimizer_step(self, loss: torch.Tensor):
        """Clip (when max_grad_norm > 0), step, clear the gradients. Returns (grad norm as a device
        tensor or None, finite: a device bool saying the loss and grad norm were finite). With
        `skip_nonfinite` a non-finite step is not applied, which needs one host read per step."""
        accelerator = self.accelerator
        grad_norm = accelerator.clip_grad_norm_(self.trainable, self.max_grad_norm) if self.max_grad_norm else None
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
        for value in (loss, grad_norm):
            if torch.is_tensor(value):
                finite = finite & torch.isfinite(value.detach()).all()
        if self.skip_nonfinite:  # every process skips the same steps: a loss is local to its process
            finite = accelerator.reduce(finite.float(), "sum") == accelerator.num_processes
        if not self.skip_nonfinite or bool(finite):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite


def window_means(accelerator: Accelerator, window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each logged value over the window's steps and over processes (one host sync)."""
    names = sorted(window[0])
    local = torch.stack([torch.stack([torch.as_tensor(entry[name], dtype=torch.float32, device=accelerator.device)
                                      for name in names]) for entry in window]).mean(0)
    return dict(zip(names, accelerator.reduce(local, "mean").tolist()))
