"""Exporting a masked student: checks of its structure, the Hugging Face layout it is saved in, the
smaller dense model a spanning pattern shrinks to, and how far the 2:4 kernels' logits are from the
dense model's. The export stage orchestrates these; tests and benchmarks call them directly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.errors import DistillError
from distill.sparsity.masks import mask_rule, masked_modules, stored_weight
from distill.sparsity.patterns import Pattern
from distill.sparsity.structured import shrink
from distill.targets import linearize, restore_conv1d


def verify_structure(model: torch.nn.Module, pattern: Pattern) -> None:
    for name, module in masked_modules(model):
        mask = mask_rule(module).mask
        if bool((stored_weight(module)[~mask] != 0).any()):
            raise DistillError(f"{name}: weights outside the mask are not zero")
        bad = pattern.violations(mask)
        if bad:
            raise DistillError(f"{name}: {bad} groups break the {pattern.describe()} pattern")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


@torch.no_grad()
def sparse_kernel_errors(packed_dir, dense: torch.nn.Module, masked: list[str], input_ids: torch.Tensor) -> dict[str, float]:
    """Relative error of the logits with every 2:4 projection on each sparse kernel path of the
    runtime (CUDA, bf16), against the dense-with-zeros model in bf16."""
    from distill.runtime import CrossoverTable, load_sparse_model

    dense = dense.to("cuda", torch.bfloat16).eval()
    input_ids = input_ids.cuda()
    expected = dense(input_ids=input_ids).logits.float()
    shapes = {f"{dense.get_submodule(name).out_features}x{dense.get_submodule(name).in_features}" for name in masked}
    errors = {}
    for path in ("triton", "cusparselt"):
        table = CrossoverTable("export check", {shape: [{"max_m": None, "path": path}] for shape in shapes})
        sparse = load_sparse_model(packed_dir, device="cuda", dtype=torch.bfloat16, table=table)
        errors[path] = relative_error(sparse(input_ids=input_ids).logits.float(), expected)
        del sparse
    return errors


@torch.no_grad()
def shrink_and_verify(dense: torch.nn.Module, kind: str, probe: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Cut a spanning pattern's removed channels or heads out of `dense` (in place); the smaller
    model must give the dense-with-zeros model's logits. Returns {config key: (before, after)}."""
    before = {key: getattr(dense.config, key, None) for key in ("intermediate_size", "num_attention_heads",
                                                                "num_key_value_heads", "head_dim")}
    expected = dense.eval()(input_ids=probe).logits
    changes = shrink(dense, kind)
    error = relative_error(dense(input_ids=probe).logits, expected)
    if error > 1e-5:
        raise DistillError(f"the shrunk model's logits differ from the dense-with-zeros model's by {error:.3g}")
    return {key: (before[key], value) for key, value in changes.items()}


def save_in_hf_layout(model: torch.nn.Module, directory: Path) -> None:
    """save_pretrained with the model's own module types: projections linearized at load go back
    to Conv1D for the file (so plain from_pretrained reads it), and stay nn.Linear in memory."""
    restored = restore_conv1d(model)
    try:
        model.save_pretrained(directory)
    finally:
        if restored:
            linearize(model)
