"""Pruning criteria that need more than the weights: gradients (Taylor, Fisher) and second-order
reconstruction (SparseGPT). Each returns N:M masks for the target projections of a model.

  taylor     score |w * g| accumulated over calibration batches (first-order loss change)
  fisher     score sum g^2 * w^2: the diagonal-Fisher (OBD) saliency
  sparsegpt  Frantar & Alistarh (2023): layer by layer, each layer's inputs taken from the already
             pruned layers before it; columns pruned left to right with the optimal update of the
             remaining weights from the inverse Hessian of the layer inputs (H = X^T X)
Gradients come from the next-token loss of the dense model on calibration text, with the batches
shared across ranks and the sums added across ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from torch import nn

from distill.errors import DistillError
from distill.losses import next_token_loss
from distill.sparsity.masks import nm_mask
from distill.sparsity.prune_config import Criterion
from distill.targets import decoder_layers, shared_input_groups, target_linears


def gradient_saliency(model: nn.Module, blocks: torch.Tensor, targets: Sequence[str], accelerator: Accelerator,
                      kind: str, batch_size: int = 4, exclude: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """{projection name: saliency [out, in]} for kind taylor or fisher (a Criterion)."""
    kind = Criterion(kind)
    linears = dict(target_linears(model, targets, exclude))
    sums = {name: torch.zeros_like(linear.weight, dtype=torch.float32) for name, linear in linears.items()}
    model.requires_grad_(False)
    for linear in linears.values():
        linear.weight.requires_grad_(True)
    mine = blocks[accelerator.process_index:: accelerator.num_processes]
    for start in tqdm(range(0, len(mine), batch_size), desc=f"{kind} saliency", disable=not accelerator.is_main_process):
        batch = mine[start:start + batch_size].to(accelerator.device)
        loss = next_token_loss(model(input_ids=batch, use_cache=False).logits, batch)
        grads = torch.autograd.grad(loss, [linear.weight for linear in linears.values()])
        for (name, linear), grad in zip(linears.items(), grads):
            weight, grad = linear.weight.detach().float(), grad.float()
            sums[name] += (weight * grad).abs() if kind is Criterion.TAYLOR else grad.square() * weight.square()
    model.requires_grad_(False)
    return {name: accelerator.reduce(total, "sum") for name, total in sums.items()}


class _StopForward(Exception):
    pass


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    found = decoder_layers(model)
    if found is None:
        raise DistillError(f"{type(model).__name__}: no list of decoder layers found for layer-by-layer pruning")
    return found[1]


@torch.no_grad()
def _first_layer_inputs(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first decoder layer receives for each calibration batch."""
    layer = _decoder_layers(model)[0]
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    hook = layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(blocks), batch_size):
            try:
                model(input_ids=blocks[start:start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        hook.remove()
    return captured


def _with_hidden(args: tuple, kwargs: dict, output) -> tuple[tuple, dict]:
    """The next layer's (args, kwargs): this layer's output as hidden states, the rest unchanged."""
    hidden = output[0] if isinstance(output, tuple) else output
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def sparsegpt_nm(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, block_size: int = 128,
                 damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [out, in] to N:M given H = sum x x^T [in, in]: (updated weight, bool mask)."""
    block_size = m * max(1, block_size // m)  # column blocks hold whole groups of m
    weight = weight.detach().double().clone()
    hessian = hessian.double().clone()
    columns = weight.shape[1]
    dead = torch.diag(hessian) == 0  # inputs never active: their weights cannot matter
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += damp * torch.mean(torch.diag(hessian)) * torch.eye(columns, dtype=hessian.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for first in range(0, columns, block_size):
        last = min(first + block_size, columns)
        block = weight[:, first:last].clone()
        errors = torch.zeros_like(block)
        block_inverse = inverse[first:last, first:last]
        for i in range(last - first):
            column = block[:, i]
            diagonal = block_inverse[i, i]
            if i % m == 0:  # choose the group's mask with the current (updated) weights
                group = block[:, i:i + m] ** 2 / torch.diag(block_inverse)[i:i + m] ** 2
                mask[:, first + i:first + i + m] = nm_mask(group, n, m)
            kept = column * mask[:, first + i]
            error = (column - kept) / diagonal
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            block[:, i] = kept
            errors[:, i] = error
        weight[:, first:last] = block
        weight[:, last:] -= errors @ inverse[first:last, last:]
    return (weight * mask), mask


@torch.no_grad()
def sparsegpt_masks(model: nn.Module, blocks: torch.Tensor, targets: Sequence[str], n: int, m: int,
                    batch_size: int = 4, skip: set[str] = frozenset(), exclude: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Prune `model` in place, one decoder layer at a time; returns {projection name: bool mask}."""
    selected = {name for name, _ in target_linears(model, targets, exclude)} - set(skip)
    layers = _decoder_layers(model)
    inputs = _first_layer_inputs(model, blocks, batch_size)
    prefix = {id(layer): name for name, layer in model.named_modules() if any(layer is l for l in layers)}
    masks = {}
    for layer in tqdm(layers, desc="sparsegpt"):
        linears = {name: linear for name, linear in layer.named_modules() if f"{prefix[id(layer)]}.{name}" in selected}
        groups = shared_input_groups(layer, linears, inputs[0])
        grouped = {name for names in groups for name in names}
        groups += [[name] for name in linears if name not in grouped]  # never called: a group of its own
        hessians = [torch.zeros(linears[names[0]].in_features, linears[names[0]].in_features, dtype=torch.float64)
                    for names in groups]

        def accumulate(args, index):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            hessians[index] += x.T @ x

        hooks = [linears[names[0]].register_forward_pre_hook(lambda module, args, index=index: accumulate(args, index))
                 for index, names in enumerate(groups)]
        for args, kwargs in inputs:
            layer(*args, **kwargs)
        for hook in hooks:
            hook.remove()
        for names, hessian in zip(groups, hessians):
            # rows are pruned independently under one shared Hessian: projections that read the same
            # input (q/k/v, gate/up) go through one sweep, stacked, with the same result as one by one
            stacked = torch.cat([linears[name].weight for name in names])
            pruned, mask = sparsegpt_nm(stacked, hessian, n, m)
            sizes = [linears[name].out_features for name in names]
            for name, weight, part in zip(names, pruned.split(sizes), mask.split(sizes)):
                linears[name].weight.copy_(weight.to(linears[name].weight.dtype))
                masks[f"{prefix[id(layer)]}.{name}"] = part
        # the next layer sees this layer's pruned outputs
        inputs = [_with_hidden(args, kwargs, layer(*args, **kwargs)) for args, kwargs in inputs]
    return masks
