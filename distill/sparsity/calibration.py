"""Activation statistics of the teacher on calibration text, for activation-aware pruning (Wanda).

For every target projection we accumulate the sum of squared inputs per input feature; the column
norm ||X_j||_2 is its square root. Ranks see different blocks and the sums are added across ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from torch import nn

from distill.targets import target_linears


@torch.no_grad()
def input_square_sums(
    model: nn.Module, blocks: torch.Tensor, targets: Sequence[str], accelerator: Accelerator, batch_size: int = 4,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """{module name: sum over calibration tokens of x_j^2, float64 [in_features]} plus "tokens"."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, linear in target_linears(model, targets, exclude):
        sums[name] = torch.zeros(linear.in_features, dtype=torch.float64, device=accelerator.device)

        def accumulate(module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += (x * x).sum(0)

        hooks.append(linear.register_forward_pre_hook(accumulate))
    mine = blocks[accelerator.process_index:: accelerator.num_processes]
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    try:
        for start in tqdm(range(0, len(mine), batch_size), desc="calibration", disable=not accelerator.is_main_process):
            batch = mine[start:start + batch_size].to(accelerator.device)
            model(input_ids=batch)
            tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
    reduced = {name: accelerator.reduce(total, "sum").cpu() for name, total in sums.items()}
    reduced["tokens"] = accelerator.reduce(tokens, "sum").cpu().reshape(1)
    return reduced


def wanda_score(weight: torch.Tensor, square_sums: torch.Tensor | None) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al., 2023) from a projection's input square sums; |W| without them."""
    score = weight.detach().abs().float()
    return score * square_sums.sqrt().to(score) if square_sums is not None else score


def calibration_blocks(train: torch.Tensor, count: int) -> torch.Tensor:
    """`count` training blocks evenly spread over all of them, so every source is represented."""
    picks = torch.linspace(0, len(train) - 1, min(count, len(train))).round().long().unique()
    return train[picks]
