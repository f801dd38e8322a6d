"""Stage 2, prune: the student is the teacher with its target projections replaced by masked ones.

Masks keep N of every M consecutive input weights, ranked by a criterion:
  magnitude: |W_ij|
  wanda:     |W_ij| * ||X_j||_2, with X the teacher's inputs to that projection on calibration text
             (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models").
A projection whose input size is not a multiple of M is refused or left dense (prune.incompatible).
"""

from __future__ import annotations

import torch

from distill.config import PruneConfig
from distill.errors import DistillError
from distill.io import load_tensors
from distill.models import load_teacher
from distill.pipeline import StageContext
from distill.sparsity import install_masks, nm_mask, sparsity_report, target_linears
from distill.stages.teacher import CALIBRATION_FILE
from distill.student import save_student

STUDENT_DIR = "student"


def choose_masks(model: torch.nn.Module, prune: PruneConfig, statistics: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """({module name: bool mask}, {module name: why it stays dense})."""
    masks, dense = {}, {}
    for name, linear in target_linears(model, prune.targets):
        if linear.in_features % prune.m:
            reason = f"input size {linear.in_features} is not a multiple of {prune.m}"
            if prune.incompatible == "error":
                raise DistillError(f"cannot prune {name} to {prune.n}:{prune.m}: {reason} (set prune.incompatible=dense to keep it dense)")
            dense[name] = reason
            continue
        scores = linear.weight.detach().abs().float()
        if prune.criterion == "wanda":
            if name not in statistics:
                raise DistillError(f"no calibration statistics for {name}; rerun the teacher stage")
            scores = scores * statistics[name].sqrt().to(scores)
        masks[name] = nm_mask(scores, prune.n, prune.m)
    if not masks:
        raise DistillError(f"prune.targets {prune.targets} matched no projection that can be pruned")
    return masks, dense


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    summary: dict = {}
    if accelerator.is_main_process:  # deterministic and cheap: one process builds the student
        model = load_teacher(config.teacher, torch.device("cpu"))
        model = model.float()
        statistics = load_tensors(ctx.stage_dir("teacher") / CALIBRATION_FILE)
        masks, dense = choose_masks(model, config.prune, statistics)
        install_masks(model, masks)
        for name in dense:
            ctx.log(f"[prune] {name} stays dense: {dense[name]}")
        spec = {"n": config.prune.n, "m": config.prune.m, "criterion": config.prune.criterion, "dense": dense}
        save_student(model, ctx.work_dir / STUDENT_DIR, spec)
        sparsity = sparsity_report(model)
        summary = {"masked": len(masks), "dense": dense, "mean_sparsity": sum(sparsity.values()) / len(sparsity)}
        ctx.log(f"[prune] {config.prune.criterion} {config.prune.n}:{config.prune.m} masks on {len(masks)} projections")
    return summary
