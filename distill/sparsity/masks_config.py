"""The masks' section of the config (`train.masks`): what moves the masks between optimizer steps
during distill (distill.sparsity.modes)."""

from __future__ import annotations

from dataclasses import dataclass

from distill.sections import Choice, Section, positive


class MaskMode(Choice):
    FIXED = "fixed"
    DYNAMIC = "dynamic"
    LEARNABLE = "learnable"


@dataclass
class MasksConfig(Section):
    """How the masks behave during distill (distill.sparsity.modes)."""

    KEY = "train.masks"

    # fixed: the prune stage's masks; dynamic: re-chosen (same pattern, by Wanda's score on the
    # current weights, |W| for a magnitude student) every `update_every` steps, gradients reaching
    # pruned weights through a sparse-refined STE; learnable: a Gumbel-softmax choice per group among
    # the N:M candidate patterns
    mode: MaskMode = MaskMode.FIXED  # how masks move while distill trains
    update_every: int = 10  # dynamic: steps between re-choosing the masks
    refine_decay: float = 2.0e-4  # dynamic: SR-STE pull of pruned weights towards zero
    # learnable: every group picks one of the C(m, n) candidate patterns through Gumbel-softmax logits,
    # initialised to favour the prune stage's choice by `init_logit`, trained at `lr`; the Gumbel noise
    # is scaled by `noise` at the first step, falling linearly to 0 at the last (0.5 at init 3.0
    # redraws ~1% of groups at the start; 1.0 redraws ~20%, which wrecked the student)
    lr: float = 0.05
    init_logit: float = 3.0  # learnable: the prune stage's pattern's lead in the logits
    gumbel_temperature: float = 1.0  # learnable: the Gumbel-softmax temperature
    noise: float = 0.5  # learnable: the Gumbel noise scale at the first step

    def check(self, where: str) -> None:
        positive(f"{where}.update_every", self.update_every)
        positive(f"{where}.refine_decay", self.refine_decay, allow_zero=True)
        positive(f"{where}.lr", self.lr)
        positive(f"{where}.gumbel_temperature", self.gumbel_temperature)
        positive(f"{where}.noise", self.noise, allow_zero=True)
