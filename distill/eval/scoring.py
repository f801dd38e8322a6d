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

from distill.targets import decoder_layers
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
    reference_logp: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """{model name: {"ppl": ..., "kl": ...}} on `blocks` [n, length]; "kl" is KL(reference || model)
    per token at temperature 1, present for every model but the reference.

    reference_logp: the reference's log-probs of `blocks` [n, length, vocab], computed beforehand,
    for a reference that is not among `models` (the teacher during training).

    lockstep: every rank runs the same number of forwards, for models whose parameters are sharded
    (FSDP gathers them in each forward, a collective that all ranks must join); a rank whose blocks
    ran out runs the first batch of blocks again and does not count it."""
    mine = blocks[accelerator.process_index:: accelerator.num_processes]
    given_logp = None if reference_logp is None else reference_logp[accelerator.process_index:: accelerator.num_processes]
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
        reference_logp = given_logp[start:start + batch_size].to(device) if given_logp is not None else None
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
        if name != reference and (reference in models or given_logp is not None):
            results[name]["kl"] = float(accelerator.reduce(kl[name], "sum") / positions)
    return results


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), inf where it overflows a float (a diverged model still gets a report)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


@torch.no_grad()
def log_probs(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`model`'s log-probs of every next token of `blocks` [n, length, vocab], float32 on the CPU; every
    process computes all of them (a sharded model's forwards are collectives all ranks must join)."""
    device = next(model.parameters()).device
    parts = [F.log_softmax(model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False).logits.float(),
                           dim=-1).cpu() for start in range(0, len(blocks), batch_size)]
    return torch.cat(parts)


def heldout_scores(accelerator: Accelerator, student: nn.Module, heldout: torch.Tensor, batch_size: int,
                   teacher_logp: torch.Tensor | None = None, sharded_root: nn.Module | None = None) -> dict[str, float]:
    """{"heldout_ppl": ..., "heldout_kl": ...}: the student's perplexity on the held-out blocks (ranks
    share them) during training, and its KL(teacher || student) per token in nats against the
    teacher's log-probs of the same blocks (no KL without them), in eval mode: learnable masks take
    their most likely pattern and group dropout is off.

    sharded_root: the FSDP root (the objective) when the student is sharded. The root owns the
    embeddings, final norm and output projection, which it gathers only in its own forward, so they
    are gathered here for the student's forward; its decoder layers gather themselves."""
    with evaluating(student, sharded_root), accelerator.autocast():
        scores = score_models({"student": student}, heldout, accelerator, batch_size, reference="teacher",
                              desc="held-out", lockstep=sharded_root is not None, reference_logp=teacher_logp)["student"]
    return {f"heldout_{key}": value for key, value in scores.items()}


@contextmanager
def evaluating(student: nn.Module, sharded_root: nn.Module | None = None):
    """The training student in eval mode for a while (learnable masks take their most likely
    pattern, group dropout is off), its FSDP root's parameters gathered when it is sharded (see
    heldout_scores); back to training mode after."""
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


@contextmanager
def layer_outputs(model: nn.Module):
    """A list that the decoder layers of `model` append their output hidden states to, one per layer
    and forward, while the context lasts (forward hooks: output_hidden_states returns the last
    layer's after the final norm in some architectures)."""
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layer.register_forward_hook(keep) for layer in decoder_layers(model)[1]]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_errors(reference: nn.Module, models: dict[str, nn.Module], blocks: torch.Tensor,
                 batch_size: int) -> dict[str, list[float]]:
    """{model name: per decoder layer, ||h - h_ref|| / ||h_ref|| of the layer's output hidden states
    over every position of `blocks`}, against `reference` (the teacher) run on the same blocks."""
    device = next(reference.parameters()).device
    squares = {name: None for name in models}
    reference_squares = None
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks[start:start + batch_size].to(device)
        expected = _hidden_states(reference, input_ids)
        sums = torch.stack([(state.double() ** 2).sum() for state in expected])
        reference_squares = sums if reference_squares is None else reference_squares + sums
        for name, model in models.items():
            actual = _hidden_states(model, input_ids)
            sums = torch.stack([((a.double() - e.double()) ** 2).sum() for a, e in zip(actual, expected)])
            squares[name] = sums if squares[name] is None else squares[name] + sums
    return {name: [float(value) for value in (sums / reference_squares).sqrt()] for name, sums in squares.items()}


def _hidden_states(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    with layer_outputs(model) as captured:
        model(input_ids=input_ids, use_cache=False)
    return captured
