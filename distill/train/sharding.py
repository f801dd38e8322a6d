"""FSDP2 for the distill stage (train.sharding=fsdp): the student's parameters, gradients and optimizer
state sharded over the processes with torch's `fully_shard`.

distill shards the student itself rather than through accelerate's FSDP plugin, because accelerate
runs FSDP on GPUs only, and the same code must be testable with CPU ranks (gloo). Each decoder layer
is one FSDP unit and the DistillationObjective is the root unit, so the embeddings, final norm and
output projection that the chunked loss uses outside the decoder are gathered for the objective's
forward.

Masks need nothing of their own here: each projection's mask is a parametrization of its weight
(distill.sparsity.masks), so FSDP shards the stored weight, gathers it for the layer's forward, and
the mask's product runs on the gathered weight exactly as on one process. The pruned weights get
zero gradient, so the gradient norm is the masked model's and no step moves them. The masks
are buffers, whole on every rank, kept as bits (one bit per weight, against the bf16 weight's 16).

The frozen teacher's decoder layers are sharded too (each gathered for its forward and freed after
it); its embeddings, final norm and output projection stay whole on every rank, because the chunked
loss uses the output projection again when it recomputes chunks in backward. With
train.loss.teacher_topk the teacher is not loaded during distill at all.

Parameters are gathered in the autocast dtype (bf16 under bf16 mixed precision) and gradients are
reduced in fp32 (`MixedPrecisionPolicy`), with fp32 master weights in the optimizer.

Checkpoints of the model and optimizer go through torch.distributed.checkpoint: every rank writes
and reads its own shards (no rank ever holds the whole state), and DCP reshards on load, so a run can
resume on another number of processes. The finished student is gathered one tensor at a time as
it streams into its file (distill.student.save_student), so no process holds it whole either.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distill.errors import DistillError
from distill.targets import decoder_layers


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    found = decoder_layers(model)
    if found is None:
        raise DistillError(f"train.sharding=fsdp: {type(model).__name__} has no list of decoder layers to shard")
    return found[1]


def shard_teacher(teacher: nn.Module) -> None:
    """fully_shard every decoder layer of the frozen teacher (in place). Each layer is its own root
    unit, and FSDP keeps a root unsharded after forward (expecting backward); the teacher has no
    backward, so every layer frees its gathered parameters right after its forward."""
    for layer in _decoder_layers(teacher):
        fully_shard(layer)
        layer.register_forward_hook(lambda module, args, output: module.reshard())


def precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """Gather parameters in the autocast dtype, reduce gradients in fp32 (accelerate's setting)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()


def shard_objective(objective: nn.Module, student: nn.Module, mixed_precision: str) -> None:
    """fully_shard every decoder layer of `student`, then `objective` as the root unit (in place)."""
    policy = precision_policy(mixed_precision)
    for layer in _decoder_layers(student):
        fully_shard(layer, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)


class ShardedCheckpoint:
    """The sharded model and optimizer in a checkpoint dir, through torch.distributed.checkpoint
    (every rank calls save and load; each writes and reads its own shards)."""

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer):
        self.objective, self.optimizer = objective, optimizer

    def _state(self) -> dict:
        model, optimizer = get_state_dict(self.objective, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def save(self, directory: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(directory))

    def load(self, directory: Path) -> None:
        state = self._state()  # the structure to fill, optimizer state included
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.objective, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
