"""How masks behave during distillation (`train.masks.mode`), each mode one small class that sets the
projections' mask rules (distill.sparsity.masks) and keeps them up between optimizer steps.

  FixedMasks      the prune stage's masks, unchanged
  DynamicMasks    re-chosen from the current weights (Wanda's score, or |W|) under the student's
                  pattern every k steps; pruned weights keep training through the sparse-refined STE
  LearnableMasks  a Gumbel-softmax choice per group among the C(m, n) candidate N:M patterns,
                  trained straight-through, the sampling noise annealed to none by the end

Every mode has the same four calls: `parameters()` (extra trainable tensors, with their learning
rate), `before_step(step, steps)`, `after_step(done)` and `finish(student)`, which leaves fixed masks
with the pruned weights zeroed for good. The masks are the rules' buffers (as bits), so checkpoints carry
them. Moving masks start from the teacher's values under the pruned positions
(`revive_pruned_weights`): the prune stage zeroed them, and a mask that moves onto a zero weight
could only lose.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from distill.sparsity.calibration import wanda_score
from distill.sparsity.masks_config import MaskMode, MasksConfig
from distill.sparsity.masks import (FixedMask, GroupDropout, LearnableMask, RefinedMask, add_weight_rule, mask_rule,
                                    masked_modules, set_mask_rule, stored_weight, zero_pruned_weights_)
from distill.sparsity.patterns import Pattern


@torch.no_grad()
def revive_pruned_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Put the teacher's weights back under every pruned position of the student's masked
    projections (the kept ones stay as trained or pruned); the masked function is unchanged, since
    moving rules multiply by their mask. Returns how many weights were revived."""
    revived = 0
    for name, module in masked_modules(student):
        if type(mask_rule(module)) is FixedMask:  # it reads the stored weights as they are
            raise ValueError(f"{name} has a fixed mask, whose pruned weights must stay zero: set a moving "
                             "mask rule before reviving them")
        mask, weight = mask_rule(module).mask, stored_weight(module)
        dense = teacher.get_submodule(name).weight.to(weight.dtype)
        weight.copy_(torch.where(mask, weight, dense))
        revived += int((~mask).sum())
    return revived


class FixedMasks:
    """The prune stage's masks: nothing moves (the rules give pruned weights zero gradient, so they stay zero)."""

    def parameters(self) -> list[nn.Parameter]:
        return []

    def before_step(self, step: int, steps: int) -> None:
        pass

    def after_step(self, done: int) -> None:
        pass

    def finish(self, student: nn.Module) -> None:
        """Plain fixed masks on every projection (no moving rule, no dropout), with the pruned weights
        zeroed for good (they are zero already unless a mode trained them)."""
        for _, module in masked_modules(student):
            rules = module.parametrizations.weight
            while len(rules) > 1:
                del rules[len(rules) - 1]
            if type(rules[0]) is not FixedMask:
                set_mask_rule(module, FixedMask(rules[0].mask))
        zero_pruned_weights_(student)


class DynamicMasks(FixedMasks):
    """Every `every` steps each projection's mask is re-chosen from its current weights under the
    student's pattern, by Wanda's score when the projection's input square sums are given
    (`square_sums`: {projection name: sum of x_j^2}, so a re-choice does not fall back to magnitude
    pruning), else by |W|; between updates pruned weights keep training through the SR-STE."""

    def __init__(self, student: nn.Module, pattern: Pattern, every: int, decay: float,
                 square_sums: dict[str, torch.Tensor] | None = None):
        named = list(masked_modules(student))
        self.modules = [module for _, module in named]
        self.square_sums = [(square_sums or {}).get(name) for name, _ in named]
        self.pattern, self.every = pattern, every
        for module in self.modules:
            set_mask_rule(module, RefinedMask(mask_rule(module).mask, decay))

    @torch.no_grad()
    def after_step(self, done: int) -> None:
        if done % self.every == 0:
            for module, sums in zip(self.modules, self.square_sums):
                mask_rule(module).set_mask(self.pattern.mask(wanda_score(stored_weight(module), sums)))


class LearnableMasks(FixedMasks):
    """Each group of m weights of a projection holds logits over the C(m, n) candidate patterns (6
    for 2:4), initialised to favour the prune stage's mask; forward draws a hard choice by
    Gumbel-softmax and trains the logits straight-through. The masks follow the most likely
    candidates after every step; at the end they become the fixed masks.

    The Gumbel noise explores other candidates. A group whose logits favour its choice by `gap` is
    redrawn with probability (C - 1) / (e^(gap / noise) + C - 1): at full noise and the default
    init_logit 3.0 that is about 20% of 2:4 groups at every forward, which on the demo teacher left
    the distillation loss at 6.2 after 5 steps, against 1.3 with fixed masks (benchmarks/RESULTS.md).
    So the noise is scaled (`noise`, 0.5 by default: ~1% of groups) and falls linearly to 0 at the
    last step (`before_step`), where the weights finish training under the mask that is exported."""

    def __init__(self, student: nn.Module, pattern: Pattern, init_logit: float, temperature: float,
                 noise: float = 0.5, lr: float = 0.05):
        n, m = pattern.n, pattern.m
        candidates = torch.tensor([[index in chosen for index in range(m)]
                                   for chosen in itertools.combinations(range(m), n)], dtype=torch.bool)
        self.modules = [module for _, module in masked_modules(student)]
        self.rules = []
        for module in self.modules:
            rule = LearnableMask(mask_rule(module).mask, candidates, init_logit, temperature, noise)
            set_mask_rule(module, rule)
            self.rules.append(rule)
        self.noise, self.lr = noise, lr

    def before_step(self, step: int, steps: int) -> None:
        """Set the noise for `step` (0-based) of `steps`: full at the first, none at the last. A
        function of the step alone, so a resumed run draws with the same scale as an uninterrupted one."""
        for rule in self.rules:
            rule.noise = self.noise * (1 - step / max(steps - 1, 1))

    def parameters(self) -> list[nn.Parameter]:
        return [rule.choice_logits for rule in self.rules]

    def after_step(self, done: int) -> None:
        for rule in self.rules:
            rule.settle()

    def finish(self, student: nn.Module) -> None:
        self.after_step(0)
        super().finish(student)


def add_group_dropout(student: nn.Module, pattern: Pattern, rate: float) -> None:
    """Stack structured dropout of the pattern's groups after every projection's mask."""
    for _, module in masked_modules(student):
        add_weight_rule(module, GroupDropout(lambda shape, device: pattern.dropout_mask(shape, rate, device), rate))


def mask_upkeep(config: MasksConfig, student: nn.Module, pattern: Pattern,
                square_sums: dict[str, torch.Tensor] | None = None) -> FixedMasks:
    """The mode `config.mode` on `student` (for dynamic masks, re-chosen by Wanda's score when the
    projections' input square sums are given)."""
    if config.mode is MaskMode.DYNAMIC:
        return DynamicMasks(student, pattern, config.update_every, config.refine_decay, square_sums)
    if config.mode is MaskMode.LEARNABLE:
        return LearnableMasks(student, pattern, config.init_logit, config.gumbel_temperature, config.noise, config.lr)
    return FixedMasks()
