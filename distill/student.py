"""The sparse student on disk: the teacher's HF config, its weights with masks, and the sparsity spec.

Layout of a student dir:
  config.json         the teacher's transformers config (architecture)
  model.safetensors   every parameter and buffer, including `<projection>.mask` (bool)
  sparsity.json       {"n": 2, "m": 4, "masked": [module names], "dense": {name: reason}}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from distill.errors import DistillError
from distill.io import atomic_write, write_json
from distill.sparsity import install_masks, masked_modules
from distill.targets import linearize


def save_student(model: nn.Module, directory: Path, spec: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(directory / "config.json")
    atomic_write(directory / "model.safetensors", lambda temp: save_model(model, str(temp)))
    masked = [name for name, _ in masked_modules(model)]
    write_json(directory / "sparsity.json", {**spec, "masked": masked})


def nonfinite_problem(model: nn.Module, what: str) -> str | None:
    """Why `model` must not be used (a NaN or infinite weight, the first one named), or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{what} has non-finite values in {name}; it is not saved or used"
    return None


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first such tensor."""
    problem = nonfinite_problem(model, what)
    if problem:
        raise DistillError(problem)


def load_student(directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    directory = Path(directory)
    for required in ("config.json", "model.safetensors", "sparsity.json"):
        if not (directory / required).is_file():
            raise DistillError(f"student dir {directory} has no {required}")
    spec = json.loads((directory / "sparsity.json").read_text())
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linearize(model)  # saved in the layout it trained in (distill.targets)
    install_masks(model, {name: torch.ones(model.get_submodule(name).weight.shape, dtype=torch.bool)
                          for name in spec["masked"]})
    try:
        missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise DistillError(f"corrupt student weights in {directory}: {str(error).splitlines()[0]}") from None
    if missing or unexpected:
        raise DistillError(f"student weights in {directory} do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(device).eval()

