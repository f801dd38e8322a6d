"""How masks behave during distillation besides staying fixed.

  DynamicMasks    re-chosen from the current weights (Wanda's score, or |W|) under the student's
                  pattern every k steps; pruned weights keep training through the sparse-refined
                  STE (distill.sparsity.SparseRefinedSTE)
  LearnableMasks  a Gumbel-softmax choice per group among the C(m, n) candidate N:M patterns,
                  trained straight-through, the sampling noise annealed to none by the end
Either way the masks are the projections' `mask` buffers, so checkpoints carry them, and `finish`
turns them back into fixed masks with the pruned weights zeroed for good. Both start from the
teacher's values under the pruned positions (`revive_pruned_weights`): the prune stage zeroed them,
and a mask that moves onto a zero weight could only lose.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from distill.calibration import wanda_score
from distill.patterns import Pattern
from distill.sparsity import apply_masks_, mask_pairs, masked_modules


@torch.no_grad()
def revive_pruned_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Put the teacher's weights back under every pruned position of the student's masked
    projections (the kept ones stay as trained or pruned); the masked function is unchanged.
    Returns how many weights were revived."""
    revived = 0
    for name, module in masked_modules(student):
        dense = teacher.get_submodule(name).weight.to(module.weight.dtype)
        module.weight.copy_(torch.where(module.mask, module.weight, dense))
        revived += int((~module.mask).sum())
    return revived


class DynamicMasks:
    """Dynamic masks: every `every` steps each projection's mask is re-chosen from its current
    weights under the student's pattern, by Wanda's score when the projection's input square sums
    are given (`square_sums`: {projection name: sum of x_j^2}, so a re-choice does not fall back to
    magnitude pruning), else by |W|; between updates pruned weights keep training through the SR-STE."""

    def __init__(self, student: nn.Module, pattern: Pattern, every: int, decay: float,
                 square_sums: dict[str, torch.Tensor] | None = None):
        named = list(masked_modules(student))
        self.modules = [module for _, module in named]
        self.square_sums = [(square_sums or {}).get(name) for name, _ in named]
        self.pattern, self.every = pattern, every
        for module in self.modules:
            module.dynamic, module.refine_decay = True, decay

    @torch.no_grad()
    def after_step(self, done: int) -> None:
        if done % self.every == 0:
            for module, sums in zip(self.modules, self.square_sums):
                module.mask.copy_(self.pattern.mask(wanda_score(module.weight, sums)))

    def finish(self, student: nn.Module) -> None:
        """Back to fixed masks, with the pruned weights zeroed for good."""
        for module in self.modules:
            module.dynamic = False
        apply_masks_(mask_pairs(student))


class LearnableMasks:
    """Learnable N:M masks: each group of m weights of a projection holds logits over the C(m, n)
    candidate patterns (6 for 2:4), initialised to favour the prune stage's mask; forward draws a
    hard choice by Gumbel-softmax and trains the logits straight-through. The `mask` buffers follow
    the most likely candidates after every step; at the end they become the fixed masks.

    The Gumbel noise explores other candidates. A group whose logits favour its choice by `gap` is
    redrawn with probability (C - 1) / (e^(gap / noise) + C - 1): at full noise and the default
    init_logit 3.0 that is about 20% of 2:4 groups at every forward, which on the demo teacher left
    the distillation loss at 6.2 after 5 steps, against 1.3 with fixed masks (benchmarks/RESULTS.md).
    So the noise is scaled (`noise`, 0.5 by default: ~1% of groups) and falls linearly to 0 at the
    last step (`anneal`), where the weights finish training under the mask that is exported."""

    def __init__(self, student: nn.Module, pattern: Pattern, init_logit: float, temperature: float,
                 noise: float = 0.5):
        n, m = pattern.n, pattern.m
        candidates = torch.tensor([[index in chosen for index in range(m)]
                                   for chosen in itertools.combinations(range(m), n)], dtype=torch.bool)
        self.modules = [module for _, module in masked_modules(student)]
        for module in self.modules:
            groups = module.mask.reshape(module.out_features, -1, m)
            current = (groups[:, :, None, :] == candidates.to(groups.device)[None, None]).all(-1)  # [out, G, C]
            module.candidates = candidates.to(groups.device)
            module.choice_logits = nn.Parameter(current.float() * init_logit)
            module.gumbel_temperature = temperature
            module.gumbel_noise = noise
        self.noise = noise

    def anneal(self, step: int, steps: int) -> None:
        """Set the noise for `step` (0-based) of `steps`: full at the first, none at the last. A
        function of the step alone, so a resumed run draws with the same scale as an uninterrupted one."""
        for module in self.modules:
            module.gumbel_noise = self.noise * (1 - step / max(steps - 1, 1))

    def parameters(self) -> list[nn.Parameter]:
        return [module.choice_logits for module in self.modules]

    @torch.no_grad()
    def after_step(self) -> None:
        for module in self.modules:
            best = module.candidates[module.choice_logits.argmax(-1)]  # [out, G, m]
            module.mask.copy_(best.reshape(module.mask.shape))

    def finish(self, student: nn.Module) -> None:
        self.after_step()
        for module in self.modules:
            module.choice_logits = None
        apply_masks_(mask_pairs(student))
