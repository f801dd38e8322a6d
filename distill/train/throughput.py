"""Throughput accounting for the distill step: FLOP per token, the device's measured peak, MFU.

FLOP per token follows nanoGPT's count (after Kaplan et al. and the PaLM paper's appendix B): a
model that trains costs 6N + 12·L·H·Q·T per token, one that only runs forward 2N + 4·L·H·Q·T. N is
the parameters that take part in matrix products: every parameter once (a tied embedding and output
head once), less the embedding tables that are only looked up (an untied input embedding, position
embeddings). L layers, H query heads of Q dims, T positions of context: the attention scores and the
weighted sum are 2·H·Q·T multiply-adds each per layer and token in forward, and backward doubles
forward. A distill step costs the student's training count plus the teacher's forward count. The
zeros of the sparse student are counted as work: MFU measures how well the hardware is used for
the dense-equivalent work, the way dense training's MFU is usually stated.
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


def matmul_parameter_count(model: nn.Module) -> int:
    """N of the FLOP count: unique parameters less embedding tables that are only looked up."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lookups = {id(module.weight): module.weight.numel() for module in model.modules()
               if isinstance(module, nn.Embedding) and (head is None or module.weight is not head.weight)}
    return parameter_count(model) - sum(lookups.values())


def attention_dims(model: nn.Module) -> int:
    """L·H·Q: decoder layers x query heads x head dim."""
    from distill.targets import decoder_layers

    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    found = decoder_layers(model)
    layers = len(found[1]) if found is not None else config.num_hidden_layers
    return layers * heads * head_dim


def flops_per_token(student: nn.Module, teacher: nn.Module | None, context: int) -> int:
    """FLOP per trained token of a distill step at `context` positions: the student forward and
    backward, the teacher (when it runs) forward only."""
    flops = 6 * matmul_parameter_count(student) + 12 * attention_dims(student) * context
    if teacher is not None:
        flops += 2 * matmul_parameter_count(teacher) + 4 * attention_dims(teacher) * context
    return flops


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
