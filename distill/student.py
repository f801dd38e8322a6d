"""The sparse student on disk: the teacher's HF config, its weights with masks, and the sparsity spec.

Layout of a student dir:
  config.json         the teacher's transformers config (architecture)
  model.safetensors   every parameter and persistent buffer under its plain name, each masked
                      projection's weight with zeros where pruned, and its mask as `<projection>.mask`
                      (bool); tied parameters once
  sparsity.json       distill.run.artifacts.SparsitySpec, with the input thresholds of activation
                      sparsity and the streaming heads of attention sparsity when there are any
                      (installed again at load)

The file is written from the parametrized model in memory (distill.sparsity.masks) but keeps the
names an unparametrized model has, so students saved before masks became parametrizations load
unchanged and any safetensors reader sees plain weights.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from torch.distributed.tensor import DTensor
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from distill.sparsity.spec import SparsitySpec, StreamingHeads, read_sparsity_spec, write_sparsity_spec
from distill.errors import DistillError
from distill.io import TensorLayout, return_freed_memory, stream_tensors, write_text
from distill.sparsity.activations import set_thresholds, thresholded
from distill.sparsity.attention import heads_of, install_heads, streaming_heads
from distill.sparsity.masks import install_masks, mask_rule, masked_modules, stored_weight
from distill.targets import linearize

WEIGHTS_FILE = "model.safetensors"


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whole: a sharded one (FSDP2's DTensor) gathered from every process, so every
    process must ask for it, in the same order."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class _StudentFile:
    """What a student file holds, in file order: plain names, masked weights, `<projection>.mask`,
    each tensor once (the first name of tied parameters). `tensors()` gives them one at a time,
    each whole, and notes whether every pruned weight was stored as zero before its mask's product."""

    def __init__(self, model: nn.Module):
        self.layout: TensorLayout = []
        self._reads: list = []
        seen: set[tuple[int, tuple]] = set()
        for name, tensor in model.state_dict().items():
            if ".parametrizations." in name or name.endswith(".input_threshold.threshold"):
                continue  # masked projections are written below under their plain names; thresholds live in the spec
            key = (_local(tensor).data_ptr(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                self._add(name, tensor.dtype, tuple(tensor.shape), partial(_whole, tensor))
        for name, linear in masked_modules(model):
            weight, rule = stored_weight(linear), mask_rule(linear)
            self._add(f"{name}.weight", weight.dtype, tuple(weight.shape), partial(self._masked, weight, rule))
            self._add(f"{name}.mask", torch.bool, rule.shape, lambda rule=rule: rule.mask)
        self.pruned_zero = True

    def _add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], read) -> None:
        self.layout.append((name, dtype, shape))
        self._reads.append(read)

    def _masked(self, weight: torch.Tensor, rule) -> torch.Tensor:
        whole, mask = _whole(weight).detach(), rule.mask
        self.pruned_zero &= not bool(whole.masked_fill(mask, 0).any())
        return whole * mask

    def tensors(self) -> Iterator[torch.Tensor]:
        return (read() for read in self._reads)


def save_student(model: nn.Module, directory: Path, spec: SparsitySpec, write: bool = True) -> bool:
    """Write `model` (masked projections parametrized) as a student dir; `spec.masked` is set from
    the model. The weights stream into the file a tensor at a time, so saving holds one tensor
    beyond the model. A sharded model (FSDP2) is saved by every process calling this, each gathering
    one tensor at a time; only the one with `write` writes. Returns whether every pruned weight was
    zero in the model (not only in the file, where the mask's product makes it so)."""
    directory = Path(directory)
    contents = _StudentFile(model)
    if not write:
        for _ in contents.tensors():
            pass  # the gathers every process takes part in
        return contents.pruned_zero
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "config.json", model.config.to_json_string())
    stream_tensors(directory / WEIGHTS_FILE, contents.layout, contents.tensors(), metadata={"format": "pt"})
    masked = [name for name, _ in masked_modules(model)]
    write_sparsity_spec(directory, spec.replace(masked=masked, input_thresholds=thresholded(model),
                                                streaming=installed_streaming(model)))
    return contents.pruned_zero


def installed_streaming(model: nn.Module) -> StreamingHeads | None:
    """The streaming heads installed on `model` (distill.sparsity.attention), as a spec holds them."""
    heads = streaming_heads(model)
    if not heads:
        return None
    first = heads_of(model)[0][1]
    return StreamingHeads(first.sink, first.window, heads)


def apply_runtime_sparsity(model: nn.Module, spec: SparsitySpec) -> None:
    """What a sparsity spec asks of the forward pass beyond the weights: input thresholds and
    streaming heads, installed on `model` (in place)."""
    set_thresholds(model, spec.input_thresholds)
    if spec.streaming is not None:
        install_heads(model, spec.streaming.heads, spec.streaming.sink, spec.streaming.window)


def nonfinite_problem(model: nn.Module, what: str) -> str | None:
    """Why `model` must not be used (a NaN or infinite weight, the first one named), or None. Of a
    sharded model, the process's own shards."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(_local(tensor)).all()):
            return f"{what} has non-finite values in {name}; it is not saved or used"
    return None


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first such tensor."""
    problem = nonfinite_problem(model, what)
    if problem:
        raise DistillError(problem)


def load_student(directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    directory = Path(directory)
    for required in ("config.json", WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise DistillError(f"student dir {directory} has no {required}")
    spec = read_sparsity_spec(directory)
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise DistillError(f"corrupt student weights in {directory}: {str(error).splitlines()[0]}") from None
    masks = {name: state.pop(f"{name}.mask", None) for name in spec.masked}
    state = {name: tensor for name, tensor in state.items() if not name.endswith(".input_threshold.threshold")}
    # parameters on the meta device, then the loaded tensors put in their place (assign): the weights
    # exist once in memory, not as a random init beside the loaded copy (buffers are made as usual)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
    linearize(model)  # saved in the layout it trained in (distill.targets)
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied name (lm_head.weight) is not saved: it gets the loaded tensor here
    parameters = dict(model.named_parameters(remove_duplicate=False))
    missing = [name for name in missing if name not in parameters or parameters[name].is_meta]  # given no value
    absent = [f"{name}.mask" for name, mask in masks.items() if mask is None]
    if missing or unexpected or absent:
        raise DistillError(f"student weights in {directory} do not match its config: missing {(missing + absent)[:3]}, "
                           f"unexpected {unexpected[:3]}")
    install_masks(model, masks)
    del state, masks  # the bool masks, now packed into bits
    apply_runtime_sparsity(model, spec)
    return_freed_memory()
    return model.to(device).eval()
