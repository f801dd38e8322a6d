"""Distillation losses. Every loss is a mean over token positions, computed in float32 whatever the
inputs' dtype, so bf16 autocast changes the inputs, not the arithmetic of the loss.

Two ways to the same number:
  distillation_loss          from full logits (simple; the reference)
  chunked_distillation_loss  from the final hidden states and the output projections, a chunk of
                             positions at a time, each chunk recomputed in backward: no batch-sized
                             logits tensor ever exists (the vocabulary is most of the memory of a
                             small model's step)

The teacher comes either live (its logits, or its hidden states and output projection) or from the
teacher_logits stage's cache: its k most likely tokens per position with their log-probabilities
(`TopK`). A cached teacher is compared on k + 1 outcomes, the k tokens and "any other token", for
teacher and student alike (`topk_divergence`); coarse-graining never increases a divergence, so this
is a lower bound of the full one, equal to it when the teacher's tail is empty.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distill.errors import DistillError
from distill.sections import Divergence, LossConfig

IGNORE = -100


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence | str, temperature: float,
               beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence [rows] between teacher and student at `temperature`, times T^2
    (which keeps gradient magnitudes comparable across temperatures, Hinton et al. 2015).

    forward_kl: KL(teacher || student)   reverse_kl: KL(student || teacher)
    jsd:        beta * KL(teacher || mix) + (1 - beta) * KL(student || mix), mix = beta*teacher + (1-beta)*student
    """
    kind = Divergence(kind)
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind is Divergence.FORWARD_KL:
        value = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    elif kind is Divergence.REVERSE_KL:
        value = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    else:  # Divergence.JSD
        mix_logp = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0)
        value = (beta * (teacher_logp.exp() * (teacher_logp - mix_logp)).sum(-1)
                 + (1 - beta) * (student_logp.exp() * (student_logp - mix_logp)).sum(-1))
    return value * temperature**2


class LogitTransform(NamedTuple):
    """What a model's output head does after its projection, as transformers' forward does it:
    Cohere's `logit_scale` multiplies, Granite's `logits_scaling` divides, Gemma-2's
    `final_logit_softcapping` squashes with cap * tanh(logits / cap). The chunked loss applies
    the projection itself, so it applies this too."""

    multiply: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiply != 1.0:
            logits = logits * self.multiply
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


IDENTITY = LogitTransform()


@torch.no_grad()
def logit_transform(model: torch.nn.Module) -> LogitTransform:
    """What `model`'s head does after its projection, read from its config and confirmed on a probe
    (a config key alone does not say that the model's forward applies it): the transform that maps
    head(decoder output) to the model's logits. None fits: refused, since the chunked loss could
    not reproduce the model's logits."""
    config = model.config
    multiply = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    candidates = dict.fromkeys([LogitTransform(multiply, float(softcap) if softcap else None),
                                LogitTransform(1.0, float(softcap) if softcap else None), LogitTransform(multiply), IDENTITY])
    head = model.get_output_embeddings()
    probe = torch.arange(2, 6, device=head.weight.device)[None] % head.weight.shape[0]
    training = model.training
    model.eval()
    try:
        logits = model(input_ids=probe, use_cache=False).logits.float()
        projected = head(model.get_decoder()(input_ids=probe, use_cache=False).last_hidden_state).float()
    finally:
        model.train(training)
    # rounding of the model's dtype (at least float32's, where both sides are compared) on logits of
    # this size; the candidates differ by far more (a soft cap bends large logits by tens of percent)
    precision = max(torch.finfo(head.weight.dtype).eps, torch.finfo(torch.float32).eps)
    tolerance = 8 * precision * (float(logits.abs().max()) + 1e-6)
    for candidate in candidates:
        if float((candidate(projected) - logits).abs().max()) <= tolerance:
            return candidate
    raise DistillError(f"{type(model).__name__}'s output head does more than its projection and known scalings "
                       f"(logit_scale, logits_scaling, final_logit_softcapping); set train.loss.chunk_tokens=0")


class TopK(NamedTuple):
    """The teacher's k most likely tokens per position: log-probabilities [..., k] and token ids [..., k]
    (in any order), and optionally `rest` [...], the log of the mass of all other tokens, where it is
    known more exactly than 1 - the sum of the k (a cache whose log-probabilities are quantized)."""

    logp: torch.Tensor
    index: torch.Tensor
    rest: torch.Tensor | None = None

    def rows(self, rows: slice | None = None) -> "TopK":
        k = self.logp.shape[-1]
        logp, index = self.logp.reshape(-1, k), self.index.reshape(-1, k)
        rest = self.rest.reshape(-1) if self.rest is not None else None
        if rows is None:
            return TopK(logp, index, rest)
        return TopK(logp[rows], index[rows], rest[rows] if rest is not None else None)


def other_tokens_logp(top_logp: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probabilities -> [...]: log(1 - their mass), the log mass of every other outcome
    (a sliver kept when the k hold it all)."""
    mass = top_logp.exp().sum(-1).clamp(max=1 - 1e-6)
    return torch.log1p(-mass)


def _with_tail(top_logp: torch.Tensor, rest: torch.Tensor | None = None) -> torch.Tensor:
    """[..., k] log-probabilities of k outcomes -> [..., k + 1] with "everything else" last (its log
    mass `rest` [...] when given, else 1 - the k's)."""
    rest = other_tokens_logp(top_logp) if rest is None else rest.to(top_logp.dtype)
    return torch.cat([top_logp, rest.unsqueeze(-1)], dim=-1)


def topk_divergence(student_logits: torch.Tensor, teacher: TopK, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence [rows] between the cached teacher and the student (logits [rows, vocab])
    on the teacher's k tokens plus one outcome for all the others; at temperature 1."""
    student_logp = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher.index.long())
    return divergence(_with_tail(student_logp), _with_tail(teacher.logp.float(), teacher.rest), kind, 1.0, beta)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over positions."""
    vocab = student_logits.shape[-1]
    return divergence(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), Divergence.FORWARD_KL, temperature).mean()


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Each position's next token; the last position of every sequence has none (IGNORE)."""
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's prediction of the following token."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    config: LossConfig,
    teacher_topk: TopK | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kd_weight * divergence + lm_weight * next-token loss, and the parts (detached) for logging.
    The teacher is `teacher_logits`, or the cached `teacher_topk` when given."""
    parts: dict[str, torch.Tensor] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if config.kd_weight:
        vocab = student_logits.shape[-1]
        if teacher_topk is not None:
            kd = topk_divergence(student_logits.reshape(-1, vocab), teacher_topk.rows(), config.divergence,
                                 config.jsd_beta).mean()
        else:
            kd = divergence(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                            config.divergence, config.temperature, config.jsd_beta).mean()
        total = total + config.kd_weight * kd
        parts["kd"] = kd.detach()
    if config.lm_weight:
        lm = next_token_loss(student_logits, input_ids)
        total = total + config.lm_weight * lm
        parts["lm"] = lm.detach()
    return total, parts


def _chunk_sums(student_hidden, teacher_hidden, student_weight, student_bias, teacher_weight, teacher_bias,
                topk_logp, topk_index, topk_rest, targets, kind: str, temperature: float, beta: float, with_kd: bool,
                with_lm: bool, student_transform: LogitTransform, teacher_transform: LogitTransform) -> torch.Tensor:
    """[sum of divergences, sum of token losses] over one chunk of positions."""
    student_logits = student_transform(F.linear(student_hidden, student_weight, student_bias).float())
    zero = student_logits.new_zeros(())
    kd = zero
    if with_kd and topk_logp is not None:
        kd = topk_divergence(student_logits, TopK(topk_logp, topk_index, topk_rest), kind, beta).sum()
    elif with_kd:
        teacher_logits = teacher_transform(F.linear(teacher_hidden, teacher_weight, teacher_bias).float())
        kd = divergence(student_logits, teacher_logits, kind, temperature, beta).sum()
    lm = F.cross_entropy(student_logits, targets, ignore_index=IGNORE, reduction="sum") if with_lm else zero
    return torch.stack([kd, lm])


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.nn.Module | None,
    input_ids: torch.Tensor,
    config: LossConfig,
    teacher_topk: TopK | None = None,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same loss as `distillation_loss(student_head(student_hidden), teacher_head(teacher_hidden), ...)`
    (or with the cached `teacher_topk` in place of the teacher's hidden states and head), computed
    `config.chunk_tokens` positions at a time; each chunk's logits are recomputed in backward
    (activation checkpointing) instead of being stored. `*_transform`: what each model's head does
    after its projection (`logit_transform(model.config)`)."""
    hidden_size = student_hidden.shape[-1]
    student_rows = student_hidden.reshape(-1, hidden_size)
    targets = next_token_targets(input_ids).reshape(-1)
    with_kd, with_lm = bool(config.kd_weight), bool(config.lm_weight)
    live_teacher = with_kd and teacher_topk is None
    teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if live_teacher else None
    teacher_weight = teacher_head.weight if live_teacher else None
    teacher_bias = getattr(teacher_head, "bias", None) if live_teacher else None
    cached = teacher_topk.rows() if with_kd and teacher_topk is not None else None
    sums = student_rows.new_zeros(2, dtype=torch.float32)
    for start in range(0, student_rows.shape[0], config.chunk_tokens):
        rows = slice(start, start + config.chunk_tokens)
        sums = sums + checkpoint(
            _chunk_sums, student_rows[rows], teacher_rows[rows] if live_teacher else None,
            student_head.weight, getattr(student_head, "bias", None), teacher_weight, teacher_bias,
            cached.logp[rows] if cached is not None else None,
            cached.index[rows] if cached is not None else None,
            cached.rest[rows] if cached is not None and cached.rest is not None else None, targets[rows],
            config.divergence, config.temperature, config.jsd_beta, with_kd, with_lm, student_transform,
            teacher_transform, use_reentrant=False,
        )
    parts: dict[str, torch.Tensor] = {}
    total = sums.new_zeros(())
    if with_kd:
        kd = sums[0] / student_rows.shape[0]
        total = total + config.kd_weight * kd
        parts["kd"] = kd.detach()
    if with_lm:
        lm = sums[1] / (targets != IGNORE).sum()
        total = total + config.lm_weight * lm
        parts["lm"] = lm.detach()
    return total, parts


def hidden_state_matching(student_states, teacher_states) -> torch.Tensor:
    """Mean over layers of ||h_student - h_teacher||^2 / ||h_teacher||^2 (normalized MSE of every
    decoder layer's output; student and teacher must have the same depth and width)."""
    if len(student_states) != len(teacher_states):
        raise ValueError(f"hidden-state matching needs equal depth, got {len(student_states)} and {len(teacher_states)} layers")
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for s, t in zip(student_states, teacher_states)]
    return torch.stack(terms).mean()
