"""The attention-sparsity section of the config (`attention`), read by distill.sparsity.attention."""

from __future__ import annotations

from dataclasses import dataclass

from distill.sections import Choice, Section, positive, within


class HeadSelection(Choice):
    MASS = "mass"  # training-free: the KV heads whose attention falls most inside sink + window stream
    DISTILL = "distill"  # DuoAttention: a gate per KV head trained against the teacher, the lowest gates stream


@dataclass
class AttentionConfig(Section):
    """Attention sparsity (distill.sparsity.attention): a fraction of the student's KV heads attend
    only to the first `sink` tokens and the last `window` ones (StreamingLLM, DuoAttention). The heads
    are chosen in the prune stage, trained with in distill, and exported with the student."""

    KEY = "attention"

    streaming_fraction: float = 0.0  # of all KV heads, model-wide; 0 keeps every head full
    sink: int = 4  # first tokens every streaming head keeps (attention sinks)
    window: int = 256  # most recent tokens every streaming head keeps, the current one included
    select: HeadSelection = HeadSelection.MASS
    # select=distill: the gates' training on calibration text against the teacher (the student's
    # weights frozen): optimizer steps, blocks per step, AdamW learning rate, and the L1 weight that
    # pushes every gate towards streaming
    gate_steps: int = 20
    gate_batch_size: int = 2  # select=distill: blocks per gate-training step
    gate_lr: float = 0.02  # select=distill: the gates' learning rate
    gate_penalty: float = 0.05  # select=distill: weight of the penalty that pushes gates towards streaming
    measure_blocks: int = 4  # select=mass: calibration blocks the attention mass is measured on

    @property
    def enabled(self) -> bool:
        return self.streaming_fraction > 0

    def check(self, where: str) -> None:
        within(f"{where}.streaming_fraction", self.streaming_fraction, 0.0, 1.0, "[]")
        positive(f"{where}.sink", self.sink, allow_zero=True)
        positive(f"{where}.window", self.window)
        positive(f"{where}.gate_steps", self.gate_steps)
        positive(f"{where}.gate_batch_size", self.gate_batch_size)
        positive(f"{where}.gate_lr", self.gate_lr)
        positive(f"{where}.gate_penalty", self.gate_penalty, allow_zero=True)
        positive(f"{where}.measure_blocks", self.measure_blocks)
