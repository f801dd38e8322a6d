"""Activation sparsity: projection inputs whose magnitude is below a calibrated threshold become zero,
so a decode step can skip the weight columns they multiply (TEAL, Liu et al. 2024).

The unit is a projection input: in a decoder layer, the projections that read the same tensor share
one input (q/k/v, gate/up) and one threshold; o_proj and down_proj read their own. `input_groups`
finds them by running one layer and comparing the tensors each projection receives, so no
architecture is named.

  input_statistics   per input: the fraction of exact zeros and quantiles of |x| on calibration text
  allocation         the fraction of each input to zero: the same for every input (uniform), or
                     TEAL's greedy allocation: per decoder layer, the layer's inputs take the target
                     on average, and each step sparsifies further the input whose step costs the
                     layer's output the least error on calibration data (relative per token)
  thresholds_at      the |x| quantile of each input at its fraction
  recalibrate_thresholds  thresholds for an allocation already chosen, on the model as it is now (the
                     allocation is the expensive part; distill keeps it while the student moves)
  ramped             an allocation scaled down early in training (distill's ramp), each input's
                     fraction rising linearly to its allocation
  install_thresholds an `InputThreshold` module per thresholded projection (`<projection>.input_threshold`,
                     its threshold a buffer, so checkpoints and state dicts carry it) applied by a
                     forward pre-hook: the projection sees x * (|x| >= t). A projection whose
                     `applies_input_threshold` is true applies it itself (the CPU runtime's kernels
                     zero the small inputs as they read them, with no separate pass): no hook

Thresholds are magnitudes of the inputs, so they follow the input dtype's scale. The
`straight_through` option lets the gradient reach the zeroed entries as if they were kept (the
forward is the same).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn

from distill.sparsity.activations_config import ActivationsConfig, Allocation
from distill.targets import decoder_layers, is_projection, matches, shared_input_groups

# |x| values kept per input and batch to estimate quantiles (a sample: a whole calibration set of a
# large model does not fit torch.quantile's 16M-element limit)
SAMPLES_PER_BATCH = 1 << 15
QUANTILES = (0.1, 0.25, 0.4, 0.5, 0.6, 0.7, 0.9, 0.99)


class InputThreshold(nn.Module):
    """x * (|x| >= threshold). Gradients reach the kept entries; with `straight_through` the zeroed
    entries get theirs too, as if kept."""

    def __init__(self, threshold: float, straight_through: bool = False):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.straight_through = straight_through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x.abs() >= self.threshold.to(x.dtype)
        sparse = x * kept
        if self.straight_through:
            return x + (sparse - x).detach()
        return sparse


def _apply_threshold(module: nn.Module, args: tuple) -> tuple:
    return (module.input_threshold(args[0]),) + tuple(args[1:])


@dataclass(frozen=True)
class InputGroup:
    """One projection input of one decoder layer: the projections that read it (full names, and
    their paths inside the layer)."""

    layer: int
    projections: tuple[str, ...]
    paths: tuple[str, ...]

    @property
    def label(self) -> str:
        """The input's name in every layer: the first projection's path in the layer, then the others'
        last names (self_attn.q_proj+k_proj+v_proj; GPT-2's attn.c_proj and mlp.c_proj stay apart)."""
        return "+".join([self.paths[0], *(path.rsplit(".", 1)[-1] for path in self.paths[1:])])

    @property
    def name(self) -> str:
        return self.projections[0]

    def weights(self, model: nn.Module) -> int:
        """How many weights the input multiplies: the reads a decode step skips where it is zero."""
        return sum(_projection_size(model.get_submodule(name)) for name in self.projections)


def _projection_size(module: nn.Module) -> int:
    """in x out of a projection (a compressed one holds no `weight`)."""
    weight = getattr(module, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) else module.in_features * module.out_features


def _forward_batches(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> None:
    """Run `model` over `blocks` a batch at a time (for the hooks watching it)."""
    device = next(model.parameters()).device
    for start in range(0, len(blocks), batch_size):
        model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)


@torch.no_grad()
def _layer_samples(model: nn.Module, indices: Sequence[int], blocks: torch.Tensor,
                   batch_size: int) -> dict[int, list[tuple[tuple, dict]]]:
    """{layer index: the (args, kwargs) that decoder layer receives for each batch of `blocks`}."""
    layers = decoder_layers(model)[1]
    captured: dict[int, list[tuple[tuple, dict]]] = {index: [] for index in indices}
    hooks = [layers[index].register_forward_pre_hook(
        lambda module, args, kwargs, index=index: captured[index].append((args, kwargs)), with_kwargs=True)
        for index in captured]
    try:
        _forward_batches(model, blocks, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def input_groups(model: nn.Module, probe: torch.Tensor, where: Sequence[str] = ("*",)) -> list[InputGroup]:
    """Every projection input of the decoder layers whose projections `where` selects (names or
    globs matched like prune.targets: last name, path in the layer, or full name; a shared input is
    selected when any of its projections is)."""
    found = decoder_layers(model)
    if found is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers to find projection inputs in")
    prefix, layers = found
    samples = _layer_samples(model, range(len(layers)), probe, len(probe))
    groups = []
    for index, layer in enumerate(layers):
        layer_prefix = f"{prefix}.{index}" if prefix else str(index)
        linears = {path: module for path, module in layer.named_modules()
                   if is_projection(module) and path and "parametrizations" not in path.split(".")}
        for paths in shared_input_groups(layer, linears, samples[index][0]):
            names = tuple(f"{layer_prefix}.{path}" for path in paths)
            if any(matches(name, path, where) for name, path in zip(names, paths)):
                groups.append(InputGroup(index, names, tuple(paths)))
    return groups


@dataclass
class InputStatistics:
    """Of one projection input over calibration text: the fraction of exact zeros, and a sample of
    |x| (float32) from which quantiles and thresholds are read."""

    zero_fraction: float
    sample: torch.Tensor

    def quantiles(self, levels: Sequence[float] = QUANTILES) -> dict[str, float]:
        values = torch.quantile(self.sample, torch.tensor(list(levels)))
        return {f"q{level:g}": float(value) for level, value in zip(levels, values)}

    def threshold(self, sparsity: float) -> float:
        """The |x| below which `sparsity` of the entries fall (0 zeroes nothing)."""
        if sparsity <= 0:
            return 0.0
        return float(torch.quantile(self.sample, torch.tensor(min(sparsity, 1.0))))


@torch.no_grad()
def input_statistics(model: nn.Module, groups: list[InputGroup], blocks: torch.Tensor, batch_size: int,
                     thresholded: bool = True, seed: int = 0) -> dict[str, InputStatistics]:
    """{group name: InputStatistics} from running `model` on `blocks`: of the inputs as the weights
    see them (after an installed threshold) or, with `thresholded=False`, as they arrive (what a
    threshold is calibrated on; earlier layers keep their thresholds either way)."""
    generator = torch.Generator().manual_seed(seed)
    zeros = {group.name: 0 for group in groups}
    counts = {group.name: 0 for group in groups}
    samples: dict[str, list[torch.Tensor]] = {group.name: [] for group in groups}

    def record(module, args, name):
        x = args[0].detach()
        if thresholded and isinstance(getattr(module, "input_threshold", None), InputThreshold):
            x = module.input_threshold(x)  # what the weights see
        flat = x.reshape(-1).abs().float().cpu()
        zeros[name] += int((flat == 0).sum())
        counts[name] += flat.numel()
        picks = torch.randint(0, flat.numel(), (min(SAMPLES_PER_BATCH, flat.numel()),), generator=generator)
        samples[name].append(flat[picks])

    hooks = [model.get_submodule(group.name).register_forward_pre_hook(  # first: before any threshold
        lambda module, args, name=group.name: record(module, args, name), prepend=True) for group in groups]
    try:
        _forward_batches(model, blocks, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: InputStatistics(zeros[name] / max(counts[name], 1), torch.cat(samples[name]))
            for name in samples}


def thresholds_at(statistics: dict[str, InputStatistics], sparsity: dict[str, float]) -> dict[str, float]:
    """{group name: threshold} zeroing each input's fraction in `sparsity` ({group name: fraction})."""
    return {name: statistics[name].threshold(fraction) for name, fraction in sparsity.items()}


def uniform_thresholds(groups: list[InputGroup], statistics: dict[str, InputStatistics],
                       target: float) -> dict[str, float]:
    """{group name: threshold} zeroing `target` of every input."""
    return thresholds_at(statistics, {group.name: target for group in groups})


def install_thresholds(model: nn.Module, groups: list[InputGroup], thresholds: dict[str, float],
                       straight_through: bool = False) -> None:
    """Give every projection of each group its input's threshold (in place); an installed one is
    updated instead."""
    set_thresholds(model, {name: thresholds[group.name] for group in groups for name in group.projections},
                   straight_through)


def set_thresholds(model: nn.Module, thresholds: dict[str, float], straight_through: bool = False) -> None:
    """Give each named projection its threshold ({projection name: threshold}, as `thresholded`
    returns and a sparsity spec holds), in place."""
    for name, threshold in thresholds.items():
        set_threshold(model.get_submodule(name), threshold, straight_through)


def set_threshold(projection: nn.Module, threshold: float, straight_through: bool = False) -> None:
    existing = getattr(projection, "input_threshold", None)
    if isinstance(existing, InputThreshold):
        existing.threshold.fill_(threshold)
        existing.straight_through = straight_through
        return
    device = next(itertools.chain(projection.parameters(), projection.buffers())).device
    projection.input_threshold = InputThreshold(threshold, straight_through).to(device)
    if not getattr(projection, "applies_input_threshold", False):
        projection._input_threshold_hook = projection.register_forward_pre_hook(_apply_threshold)


def thresholded(model: nn.Module) -> dict[str, float]:
    """{projection name: threshold} of every projection with an installed threshold."""
    return {name: float(module.input_threshold.threshold) for name, module in model.named_modules()
            if isinstance(getattr(module, "input_threshold", None), InputThreshold)}


def remove_thresholds(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """The projections `names` (default: all) back to their dense input (in place)."""
    for name, module in list(model.named_modules()):
        if (names is None or name in names) and isinstance(getattr(module, "input_threshold", None), InputThreshold):
            hook = module.__dict__.pop("_input_threshold_hook", None)
            if hook is not None:
                hook.remove()
            del module.input_threshold


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _token_errors(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each token's squared output error relative to its own squared norm. Per token, because a
    few tokens' hidden states can be a hundred times the others' (massive activations: about 120x
    the median token's norm from layer 11 on in the demo's one-shot student). Summed over the
    batch, their error alone would decide."""
    reference = reference.float()
    norms = reference.square().sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return (output.float() - reference).square().sum(-1) / norms


@torch.no_grad()
def greedy_allocation(model: nn.Module, groups: list[InputGroup], statistics: dict[str, InputStatistics],
                      blocks: torch.Tensor, batch_size: int, target: float, step: float) -> dict[str, float]:
    """{group name: fraction to zero} by TEAL's greedy allocation, layer by layer (the layers' own
    thresholds are removed; the caller installs the result): every input of the layer starts dense; each step
    adds `step` of sparsity to the input whose step raises the layer's output error least (on
    `blocks`, against the layer without thresholds, relative to each token's norm and averaged over
    tokens), until the layer's inputs, weighted by the weights they multiply, average `target`. The
    last step is cut to land on it."""
    layers = decoder_layers(model)[1]
    captured = _layer_samples(model, sorted({group.layer for group in groups}), blocks, batch_size)
    sparsity: dict[str, float] = {}
    for index, samples in captured.items():
        mine = [group for group in groups if group.layer == index]
        sparsity.update(_allocate_layer(model, layers[index], mine, statistics, samples, target, step))
    return sparsity


def _allocate_layer(model: nn.Module, layer: nn.Module, groups: list[InputGroup], statistics: dict[str, InputStatistics],
                    samples: list[tuple[tuple, dict]], target: float, step: float) -> dict[str, float]:
    projections = [name for group in groups for name in group.projections]
    remove_thresholds(model, projections)  # the reference is the layer with dense inputs
    weight = {group.name: group.weights(model) for group in groups}
    total = sum(weight.values())
    dense = [_layer_output(layer(*args, **kwargs)) for args, kwargs in samples]
    tokens = sum(out.shape[:-1].numel() for out in dense)
    sparsity = {group.name: 0.0 for group in groups}

    def error(trial: dict[str, float]) -> float:
        install_thresholds(model, groups, thresholds_at(statistics, trial))
        outputs = [_layer_output(layer(*args, **kwargs)) for args, kwargs in samples]
        return sum(float(_token_errors(out, ref).sum()) for out, ref in zip(outputs, dense)) / tokens

    try:
        while (reached := sum(weight[name] * s for name, s in sparsity.items()) / total) < target - 1e-9:
            best, best_error = None, float("inf")
            for group in groups:
                room = min(step, 1.0 - sparsity[group.name], (target - reached) * total / weight[group.name])
                if room <= 1e-9:
                    continue
                trial = {**sparsity, group.name: sparsity[group.name] + room}
                trial_error = error(trial)
                if trial_error < best_error:
                    best, best_error = trial, trial_error
            if best is None:
                break
            sparsity = best
    finally:
        remove_thresholds(model, projections)  # the caller installs the result
    return sparsity


class Calibrated(NamedTuple):
    """Thresholds calibrated on a model: the inputs, the fraction of each to zero, and the thresholds
    that zero it there (both {group name: value})."""

    groups: list[InputGroup]
    sparsity: dict[str, float]
    thresholds: dict[str, float]


def calibrate_thresholds(model: nn.Module, blocks: torch.Tensor, activations: ActivationsConfig, batch_size: int,
                         target: float | None = None) -> Calibrated:
    """The inputs `activations.where` selects, each given a fraction so that together they reach
    `activations.target` (or `target`) on `blocks`, uniformly or by TEAL's greedy allocation, and the
    thresholds for it, from the inputs as they arrive (earlier layers' installed thresholds active)."""
    target = activations.target if target is None else target
    groups = input_groups(model, blocks[:1], activations.where)
    statistics = input_statistics(model, groups, blocks, batch_size, thresholded=False)
    if activations.allocation is Allocation.GREEDY:
        errors_on = blocks[:activations.greedy_blocks] if activations.greedy_blocks else blocks
        sparsity = greedy_allocation(model, groups, statistics, errors_on, batch_size, target, activations.greedy_step)
    else:
        sparsity = {group.name: target for group in groups}
    return Calibrated(groups, sparsity, thresholds_at(statistics, sparsity))


def ramp_scale(step: int, ramp_steps: int) -> float:
    """How much of the allocation applies at training step `step` of a linear ramp from 0 (step 0)
    to all of it (from step `ramp_steps` on; 0: no ramp)."""
    return min(1.0, step / ramp_steps) if ramp_steps else 1.0


def ramped(sparsity: dict[str, float], step: int, ramp_steps: int) -> dict[str, float]:
    """Each input's fraction of `sparsity` at step `step` of the ramp: the inputs keep their relative
    shares, so the allocation's choice between them holds throughout."""
    scale = ramp_scale(step, ramp_steps)
    return {name: fraction * scale for name, fraction in sparsity.items()}


def recalibrate_thresholds(model: nn.Module, blocks: torch.Tensor, where: Sequence[str], sparsity: dict[str, float],
                           batch_size: int) -> Calibrated:
    """The thresholds that zero each input's fraction of `sparsity` (an allocation calibrate_thresholds
    chose) on the model as it is now: one pass over `blocks`, however the allocation was found."""
    groups = input_groups(model, blocks[:1], where)
    if {group.name for group in groups} != set(sparsity):
        raise ValueError(f"the allocation names {len(sparsity)} projection inputs, the model has {len(groups)} "
                         f"selected by {list(where)}")
    statistics = input_statistics(model, groups, blocks, batch_size, thresholded=False)
    return Calibrated(groups, dict(sparsity), thresholds_at(statistics, sparsity))
