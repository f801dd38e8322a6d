"""Throughput accounting for the distill step: FLOP per token, the device's measured peak, MFU.

FLOP per token follows the usual dense-transformer count (Kaplan et al.): 6 x parameters for a model
that trains (forward + backward) and 2 x parameters for one that only runs forward, so a distill
step costs 6 x student + 2 x teacher parameters per token. Attention's sequence-length term and the
zeros of the sparse student are not counted: MFU measures how well the hardware is used for the
dense-equivalent work, the way the baseline in issue #5 is stated.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def parameter_count(model: nn.Module | None) -> int:
    """Parameters of `model`, each shared (tied) tensor once; 0 for no model."""
    if model is None:
        return 0
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(student: nn.Module, teacher: nn.Module | None) -> int:
    return 6 * parameter_count(student) + 2 * parameter_count(teacher)


@torch.no_grad()
def measured_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of a large square matrix product on `device` in `dtype`: the ceiling MFU is taken
    against (the datasheet's number is a lead, not what the card reaches)."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    repeats, started = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)
