"""The activation-sparsity section of the config (`activations`), read by distill.sparsity.activations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from distill.errors import DistillError
from distill.sections import Choice, Section, positive, within


class Allocation(Choice):
    UNIFORM = "uniform"  # every projection input zeroed at the target fraction
    GREEDY = "greedy"  # TEAL: per layer, the inputs whose sparsity costs the layer's output least go further


@dataclass
class ActivationsConfig(Section):
    """Activation sparsity (distill.sparsity.activations): projection inputs below a calibrated
    magnitude become zero in the student, thresholds calibrated on the one-shot student in the prune
    stage, trained under in distill, and exported with the packed student."""

    KEY = "activations"

    target: float = 0.0  # fraction of projection inputs zeroed, model-wide; 0 keeps activations dense
    allocation: Allocation = Allocation.UNIFORM
    # which projection inputs: names or globs of the projections reading them, matched as prune.targets
    # (a shared input, like q/k/v's, is thresholded when any of its projections is named)
    where: List[str] = field(default_factory=lambda: ["*"])
    greedy_step: float = 0.1  # greedy: how much sparsity one step of the allocation adds to one input
    # greedy: calibration blocks the layer output error is measured on (0: all of them). Every step
    # of the allocation runs each layer once per input over them, so they set its cost: all 32 blocks
    # of 256 tokens took over 40 minutes on 2 CPU cores for the demo teacher
    greedy_blocks: int = 0
    straight_through: bool = False  # distill: gradients reach the zeroed entries too, as if kept
    recalibrate_every: int = 0  # distill: re-calibrate the thresholds to the moving student every k steps; 0 keeps them
    # distill: each input's zeroed fraction rises linearly from 0 to its allocation over the first k
    # steps, moved at each re-calibration (so it needs recalibrate_every); 0 trains at the allocation from the start
    ramp_steps: int = 0

    @property
    def enabled(self) -> bool:
        return self.target > 0

    def check(self, where: str) -> None:
        within(f"{where}.target", self.target, 0.0, 1.0, "[)")
        within(f"{where}.greedy_step", self.greedy_step, 0.0, 1.0, "(]")
        positive(f"{where}.greedy_blocks", self.greedy_blocks, allow_zero=True)
        positive(f"{where}.recalibrate_every", self.recalibrate_every, allow_zero=True)
        positive(f"{where}.ramp_steps", self.ramp_steps, allow_zero=True)
        if self.ramp_steps and not self.recalibrate_every:
            raise DistillError(f"config key '{where}.ramp_steps': the ramp moves the thresholds when they are "
                               f"re-calibrated; set {where}.recalibrate_every too")
        if not self.where:
            raise DistillError(f"config key '{where}.where': name at least one projection input (\"*\" for all)")
