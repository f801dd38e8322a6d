"""Channel permutation for N:M sparsity: reorder a layer's input channels so the N:M mask keeps more
of what matters, where the reorder leaves the model's function unchanged.

N:M groups run along a projection's inputs, so which weights compete inside a group depends on the
order of the input channels. In a gated MLP, down(act(gate(x)) * up(x)), the intermediate channels
can be permuted freely: permuting the rows of gate_proj and up_proj and the columns of down_proj by
the same permutation computes exactly the same function, and changes down_proj's groups (Pool and Yu,
"Channel Permutations for N:M Sparsity", NeurIPS 2021).

The search is a local search over pairs of groups: every sweep pairs the groups at random and, for
each pair, tries every way of splitting its 2M columns into two groups (35 for M = 4, 6435 for M = 8,
so a 4:8 sweep costs about 400 times a 2:4 one), keeping the
split whose N:M mask keeps the highest total score. The current split is among the candidates, so
the kept score never decreases; all pairs of a sweep are evaluated at once as tensor operations.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def kept_score(scores: torch.Tensor, n: int, m: int) -> float:
    """Total score an N:M mask keeps: the n largest of every group of m consecutive columns."""
    rows, cols = scores.shape
    return float(scores.reshape(rows, cols // m, m).topk(n, dim=-1).values.sum())


def _splits(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every split of 2m positions into two groups of m, position 0 always in the first."""
    first = [c for c in itertools.combinations(range(2 * m), m) if 0 in c]
    second = [[p for p in range(2 * m) if p not in c] for c in first]
    return torch.tensor(first), torch.tensor(second)


@torch.no_grad()
def nm_channel_permutation(scores: torch.Tensor, n: int, m: int, sweeps: int, seed: int = 0,
                           max_elements: int = 1 << 26) -> torch.Tensor:
    """A permutation `perm` of the columns of `scores` [rows, cols] such that the N:M mask of
    `scores[:, perm]` keeps at least as much total score as that of `scores`."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns do not split into groups of {m}")
    groups = cols // m
    first, second = _splits(m)
    first, second = first.to(scores.device), second.to(scores.device)
    perm = torch.arange(cols, device=scores.device)
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, max_elements // (rows * len(first) * m))  # group pairs evaluated at once
    for _ in range(sweeps if groups > 1 else 0):
        order = torch.randperm(groups, generator=generator).to(scores.device)
        pairs = order[:groups // 2 * 2].reshape(-1, 2)
        by_group = perm.reshape(groups, m)
        for start in range(0, len(pairs), chunk):
            pair = pairs[start:start + chunk]
            columns = by_group[pair].reshape(len(pair), 2 * m)  # [P, 2m] column ids
            values = scores[:, columns]  # [rows, P, 2m]
            kept = (values[:, :, first].topk(n, dim=-1).values.sum(-1)
                    + values[:, :, second].topk(n, dim=-1).values.sum(-1)).sum(0)  # [P, splits]
            best = kept.argmax(-1)
            regrouped = torch.cat([columns.gather(1, first[best]), columns.gather(1, second[best])], dim=1)
            by_group[pair.reshape(-1)] = regrouped.reshape(-1, m)
    return perm


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MLP with gate_proj, up_proj and down_proj linears (Llama, Mistral,
    Qwen, Gemma and the like)."""
    return [(name, module) for name, module in model.named_modules()
            if all(isinstance(getattr(module, part, None), nn.Linear) for part in ("gate_proj", "up_proj", "down_proj"))]


@torch.no_grad()
def permute_mlp_channels(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the intermediate channels of a gated MLP in place (its function is unchanged)."""
    for producer in (mlp.gate_proj, mlp.up_proj):
        producer.weight.copy_(producer.weight[perm])
        if producer.bias is not None:
            producer.bias.copy_(producer.bias[perm])
    mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
