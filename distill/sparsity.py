"""N:M masks and the masked projection that carries one.

Groups run along the input dimension: in a weight of shape [out, in], every run of M consecutive
weights of one output row keeps N. That is the layout GPU 2:4 kernels (cuSPARSELt) accelerate.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest-scoring entries of every group of `m` consecutive inputs (bool mask)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input size {cols} is not a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """How many groups of `m` hold more than `n` non-zeros (0 means the weight is N:M sparse)."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"input size {cols} is not a multiple of {m}")
    nonzeros = (weight.reshape(rows, cols // m, m) != 0).sum(-1)
    return int((nonzeros > n).sum())


class SparseRefinedSTE(torch.autograd.Function):
    """Forward: weight * mask. Backward: the gradient passes to every weight as if unmasked, plus
    `decay * weight` on the pruned ones, which pulls them towards zero so the mask settles
    (SR-STE, Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch")."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * weight * ~mask, None, None


class MaskedLinear(nn.Linear):
    """An nn.Linear whose weight is multiplied by a fixed boolean mask.

    The product in forward makes the gradient of every masked weight exactly zero, and the weight
    itself is zeroed where masked, so masked weights stay zero under any optimizer;
    `apply_masks_` re-zeroes them anyway after each step as a guard against weight decay quirks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> "MaskedLinear":
        masked = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            masked.mask.copy_(mask)
            masked.weight.copy_(linear.weight * mask)
            if linear.bias is not None:
                masked.bias.copy_(linear.bias)
        return masked

    # dynamic masks: the mask is re-chosen from the weights during training and the gradient reaches
    # pruned weights too (sparse-refined straight-through estimator); see SparseRefinedSTE
    dynamic: bool = False
    refine_decay: float = 0.0
    # structured dropout while training: (shape, device) -> bool mask that drops whole groups, and its rate
    drop_groups = None
    drop_rate: float = 0.0

    # learnable masks: a `choice_logits` parameter [out, groups, C] over the candidate N:M patterns
    # `candidates` [C, m] of every group, set by distill.mask_modes.LearnableMasks
    candidates = None
    gumbel_temperature: float = 1.0
    gumbel_noise: float = 1.0  # scale of the Gumbel noise; 0 picks each group's most likely candidate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "choice_logits", None) is not None and self.training:
            weight = self.weight * self.sampled_mask()
        elif self.dynamic:
            weight = SparseRefinedSTE.apply(self.weight, self.mask, self.refine_decay)
        elif self.mask is None:  # sharded training (distill.sharding): the weight is zero where pruned
            weight = self.weight
        else:
            weight = self.weight * self.mask
        if self.training and self.drop_groups is not None and self.drop_rate > 0:
            kept = self.drop_groups(tuple(self.weight.shape), device=self.weight.device)
            weight = weight * kept / (1 - self.drop_rate)  # keeps the expected output unchanged
        return F.linear(x, weight, self.bias)

    def sampled_mask(self) -> torch.Tensor:
        """A hard N:M mask drawn by Gumbel-softmax from the choice logits; the gradient flows to the
        logits through the soft probabilities (straight-through)."""
        logits = self.choice_logits
        if self.gumbel_noise > 0:
            logits = logits - torch.empty_like(logits).exponential_().log() * self.gumbel_noise
        soft = torch.softmax(logits / self.gumbel_temperature, dim=-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        choice = hard + soft - soft.detach()
        mask = choice @ self.candidates.to(choice.dtype)  # [out, groups, m]
        return mask.reshape(self.out_features, self.in_features).to(self.weight.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the masked weight (zeros where pruned)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.mask)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def masked_modules(model: nn.Module) -> Iterator[tuple[str, MaskedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, MaskedLinear):
            yield name, module


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def install_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Replace each named nn.Linear by a MaskedLinear carrying its mask (in place)."""
    for name, mask in masks.items():
        linear = model.get_submodule(name)
        set_module(model, name, MaskedLinear.from_linear(linear, mask.to(linear.weight.device)))
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Replace every MaskedLinear by a plain nn.Linear with zeros where pruned (in place)."""
    for name, module in list(masked_modules(model)):
        set_module(model, name, module.to_linear())
    return model


@torch.no_grad()
def apply_masks_(pairs: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    """Zero every masked weight in one fused call (no per-module Python work in the training loop)."""
    weights, masks = pairs
    if weights:
        torch._foreach_mul_(weights, masks)


def mask_pairs(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights, masks as weight dtype) of every masked projection, for `apply_masks_`."""
    modules = [module for _, module in masked_modules(model)]
    return [m.weight for m in modules], [m.mask.to(m.weight.dtype) for m in modules]


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of every masked projection, by module name."""
    return {
        name: float((module.weight * module.mask == 0).float().mean())
        for name, module in masked_modules(model)
    }
