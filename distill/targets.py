"""Which projections a student prunes, for any decoder-only architecture.

By default every linear projection inside the decoder layers: the layers are found, not named (the
model's largest list of blocks that hold linear layers), and inside them every `nn.Linear`. transformers' `Conv1D`
(GPT-2 and its kin: a linear layer stored transposed, weight [in, out]) is converted to `nn.Linear`
once, when a model is loaded (`linearize`), and converted back when a model is saved in the Hugging
Face layout (`restore_conv1d`), so masks, packing and kernels only ever see [out, in] weights.
Embeddings and the output head sit outside the layers and are never pruned.

`prune.targets` narrows the set and `prune.exclude` removes from it (names or shell-style globs,
after llm-compressor's targets/ignore). A pattern matches a projection by its last name component
(`q_proj`), its path inside the layer (`self_attn.q_proj`, `mlp.*`) or its full name
(`model.layers.0.mlp.down_proj`).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterator, Sequence

import torch
from torch import nn

from distill.errors import DistillError

ALL = ("*",)


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def linear_types() -> tuple[type, ...]:
    """The module types that are linear projections: nn.Linear, and transformers' Conv1D (GPT-2)."""
    return (nn.Linear, _conv1d_class())


def is_projection(module: nn.Module) -> bool:
    """A linear projection: nn.Linear, transformers' Conv1D, or a module standing in for one (the
    sparse runtime's compressed projections, which hold buffers and say their in/out features)."""
    return isinstance(module, linear_types()) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
        and callable(getattr(module, "resident_bytes", None)))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name, list) of the decoder blocks: the model's nn.ModuleList holding the most tensor elements
    whose every entry holds a projection (entries may differ in class, as in hybrid models; a list
    of experts inside a layer holds fewer than the list of layers around it). None when `model` has
    no such list (e.g. it is one layer)."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(is_projection(sub) for sub in block.modules()) for block in module):
            continue
        size = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
        if size > best_size:
            best, best_size = (name, module), size
    return best


def matches(name: str, path_in_layer: str, patterns: Sequence[str]) -> bool:
    short = name.rsplit(".", 1)[-1]
    return any(fnmatchcase(candidate, pattern) for pattern in patterns for candidate in (short, path_in_layer, name))


def _layer_scopes(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name prefix, module) of each decoder layer; a model without a layer list that is a whole
    language model (it has an output head) is refused, anything else (e.g. one layer) is one scope."""
    found = decoder_layers(model)
    if found is not None:
        prefix, layers = found
        return [(f"{prefix}.{index}" if prefix else str(index), layer) for index, layer in enumerate(layers)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        raise DistillError(f"{type(model).__name__}: no list of decoder layers found, so no projection can be chosen "
                           f"for pruning (distill.targets looks for the largest list of blocks holding linear layers)")
    return [("", model)]


def decoder_linears(model: nn.Module) -> Iterator[tuple[str, str, nn.Linear]]:
    """(full name, path inside its layer, module) of every nn.Linear inside the decoder layers (the
    whole of `model` when it is a part of one, e.g. one layer)."""
    for prefix, scope in _layer_scopes(model):
        for path, module in scope.named_modules():
            if isinstance(module, nn.Linear) and path:
                yield (f"{prefix}.{path}" if prefix else path), path, module


def unprunable_weights(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the matrix-shaped weights inside the decoder layers that no nn.Linear holds
    (fused 3-D expert weights, convolutions): distill cannot prune them yet."""
    found = {}
    for prefix, scope in _layer_scopes(model):
        for path, module in scope.named_modules():
            if isinstance(module, nn.Linear) or "parametrizations" in path.split("."):
                continue  # a masked projection's stored weight and mask rules are its own (distill.sparsity.masks)
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.dim() >= 2:
                    full = ".".join(part for part in (prefix, path, name) if part)
                    found[full] = tuple(parameter.shape)
    return found


@torch.no_grad()
def shared_input_groups(layer: nn.Module, linears: dict[str, nn.Module], sample: tuple[tuple, dict]) -> list[list[str]]:
    """The keys of `linears` (projections inside `layer`) grouped by the tensor they read in one
    forward of `layer` on `sample` (args, kwargs), in `linears` order: q/k/v share one input, gate/up
    another. The input is taken as it arrives, before any other pre-hook (an activation threshold);
    projections the forward never calls are left out."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]), prepend=True)
             for name, module in linears.items()]
    try:
        layer(*sample[0], **sample[1])
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[str]] = []
    for name in (name for name in linears if name in seen):  # `seen` keeps the tensors alive: identity means the same input
        for group in groups:
            if seen[name] is seen[group[0]]:
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def target_linears(model: nn.Module, targets: Sequence[str] = ALL, exclude: Sequence[str] = ()) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of the decoder projections `targets` selects and `exclude` does not."""
    for name, path, module in decoder_linears(model):
        if matches(name, path, targets) and not matches(name, path, exclude):
            yield name, module


def resolve_targets(model: nn.Module, targets: Sequence[str] = ALL, exclude: Sequence[str] = ()) -> list[str]:
    """The full names of the decoder projections `targets` selects and `exclude` does not: the globs
    resolved once, so that every later step works on the same list (the prune stage records it)."""
    return [name for name, _ in target_linears(model, targets, exclude)]


def named_linears(model: nn.Module, names: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of each of `names` (full names, as `resolve_targets` gives them), in that order."""
    for name in names:
        yield name, model.get_submodule(name)


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """transformers' Conv1D (y = x @ W + b, W [in, out]) as the nn.Linear computing the same."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    linear.weight.requires_grad_(conv.weight.requires_grad)
    return linear


def linear_to_conv1d(linear: nn.Linear) -> nn.Module:
    conv = _conv1d_class()(linear.out_features, linear.in_features)
    conv = conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    return conv


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule called `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def linearize(model: nn.Module) -> list[str]:
    """Replace every Conv1D of `model` by the equivalent nn.Linear, in place; returns their names."""
    conv1d = _conv1d_class()
    names = [name for name, module in model.named_modules() if isinstance(module, conv1d)]
    for name in names:
        replace_module(model, name, conv1d_to_linear(model.get_submodule(name)))
    return names


def restore_conv1d(model: nn.Module) -> list[str]:
    """The inverse of `linearize` before saving in the Hugging Face layout: every module that the
    model's own class builds as a Conv1D goes back to one (weights transposed), in place."""
    from transformers import AutoModelForCausalLM

    conv1d = _conv1d_class()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    names = [name for name, module in skeleton.named_modules() if isinstance(module, conv1d)]
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            replace_module(model, name, linear_to_conv1d(module))
    return names
