"""Stage 4, export: check the N:M structure, write the student in two forms, and prove they agree.

  hf/      a Hugging Face model dir (config, tokenizer, safetensors) with zeros where pruned: loads
           with AutoModelForCausalLM.from_pretrained anywhere
  packed/  kept values + positions per group (see distill.packing), plus config and tokenizer
For mlp_channels and heads patterns (export.shrink), hf/ is instead a smaller dense model with the
removed channels or heads cut out, checked to give the dense-with-zeros model's logits.
The packed form is loaded back and must reproduce hf/ bitwise (weights and logits). On CUDA the
packed student also runs on the 2:4 runtime (distill.runtime: our Triton kernel, then cuSPARSELt)
and its logits are compared with the dense model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.errors import DistillError
from distill.io import load_tensors
from distill.packing import load_packed, save_packed
from distill.pipeline import StageContext
from distill.patterns import SPANNING, Pattern
from distill.sparsity import masked_modules, remove_masks
from distill.artifacts import DATA_FILE, STUDENT_DIR
from distill.structured import shrink
from distill.targets import linearize, restore_conv1d
from distill.student import check_finite, load_student


def verify_structure(model: torch.nn.Module, pattern: Pattern) -> None:
    for name, module in masked_modules(model):
        if bool((module.weight[~module.mask] != 0).any()):
            raise DistillError(f"{name}: weights outside the mask are not zero")
        bad = pattern.violations(module.mask)
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


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    if not accelerator.is_main_process:
        return {}
    student_dir = ctx.stage_dir("distill") / STUDENT_DIR
    spec = json.loads((student_dir / "sparsity.json").read_text())
    pattern, masked = Pattern.from_spec(spec), spec["masked"]
    student = load_student(student_dir)
    check_finite(student, f"the student in {student_dir}")  # before the structure check: NaN reads as unpruned
    verify_structure(student, pattern)
    ctx.log(f"[export] {len(masked)} projections verified: {pattern.describe()}")

    tokenizer = AutoTokenizer.from_pretrained(ctx.stage_dir("teacher") / "tokenizer")
    dense = remove_masks(student)
    hf_dir = ctx.work_dir / "hf"
    shrunk = None
    if pattern.kind in SPANNING and config.export.shrink:
        shrunk = shrink_and_verify(dense, pattern.kind, _probe_batch(ctx))
    save_in_hf_layout(dense, hf_dir)
    tokenizer.save_pretrained(hf_dir)
    summary = {"verified": True, "pattern": pattern.describe(), "masked": len(masked), "hf_dir": str(ctx.final_dir / hf_dir.name),
               "dense_bytes": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))}
    if shrunk is not None:
        summary["shrunk"] = shrunk
        summary["note"] = (f"{pattern.describe()}: exported as a smaller dense model ("
                           + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in shrunk.items() if old != new) + ")")
        ctx.log(f"[export] {summary['note']}")
        summary["packed_dir"] = None
        return summary
    if pattern.kind != "nm":
        summary["packed_dir"] = None
        summary["note"] = f"{pattern.describe()}: exported dense-with-zeros only, no sparse kernel runs this pattern"
        ctx.log(f"[export] {summary['note']}")
        return summary

    packed_dir = ctx.work_dir / "packed"
    save_packed(dense, masked, pattern.n, pattern.m, packed_dir)
    tokenizer.save_pretrained(packed_dir)
    # the round trip: hf/ as any user would load it, against packed/ unpacked by our loader
    from_hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    linearize(from_hf)  # compared in the layout the packed form keeps
    from_packed = load_packed(packed_dir).eval()
    hf_state, packed_state = from_hf.state_dict(), from_packed.state_dict()
    mismatched = [name for name in hf_state if not torch.equal(hf_state[name], packed_state[name])]
    if mismatched:
        raise DistillError(f"packed export does not reproduce the dense export: {mismatched[:3]} differ")
    probe = _probe_batch(ctx)
    with torch.no_grad():
        same_logits = torch.equal(from_hf(input_ids=probe).logits, from_packed(input_ids=probe).logits)
    if not same_logits:
        raise DistillError("packed export loads with the same weights but different logits")
    summary.update({"packed_dir": str(ctx.final_dir / packed_dir.name), "packed_bytes": (packed_dir / "model.safetensors").stat().st_size})
    ctx.log(f"[export] packed form reproduces the dense export exactly ({summary['packed_bytes']} vs "
            f"{summary['dense_bytes']} bytes)")
    if not pattern.accelerated:
        summary["note"] = f"{pattern.describe()}: packed, but the sparse runtime runs 2:4 only"
    elif torch.cuda.is_available():
        errors = sparse_kernel_errors(packed_dir, from_hf, masked, probe)
        summary["sparse_kernel_relative_error"] = errors
        for path, error in errors.items():
            if error > config.export.kernel_tolerance:
                raise DistillError(f"2:4 kernel path {path}: logits differ from dense by {error:.3g} (> export.kernel_tolerance)")
        ctx.log(f"[export] 2:4 kernels match the dense model: relative error {errors}")
    return summary


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


def _probe_batch(ctx: StageContext) -> torch.Tensor:
    data = load_tensors(ctx.stage_dir("teacher") / DATA_FILE)
    return data["train"][:2].long()
