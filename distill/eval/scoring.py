"""Perplexity and KL to the teacher on token blocks, shared by every process.

Ranks take interleaved blocks and the sums are added across ranks, so the numbers do not depend on
the number of processes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm
from torch import nn

from distill.sparsity.activations import (input_groups, input_statistics, install_thresholds, remove_thresholds,
                                          uniform_thresholds)


@torch.no_grad()
def score_models(
    models: dict[str, nn.Module],
    blocks: torch.Tensor,
    accelerator: Accelerator,
    batch_size: int,
    reference: str | None = "teacher",
    desc: str = "evaluating",
    lockstep: bool = False,
) -> dict[str, dict[str, float]]:
    """{model name: {"ppl": ..., "kl": ...}} on `blocks` [n, length]; "kl" is KL(reference || model)
    per token at temperature 1, present for every model but the reference.

    lockstep: every rank runs the same number of forwards, for models whose parameters are sharded
    (FSDP gathers them in each forward, a collective that all ranks must join); a rank whose blocks
    ran out runs the first batch of blocks again and does not count it."""
    mine = blocks[accelerator.process_index:: accelerator.num_processes]
    most_blocks = math.ceil(len(blocks) / accelerator.num_processes) if lockstep else len(mine)
    rounds = math.ceil(most_blocks / batch_size)
    device = accelerator.device
    nll = {name: torch.zeros((), dtype=torch.float64, device=device) for name in models}
    kl = {name: torch.zeros((), dtype=torch.float64, device=device) for name in models}
    predicted = torch.zeros((), dtype=torch.float64, device=device)
    positions = torch.zeros((), dtype=torch.float64, device=device)
    for start in tqdm(range(0, rounds * batch_size, batch_size), desc=desc, disable=not accelerator.is_main_process):
        input_ids = mine[start:start + batch_size].to(device)
        if not len(input_ids):  # lockstep only: a forward to join the others' collectives, not counted
            for model in models.values():
                model(input_ids=blocks[:batch_size].to(device), use_cache=False)
            continue
        reference_logp = None
        log_probs = {}
        for name, model in models.items():
            logits = model(input_ids=input_ids, use_cache=False).logits.float()
            logp = F.log_softmax(logits, dim=-1)
            nll[name] -= logp[:, :-1].gather(-1, input_ids[:, 1:, None]).double().sum()
            if name == reference:
                reference_logp = logp
            else:
                log_probs[name] = logp
        if reference_logp is not None:
            for name, logp in log_probs.items():
                kl[name] += (reference_logp.exp() * (reference_logp - logp)).sum().double()
        predicted += input_ids[:, 1:].numel()
        positions += input_ids.numel()
    predicted = accelerator.reduce(predicted, "sum")
    positions = accelerator.reduce(positions, "sum")
    results = {}
    for name in models:
        total_nll = accelerator.reduce(nll[name], "sum")
        results[name] = {"ppl": perplexity(float(total_nll / predicted))}
        if name != reference and reference in models:
            results[name]["kl"] = float(accelerator.reduce(kl[name], "sum") / positions)
    return results


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), inf where it overflows a float (a diverged model still gets a report)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def heldout_perplexity(accelerator: Accelerator, student: nn.Module, heldout: torch.Tensor, batch_size: int,
                       sharded_root: nn.Module | None = None) -> float:
    """The student's perplexity on the held-out blocks (ranks share them) during training, in eval
    mode: learnable masks take their most likely pattern and group dropout is off.

    sharded_root: the FSDP root (the objective) when the student is sharded. The root owns the
    embeddings, final norm and output projection, which it gathers only in its own forward, so they
    are gathered here for the student's forward; its decoder layers gather themselves."""
    with evaluating(student, sharded_root), accelerator.autocast():
        return score_models({"student": student}, heldout, accelerator, batch_size, reference=None,
                            desc="held-out", lockstep=sharded_root is not None)["student"]["ppl"]


@contextmanager
def evaluating(student: nn.Module, sharded_root: nn.Module | None = None):
    """The training student in eval mode for a while (learnable masks take their most likely
    pattern, group dropout is off), its FSDP root's parameters gathered when it is sharded (see
    heldout_perplexity); back to training mode after."""
    student.eval()
    try:
        if sharded_root is not None:
            sharded_root.unshard()
        yield student
    finally:
        if sharded_root is not None:
            sharded_root.reshard()
        student.train()


def activation_sparsity_curve(model: nn.Module, calibration: torch.Tensor, sets: dict[str, torch.Tensor],
                              levels: list[float], accelerator: Accelerator, batch_size: int) -> dict[str, dict[str, float]]:
    """{source: {level: perplexity}} of `model` with training-free activation sparsity (every
    projection input zeroed at `level` by a threshold from its |x| quantile on `calibration`, as TEAL
    does without training). The model is left without thresholds."""
    device = next(model.parameters()).device
    groups = input_groups(model, calibration[:1].to(device))
    statistics = input_statistics(model, groups, calibration, batch_size, thresholded=False)
    curve: dict[str, dict[str, float]] = {name: {} for name in sets}
    try:
        for level in levels:
            install_thresholds(model, groups, uniform_thresholds(groups, statistics, level))
            for name, blocks in sets.items():
                scores = score_models({"model": model}, blocks, accelerator, batch_size, reference=None,
                                      desc=f"activations at {level:.0%} on {name}")
                curve[name][f"{level:g}"] = scores["model"]["ppl"]
    finally:
        remove_thresholds(model)
    return curve


@torch.no_grad()
def activation_table(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> list[dict]:
    """Per decoder layer and projection input of `model` on `blocks`: the fraction of exact zeros and
    quantiles of |x|, as the weights see the input (after installed thresholds)."""
    groups = input_groups(model, blocks[:1].to(next(model.parameters()).device))
    statistics = input_statistics(model, groups, blocks, batch_size)
    return [{"layer": group.layer, "input": group.label, "zero_fraction": statistics[group.name].zero_fraction,
             "weights": group.weights(model),
             **statistics[group.name].quantiles()} for group in groups]


def weighted_zero_fraction(rows: list[dict]) -> float | None:
    """The fraction of an activation_table's input entries that are zero, weighted by the weights each
    input multiplies: the share of weight reads a decode step can skip. None for rows without weight
    counts (reports written before they were kept)."""
    if not rows or any("weights" not in row for row in rows):
        return None
    return sum(row["zero_fraction"] * row["weights"] for row in rows) / sum(row["weights"] for row in rows)
