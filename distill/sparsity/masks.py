"""Masked projections: a plain nn.Linear whose weight is read through a mask parametrization.

`install_masks` registers a parametrization (torch.nn.utils.parametrize) on each pruned projection's
`weight`: the trained tensor lives at `parametrizations.weight.original`, and every read of
`linear.weight` returns it through the projection's mask rule. The sparsity invariant, in every
setting (one process, DDP, FSDP, which shards `original` and gathers it before the rule runs): a
pruned weight gets exactly zero gradient, so no optimizer step can move it off zero.

The rules, each a small module with its own state dict:
  FixedMask      the stored weight as it is (zero where pruned) forward; the gradient times the mask
                 backward. No product in the forward: the stored pruned weights are zero already
                 (`install_masks` and the fixed masks' `finish` zero them, and a zero gradient keeps
                 them there), and a weight-sized product per projection per forward, three per
                 micro-batch under activation checkpointing, nearly doubled a 1B model's step on CPU
  RefinedMask    weight * mask forward; backward passes the gradient to pruned weights too and
                 pulls them towards zero (SR-STE), so a dynamic mask can move onto them
  LearnableMask  weight * a hard N:M mask drawn by Gumbel-softmax from per-group choice logits
  GroupDropout   stacked after the mask: drops whole groups of the pattern while training
The first parametrization of a projection is always its mask rule, which holds the current hard
`mask` (bool, True = kept; read it, and change it with `set_mask`); what changes the rule or the mask
during training is distill.sparsity.modes. Whoever puts a FixedMask on stored weights that are not
zero where pruned zeroes them (`zero_pruned_weights_`) before the next forward.

A rule stores its mask as bits (`bits`, uint8, eight weights per byte) and unpacks it where it is
needed: one bit per weight instead of a bool's byte, an eighth of a 1B model's 1 GB of masks. The
bits are replicated buffers: under FSDP every rank holds the whole packed mask of each projection
beside its shard of the weights.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes of eight entries each (the first entry in the lowest bit), flat,
    the last byte padded with False."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8)
    return (flat << _BIT_SHIFTS.to(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool tensor of `shape` that `pack_bits` packed into `bits`."""
    count = math.prod(shape)
    flat = (bits[:, None] >> _BIT_SHIFTS.to(bits.device)) & 1
    return (flat.reshape(-1)[:count] != 0).reshape(shape)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest-scoring entries of every group of `m` consecutive inputs (bool mask).

    Groups run along the input dimension: in a weight of shape [out, in], every run of M consecutive
    weights of one output row keeps N. That is the layout GPU 2:4 kernels (cuSPARSELt) accelerate."""
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


class MaskedGradient(torch.autograd.Function):
    """Forward: the weight as it is (a view, no copy). Backward: the gradient times the mask unpacked
    from `bits`, so the pruned weights get exactly zero gradient."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(bits)
        ctx.shape = shape
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (bits,) = ctx.saved_tensors
        return grad * unpack_bits(bits, ctx.shape), None, None


class FixedMask(nn.Module):
    """The stored weight, zero where pruned, read as it is; its pruned entries get exactly zero
    gradient (MaskedGradient). The mask is kept as bits."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.shape = tuple(mask.shape)
        self.register_buffer("bits", pack_bits(mask.to(torch.bool)))

    @property
    def mask(self) -> torch.Tensor:
        """The current hard mask (bool, True = kept): a fresh tensor, so change it with `set_mask`."""
        return unpack_bits(self.bits, self.shape)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """The rule's mask becomes `mask`. A FixedMask reads its stored weight as it is: weights this
        newly prunes must be zeroed (`zero_pruned_weights_`) before the next forward."""
        if tuple(mask.shape) != self.shape:
            raise ValueError(f"a mask of shape {tuple(mask.shape)} for a rule of shape {self.shape}")
        self.bits.copy_(pack_bits(mask.to(torch.bool)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before masks were packed hold the bool mask under `mask`
        unpacked = state_dict.pop(prefix + "mask", None)
        if unpacked is not None and prefix + "bits" not in state_dict:
            state_dict[prefix + "bits"] = pack_bits(unpacked)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return MaskedGradient.apply(weight, self.bits, self.shape)


class RefinedMask(FixedMask):
    """weight * mask forward; the gradient reaches pruned weights too (SparseRefinedSTE)."""

    def __init__(self, mask: torch.Tensor, decay: float):
        super().__init__(mask)
        self.decay = decay

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return SparseRefinedSTE.apply(weight, self.mask, self.decay)


class LearnableMask(FixedMask):
    """A choice per group of m weights among the candidate N:M patterns `candidates` [C, m], as
    logits [out, groups, C] initialised to favour the current mask by `init_logit`. Training draws a
    hard choice by Gumbel-softmax (noise scaled by `noise`; 0 takes the most likely candidate) and
    trains the logits straight-through; eval uses `mask`, which `settle` sets to the most likely."""

    def __init__(self, mask: torch.Tensor, candidates: torch.Tensor, init_logit: float, temperature: float,
                 noise: float):
        super().__init__(mask)
        self.register_buffer("candidates", candidates.to(device=mask.device), persistent=False)
        groups = mask.to(torch.bool).reshape(mask.shape[0], -1, candidates.shape[1])
        current = (groups[:, :, None, :] == self.candidates[None, None]).all(-1)  # [out, G, C]
        self.choice_logits = nn.Parameter(current.float() * init_logit)
        self.temperature, self.noise = temperature, noise

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return weight * self.mask
        return weight * self.sampled_mask().to(weight.dtype)

    def sampled_mask(self) -> torch.Tensor:
        """A hard N:M mask drawn by Gumbel-softmax from the choice logits; the gradient flows to the
        logits through the soft probabilities (straight-through)."""
        logits = self.choice_logits
        if self.noise > 0:
            logits = logits - torch.empty_like(logits).exponential_().log() * self.noise
        soft = torch.softmax(logits / self.temperature, dim=-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        choice = hard + soft - soft.detach()
        mask = choice @ self.candidates.to(choice.dtype)  # [out, groups, m]
        return mask.reshape(self.shape)

    @torch.no_grad()
    def settle(self) -> None:
        """`mask` becomes the most likely candidate of every group."""
        self.set_mask(self.candidates[self.choice_logits.argmax(-1)].reshape(self.shape))


class GroupDropout(nn.Module):
    """While training, drops each whole group of the pattern with probability `rate` and rescales the
    rest so the expected output is unchanged; `draw(shape, device)` gives the bool mask of kept groups."""

    def __init__(self, draw: Callable[..., torch.Tensor], rate: float):
        super().__init__()
        self.draw, self.rate = draw, rate

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return weight
        kept = self.draw(tuple(weight.shape), device=weight.device)
        return weight * kept / (1 - self.rate)


def is_masked(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight") \
        and isinstance(module.parametrizations.weight[0], FixedMask)


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, projection) of every masked projection, in module order."""
    for name, module in model.named_modules():
        if is_masked(module):
            yield name, module


def mask_rule(linear: nn.Linear) -> FixedMask:
    """The projection's mask rule (its first weight parametrization)."""
    return linear.parametrizations.weight[0]


def set_mask_rule(linear: nn.Linear, rule: FixedMask) -> None:
    """Replace the projection's mask rule (e.g. a fixed mask by a learnable one), keeping the rest."""
    linear.parametrizations.weight[0] = rule


def add_weight_rule(linear: nn.Linear, rule: nn.Module) -> None:
    """Stack `rule` after the mask (e.g. GroupDropout)."""
    parametrize.register_parametrization(linear, "weight", rule, unsafe=True)


def stored_weight(linear: nn.Linear) -> nn.Parameter:
    """The tensor the optimizer trains (zero where pruned unless a moving mask trains pruned weights)."""
    return linear.parametrizations.weight.original


def masked_weight(linear: nn.Linear) -> torch.Tensor:
    """The projection's weight under its mask alone (zeros where pruned, no dropout or sampling)."""
    return stored_weight(linear) * mask_rule(linear).mask


def install_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Put each named nn.Linear under a FixedMask with its mask, zeroing the pruned weights (in place).
    `unsafe`: the rules keep shape and dtype, so parametrize need not check by running them."""
    for name, mask in masks.items():
        linear = model.get_submodule(name)
        mask = mask.to(device=linear.weight.device, dtype=torch.bool)
        with torch.no_grad():
            linear.weight.mul_(mask)
        parametrize.register_parametrization(linear, "weight", FixedMask(mask), unsafe=True)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Every masked projection back to a plain nn.Linear holding weight * mask (zeros where pruned)."""
    for _, linear in list(masked_modules(model)):
        with torch.no_grad():
            final = masked_weight(linear)
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
        with torch.no_grad():
            linear.weight.copy_(final)
    return model


def plain_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters in the order the unmasked model lists them (each projection's weight
    before its bias), so what reduces over them in order (the gradient norm) is computed the same
    with masks as without."""
    ordered: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # listed with its projection
        if is_masked(module):
            ordered.append(stored_weight(module))
        ordered.extend(module._parameters.values())
    seen: set[int] = set()
    return [p for p in ordered if p is not None and not (id(p) in seen or seen.add(id(p)))]


@torch.no_grad()
def zero_pruned_weights_(model: nn.Module) -> None:
    """Zero every pruned weight of the stored tensors, one projection at a time (in place)."""
    for _, module in masked_modules(model):
        stored_weight(module).mul_(mask_rule(module).mask)


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of every masked projection, by module name."""
    return {name: float((masked_weight(module) == 0).float().mean())
            for name, module in masked_modules(model)}
