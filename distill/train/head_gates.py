"""DuoAttention's head selection against the teacher (attention.select=distill): every KV head of the
student mixes full and streaming attention by a gate (distill.sparsity.attention.HeadGates, starting at
1, full), and only the gates train, on KL(teacher || student) + gate_penalty * mean(gate), the L1 push
towards streaming. distill.sparsity.head_selection.choose_streaming then streams the lowest gates.

The loop is the distill stage's own `DistillStep` (one micro-batch per step, no clipping) with the
teacher's side from `teacher_outputs` and the divergence from `distillation_loss`; what differs is the
objective (the gates passed to the student's forward, and the penalty) and the upkeep between steps
(the gates clamped back into [0, 1]).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from distill.losses import distillation_loss
from distill.sections import LossConfig
from distill.sparsity.attention_config import AttentionConfig
from distill.sparsity.attention import HeadGates, attention_modules, kv_head_count, registered_attention
from distill.train.objective import teacher_outputs
from distill.train.step import DistillStep, MicroBatch

# KL(teacher || student) at temperature 1 on full logits (the gated forward runs the whole model)
GATE_LOSS = LossConfig(kd_weight=1.0, lm_weight=0.0, chunk_tokens=0)


@dataclass
class GateTraining:
    """What select=distill learned: the gate of every KV head per module, and a row per step."""

    gates: dict[str, list[float]]
    history: list[dict] = field(default_factory=list)


class GateObjective(nn.Module):
    """The student with every KV head gated, and its loss: the divergence from the teacher plus the
    gates' L1 penalty (DistillStep's objective: `(input_ids, teacher side) -> (loss, parts)`)."""

    def __init__(self, student: nn.Module, gates: HeadGates, penalty: float):
        super().__init__()
        self.student, self.gates, self.penalty = student, gates, penalty

    def forward(self, input_ids: torch.Tensor, teacher: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(input_ids=input_ids, use_cache=False, head_gates=self.gates).logits
        kl, _ = distillation_loss(logits.float(), teacher["logits"].float(), input_ids, GATE_LOSS)
        mean_gate = self.gates.values.mean()
        return kl + self.penalty * mean_gate, {"kl": kl.detach(), "mean_gate": mean_gate.detach()}


class ClampGates:
    """DistillStep's upkeep between steps (what mask modes do for masks): the gates back into [0, 1]."""

    def __init__(self, gates: HeadGates):
        self.gates = gates

    def before_step(self, step: int, steps: int) -> None:
        pass

    def after_step(self, done: int) -> None:
        self.gates.clamp_()


@contextmanager
def frozen(model: nn.Module):
    """`model`'s parameters without gradients for the block, each back as it was after."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def train_gates(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, attention: AttentionConfig,
                accelerator: Accelerator, seed: int = 0) -> GateTraining:
    """Train a gate per KV head of `student` against `teacher` on random batches of `blocks`
    (attention.gate_* settings); the student is left as it came."""
    modules = attention_modules(student)
    device = next(student.parameters()).device
    gates = HeadGates([module.layer_idx for _, module in modules], kv_head_count(student), attention.sink,
                      attention.window, device)
    optimizer = torch.optim.AdamW([gates.values], lr=attention.gate_lr, weight_decay=0.0)
    step = DistillStep(accelerator, GateObjective(student, gates, attention.gate_penalty), optimizer, None,
                       [gates.values], ClampGates(gates), max_grad_norm=0.0)
    generator = torch.Generator().manual_seed(seed)
    history = []
    with registered_attention(student), frozen(student):
        for index in range(attention.gate_steps):
            chosen = torch.randint(len(blocks), (attention.gate_batch_size,), generator=generator)
            batch = _micro_batch(teacher, blocks[chosen].to(device))
            losses, _ = step(index, attention.gate_steps, [batch])
            history.append({"step": index + 1, "kl": float(losses["kl"]), "mean_gate": float(gates.values.detach().mean())})
    learned = {name: gates.of_layer(module.layer_idx).detach().cpu().tolist() for name, module in modules}
    return GateTraining(learned, history)


def _micro_batch(teacher: nn.Module, input_ids: torch.Tensor) -> MicroBatch:
    return MicroBatch(input_ids, lambda: teacher_outputs(teacher, input_ids, GATE_LOSS))
