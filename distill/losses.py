"""Distillation losses on logits. Every loss is a mean over token positions and computed in float32
whatever the logits' dtype, so bf16 autocast changes the inputs, not the arithmetic of the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.config import LossConfig


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over positions.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    vocab = student_logits.shape[-1]
    student_logp = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    per_position = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return per_position.mean() * temperature**2


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's prediction of the following token."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    config: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kd_weight * forward KL + lm_weight * next-token loss, and the parts (detached) for logging."""
    parts: dict[str, torch.Tensor] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if config.kd_weight:
        kd = forward_kl(student_logits, teacher_logits, config.temperature)
        total = total + config.kd_weight * kd
        parts["kd"] = kd.detach()
    if config.lm_weight:
        lm = next_token_loss(student_logits, input_ids)
        total = total + config.lm_weight * lm
        parts["lm"] = lm.detach()
    return total, parts
