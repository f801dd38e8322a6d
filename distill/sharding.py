"""FSDP2 for the distill stage (train.sharding=fsdp): the student's parameters, gradients, optimizer
state and masks sharded over the processes with torch's `fully_shard`.

distill shards the student itself rather than through accelerate's FSDP plugin, because accelerate
runs FSDP on GPUs only, and the same code must be testable with CPU ranks (gloo). Each decoder layer
is one FSDP unit and the DistillationObjective is the root unit, so the embeddings, final norm and
output projection that the chunked loss uses outside the decoder are gathered for the objective's
forward.

Masks shard with their weights: every rank keeps only the rows of each mask that match its shard of
the weight. The projections then run on the weights alone (they hold zeros where pruned), and the
masks are applied to the local gradient shards before clipping (so the gradient norm is that of
the masked model) and to the local weight shards after each step.

The frozen teacher's decoder layers are sharded too (each gathered for its forward and freed after
it); its embeddings, final norm and output projection stay whole on every rank, because the chunked
loss uses the output projection again when it recomputes chunks in backward. With
train.loss.teacher_topk the teacher is not loaded during distill at all.

Parameters are gathered in the autocast dtype (bf16 under bf16 mixed precision) and gradients are
reduced in fp32 (`MixedPrecisionPolicy`), with fp32 master weights in the optimizer.

Checkpoints of the model and optimizer go through torch.distributed.checkpoint: every rank writes
and reads its own shards (no rank ever holds the whole state), and DCP reshards on load, so a run can
resume on another number of processes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from distill.errors import DistillError
from distill.sparsity import MaskedLinear, masked_modules
from distill.targets import decoder_layers

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def shard_objective(objective: nn.Module, student: nn.Module, mixed_precision: str) -> list[MaskedLinear]:
    """fully_shard every decoder layer of `student`, then `objective` as the root unit (in place);
    each mask is cut down to the rows of its weight's local shard. Returns the masked projections."""
    policy = precision_policy(mixed_precision)
    for layer in _decoder_layers(student):
        fully_shard(layer, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    modules = [module for _, module in masked_modules(student)]
    for module in modules:
        local = distribute_tensor(module.mask.to(module.weight.dtype), module.weight.device_mesh,
                                  module.weight.placements).to_local()
        module.mask = None  # the buffer leaves the module: forward uses the (zeroed) weight alone
        module.local_mask = local
    return modules


@torch.no_grad()
def mask_local_shards_(tensors: list[torch.Tensor], modules: list[MaskedLinear]) -> None:
    """Multiply each module's local weight or gradient shard by its local mask, in one fused call."""
    locals_ = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    torch._foreach_mul_(locals_, [module.local_mask for module in modules])


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


def full_student_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The student's full state dict on the main process (empty elsewhere); every rank must call it."""
    state = get_model_state_dict(objective, options=FULL)
    return {key.removeprefix("student."): value for key, value in state.items()}
