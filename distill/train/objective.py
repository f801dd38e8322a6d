"""What the distill stage optimizes: the student and its loss in one module, and the teacher's side
of the loss (live outputs or the cached top-k).
"""

from __future__ import annotations

import torch
from torch import nn

from distill.data.corpus import to_device
from distill.data.teacher_cache import TeacherCache
from distill.losses import (IDENTITY, LogitTransform, TopK, chunked_distillation_loss, distillation_loss,
                            hidden_state_matching)
from distill.sections import LossConfig
from distill.sparsity.masks import masked_modules, masked_weight
from distill.sparsity.patterns import Pattern


class DistillationObjective(nn.Module):
    """The student and its loss in one forward, so that DDP and FSDP see every use of the student's
    parameters (the output projection included) inside the wrapped module's forward."""

    def __init__(self, student: nn.Module, loss: LossConfig, pattern: Pattern, group_lasso: float = 0.0,
                 student_transform: LogitTransform = IDENTITY):
        super().__init__()
        self.student = student
        self.student_transform = student_transform  # what the head does after its projection (chunked loss)
        self.loss = loss
        self.pattern = pattern
        self.group_lasso = group_lasso

    def forward(self, input_ids: torch.Tensor, teacher: dict):
        want_states = self.loss.hidden_weight > 0
        want_logits = self.loss.kd_weight > 0 or self.loss.lm_weight > 0
        total, parts = torch.zeros((), device=input_ids.device), {}
        if self.loss.chunk_tokens:
            out = self.student.get_decoder()(input_ids=input_ids, use_cache=False, output_hidden_states=want_states)
            if want_logits:
                total, parts = chunked_distillation_loss(out.last_hidden_state, self.student.get_output_embeddings(),
                                                         teacher.get("hidden"), teacher.get("head"), input_ids, self.loss,
                                                         teacher_topk=teacher.get("topk"),
                                                         student_transform=self.student_transform,
                                                         teacher_transform=teacher.get("transform", IDENTITY))
        else:
            out = self.student(input_ids=input_ids, use_cache=False, output_hidden_states=want_states)
            if want_logits:
                total, parts = distillation_loss(out.logits, teacher.get("logits"), input_ids, self.loss,
                                                 teacher_topk=teacher.get("topk"))
        if want_states:
            matching = hidden_state_matching(out.hidden_states[1:], teacher["states"])
            total = total + self.loss.hidden_weight * matching
            parts["hidden"] = matching.detach()
        if self.group_lasso:
            lasso = sum(self.pattern.group_norms(masked_weight(module)).sum()
                        for _, module in masked_modules(self.student))
            total = total + self.group_lasso * lasso
            parts["group_lasso"] = lasso.detach()
        return total, parts


def teacher_outputs(teacher: nn.Module | None, input_ids: torch.Tensor, loss: LossConfig,
                    transform: LogitTransform = IDENTITY) -> dict:
    """What DistillationObjective needs of the teacher: its final hidden states and output projection
    for the chunked loss, full logits otherwise, and every layer's output for hidden-state matching."""
    if teacher is None:
        return {}
    want_states = loss.hidden_weight > 0
    if loss.chunk_tokens:
        out = teacher.get_decoder()(input_ids=input_ids, use_cache=False, output_hidden_states=want_states)
        result = {"hidden": out.last_hidden_state, "head": teacher.get_output_embeddings(),
                  "transform": transform}
    else:
        out = teacher(input_ids=input_ids, use_cache=False, output_hidden_states=want_states)
        result = {"logits": out.logits}
    result["states"] = out.hidden_states[1:] if want_states else None
    return result


def cached_teacher_outputs(cached: TeacherCache, blocks: torch.Tensor, device: torch.device) -> dict:
    """What DistillationObjective needs of a cached teacher: the top-k of these training blocks, read
    from the cache's shards."""
    topk = cached.blocks(blocks)
    return {"topk": TopK(*(to_device(part, device) if part is not None else None for part in topk))}
