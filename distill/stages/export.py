"""Stage 4, export: check the N:M structure, write the student in two forms, and prove they agree.

  hf/      a Hugging Face model dir (config, tokenizer, safetensors) with zeros where pruned: loads
           with AutoModelForCausalLM.from_pretrained anywhere
  packed/  kept values + positions per group (see distill.sparsity.packing), plus config and tokenizer;
           its sparsity.json carries the activation thresholds, which load_sparse_model applies (hf/
           runs without them, and the report gives the student's perplexity both ways)
For mlp_channels and heads patterns (export.shrink), hf/ is instead a smaller dense model with the
removed channels or heads cut out, checked to give the dense-with-zeros model's logits.
The packed form is loaded back and must reproduce hf/ bitwise (weights and logits). On CUDA the
packed student also runs on the 2:4 runtime (distill.runtime: our Triton kernel, then cuSPARSELt)
and its logits are compared with the dense model's. Both dirs get a model card (README.md,
distill.export.model_card; the evaluate stage adds the report to it), and with export.push_to_hub the
verified packed dir (hf/ without one) is uploaded.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.run.artifacts import STUDENT_DIR, ExportRecord, read_distill_record, read_token_blocks, write_export_record
from distill.sparsity.spec import Layout, SparsitySpec, read_sparsity_spec, write_sparsity_spec
from distill.errors import DistillError
from distill.run.pipeline import StageContext
from distill.export.verify import save_in_hf_layout, shrink_and_verify, sparse_kernel_errors, verify_structure
from distill.export.model_card import StudentFacts, model_card, push_to_hub, teacher_hub_id, teacher_license, write_model_card
from distill.sparsity.activations import remove_thresholds
from distill.sparsity.masks import remove_masks
from distill.runtime import load_sparse_model
from distill.sparsity.packing import save_packed
from distill.sparsity.patterns import NM, NoPruning
from distill.targets import linearize
from distill.student import check_finite, load_student


def run(ctx: StageContext) -> dict:
    if not ctx.accelerator.is_main_process:
        return {}
    summary = _export(ctx)  # the record's fields, gathered as the export goes
    facts = _student_facts(ctx, read_sparsity_spec(ctx.stage_dir("distill") / STUDENT_DIR))
    summary["card"] = dataclasses.asdict(facts)
    for form in ("hf", "packed"):
        if (ctx.work_dir / form).is_dir():
            write_model_card(ctx.work_dir / form, model_card(facts, form))
    repo_id = ctx.config.export.push_to_hub
    if repo_id:
        form = "packed" if (ctx.work_dir / "packed").is_dir() else "hf"
        summary["pushed"] = {"repo_id": repo_id, "dir": form, "url": push_to_hub(ctx.work_dir / form, repo_id)}
        ctx.log(f"[export] {form}/ uploaded to {repo_id}")
    record = ExportRecord(**summary)
    write_export_record(ctx.work_dir, record)
    return record.to_json()


def _student_facts(ctx: StageContext, spec: SparsitySpec) -> StudentFacts:
    config, train = ctx.config, ctx.config.train
    runtime = []
    if spec.input_thresholds:
        runtime.append(f"{config.activations.target:.0%} of the projection inputs zeroed by thresholds on "
                       f"{len(spec.input_thresholds)} projections")
    if spec.streaming is not None:
        runtime.append(f"{spec.streaming.count()} KV heads attend to the first {spec.streaming.sink} and last "
                       f"{spec.streaming.window} tokens only")
    recipe = (f"{train.loss.divergence} to the teacher at temperature {train.loss.temperature:g}, AdamW at lr "
              f"{train.lr:g}, {train.global_batch_size} blocks of {config.data.block_size} tokens per step, "
              f"{train.masks.mode} masks")
    tokens = read_distill_record(ctx.stage_dir("distill")).tokens
    return StudentFacts(config.teacher.source, teacher_hub_id(config.teacher), teacher_license(config.teacher),
                        spec.pattern.describe(), str(spec.criterion or "-"), train.steps, tokens, recipe,
                        "; ".join(runtime))


def _export(ctx: StageContext) -> dict:
    config = ctx.config
    student_dir = ctx.stage_dir("distill") / STUDENT_DIR
    spec = read_sparsity_spec(student_dir)
    pattern, masked = spec.pattern, spec.masked
    student = load_student(student_dir)
    remove_thresholds(student)  # hf/ and the packed weights run without them; packed/ carries them in its spec
    check_finite(student, f"the student in {student_dir}")  # before the structure check: NaN reads as unpruned
    verify_structure(student, pattern)
    ctx.log(f"[export] {len(masked)} projections verified: {pattern.describe()}")

    tokenizer = AutoTokenizer.from_pretrained(ctx.stage_dir("teacher") / "tokenizer")
    dense = remove_masks(student)
    hf_dir = ctx.work_dir / "hf"
    shrunk = None
    if pattern.spans_projections and config.export.shrink:
        shrunk = shrink_and_verify(dense, pattern.kind, _probe_batch(ctx))
    save_in_hf_layout(dense, hf_dir)
    # what load_sparse_model needs beside the weights: thresholds and streaming heads (from_pretrained ignores it)
    write_sparsity_spec(hf_dir, spec.replace(layout=Layout.DENSE))
    tokenizer.save_pretrained(hf_dir)
    summary = {"verified": True, "pattern": pattern.describe(), "masked": len(masked), "hf_dir": str(ctx.final_dir / hf_dir.name),
               "dense_bytes": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))}
    if shrunk is not None:
        summary["shrunk"] = {key: list(sizes) for key, sizes in shrunk.items()}
        summary["note"] = (f"{pattern.describe()}: exported as a smaller dense model ("
                           + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in shrunk.items() if old != new) + ")")
        ctx.log(f"[export] {summary['note']}")
        summary["packed_dir"] = None
        return summary
    if not isinstance(pattern, NM):
        summary["packed_dir"] = None
        summary["note"] = (f"{pattern.describe()}: exported dense, no weight was pruned" if isinstance(pattern, NoPruning) else
                           f"{pattern.describe()}: exported dense-with-zeros only, no sparse kernel runs this pattern")
        ctx.log(f"[export] {summary['note']}")
        return summary

    packed_dir = ctx.work_dir / "packed"
    save_packed(dense, spec, packed_dir)
    tokenizer.save_pretrained(packed_dir)
    # the round trip: hf/ as any user would load it, against packed/ unpacked by our loader
    from_hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    linearize(from_hf)  # compared in the layout the packed form keeps
    from_packed = load_sparse_model(packed_dir, sparse=False, runtime_sparsity=False)  # dense with zeros, as hf/
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


def _probe_batch(ctx: StageContext) -> torch.Tensor:
    return read_token_blocks(ctx.stage_dir("teacher")).train[:2]
