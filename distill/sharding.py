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

Checkpoints hold full (gathered) model and optimizer state dicts, written by the main process and
read by every rank, so a run can resume on another number of processes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from distill.errors import DistillError
from distill.sparsity import MaskedLinear, masked_modules

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise DistillError(f"train.sharding=fsdp: {type(model).__name__} has no decoder `layers` to shard")
    return layers


def shard_teacher(teacher: nn.Module) -> None:
    """fully_shard every decoder layer of the frozen teacher (in place). Each layer is its own root
    unit, and FSDP keeps a root unsharded after forward (expecting backward); the teacher has no
    backward, so every layer frees its gathered parameters right after its forward."""
    for layer in _decoder_layers(teacher):
        fully_shard(layer)
        layer.register_forward_hook(lambda module, args, output: module.reshard())


def shard_objective(objective: nn.Module, student: nn.Module) -> list[MaskedLinear]:
    """fully_shard every decoder layer of `student`, then `objective` as the root unit (in place);
    each mask is cut down to the rows of its weight's local shard. Returns the masked projections."""
    for layer in _decoder_layers(student):
        fully_shard(layer)
    fully_shard(objective)
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


class ShardedTrainingState:
    """The sharded model and optimizer as one checkpointable object for accelerate's save_state /
    load_state (`register_for_checkpointing`): state_dict gathers full state dicts (every rank takes
    part; the main process holds the result), load_state_dict gives each rank its shards back."""

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer):
        self.objective, self.optimizer = objective, optimizer

    def state_dict(self) -> dict:
        return {"model": get_model_state_dict(self.objective, options=FULL),
                "optimizer": get_optimizer_state_dict(self.objective, self.optimizer, options=FULL)}

    def load_state_dict(self, state: dict) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.objective, state["model"], options=options)
        set_optimizer_state_dict(self.objective, self.optimizer, state["optimizer"], options=options)


def full_student_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The student's full state dict on the main process (empty elsewhere); every rank must call it."""
    state = get_model_state_dict(objective, options=FULL)
    return {key.removeprefix("student."): value for key, value in state.items()}
