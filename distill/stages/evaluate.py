"""Stage 5, evaluate: teacher vs one-shot pruned vs distilled student on every held-out source and on
the extra text files in `eval.files`; writes report.json (for machines) and report.md + report.png.

Per source the report holds teacher.ppl, oneshot.ppl, oneshot.kl, student.ppl, student.kl, where kl
is KL(teacher || model) per token in nats at temperature 1, and ppl uses non-overlapping blocks.
The student is scored as export/hf runs it (dense inputs, full attention) and, when its spec has
input thresholds or streaming heads, as load_sparse_model runs it ("student_runtime").
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.data.corpus import pack, tokenize_files
from distill.sparsity.calibration import calibration_blocks
from distill.eval.scoring import (activation_sparsity_curve, activation_table, layer_errors, score_models,
                                  weighted_zero_fraction)
from distill.io import atomic_write, write_json, write_text
from distill.models import load_teacher
from distill.run.pipeline import StageContext
from distill.runtime import load_sparse_model
from distill.export.model_card import StudentFacts, model_card, write_model_card
from distill.eval.report import RUNTIME, card_tables, markdown, plot, quality_table
from distill.eval.speed import measure_speed
from distill.run.artifacts import STUDENT_DIR, ExportRecord, read_export_record, read_metrics, read_prune_record, read_token_blocks
from distill.sparsity.spec import SparsitySpec, read_sparsity_spec
from distill.sparsity.head_selection import head_statistics, kv_cache_bytes
from distill.sparsity.masks import masked_modules, masked_weight
from distill.student import load_student
from distill.eval.zero_shot import zero_shot_accuracy

MODELS = ("teacher", "oneshot", "student")
CARD_PLOT = "report.png"  # the report's plot, copied beside each export dir's model card


def eval_sets(ctx: StageContext, tokenizer) -> dict[str, torch.Tensor]:
    sets = read_token_blocks(ctx.stage_dir("teacher")).heldout_sets()
    for path in ctx.config.eval.files:
        blocks = pack(tokenize_files([path], tokenizer), ctx.config.eval.block_size)
        if ctx.config.eval.max_blocks:
            blocks = blocks[: ctx.config.eval.max_blocks]
        sets[Path(path).stem] = blocks
    return sets


@torch.no_grad()
def layer_table(teacher: torch.nn.Module, oneshot: torch.nn.Module, student: torch.nn.Module) -> list[dict]:
    """Per masked projection: sparsity, and how far one-shot and student weights are from the teacher's."""
    rows = []
    students = dict(masked_modules(student))
    for name, module in masked_modules(oneshot):
        dense = teacher.get_submodule(name).weight.float().cpu()
        weight = masked_weight(students[name]).float().cpu()
        rows.append({
            "name": name,
            "sparsity": float((weight == 0).float().mean()),
            "oneshot_weight_error": float((masked_weight(module).float().cpu() - dense).norm() / dense.norm()),
            "student_weight_error": float((weight - dense).norm() / dense.norm()),
        })
    return rows


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    tokenizer = AutoTokenizer.from_pretrained(ctx.stage_dir("teacher") / "tokenizer")
    sets = eval_sets(ctx, tokenizer)
    device = accelerator.device
    teacher = load_teacher(config.teacher, device)
    oneshot = load_student(ctx.stage_dir("prune") / STUDENT_DIR, device, teacher.dtype)
    models = {"teacher": teacher, "oneshot": oneshot, "student": _exported_student(ctx, teacher.dtype)}
    spec = read_sparsity_spec(ctx.stage_dir("distill") / STUDENT_DIR)
    if spec.input_thresholds or spec.streaming:  # it computes differently from export/hf: score it too
        models[RUNTIME] = _runtime_student(ctx, teacher.dtype)

    sources = {}
    for name, blocks in sets.items():  # one pass: the teacher's logits serve every model's KL
        scores = score_models(models, blocks, accelerator, config.eval.batch_size, desc=f"evaluating {name}")
        scores["tokens"] = int(blocks.numel())
        scores["block_size"] = int(blocks.shape[1])
        sources[name] = scores
    # the tables measure each model as it runs: the student with its thresholds and streaming heads
    measured = {"teacher": teacher, "oneshot": oneshot, "student": models.get(RUNTIME, models["student"])}
    activations = _activation_sparsity(ctx, measured, sets)
    attention = _attention_sparsity(ctx, measured, sets, spec)
    probe = _probe_blocks(ctx, sets)
    history = _training_history(ctx)
    recovery = _recovery(ctx, measured, probe, history)
    if not accelerator.is_main_process:
        return {}
    zero_shot = zero_shot_accuracy(measured, tokenizer, config.eval.lm_eval) if config.eval.lm_eval.tasks else {}

    trained = load_student(ctx.stage_dir("distill") / STUDENT_DIR)
    layers = layer_table(teacher, oneshot, trained)
    export = read_export_record(ctx.stage_dir("export"))
    report = {
        "sources": sources,
        "export": export.to_json(),
        "coverage": read_prune_record(ctx.stage_dir("prune")).coverage,
        "sparsity": {row["name"]: row["sparsity"] for row in layers},
        "layers": layers,
        "config": {"teacher": config.teacher.source, "criterion": config.prune.criterion,
                   "pattern": export.pattern, "steps": config.train.steps},
        "activations": activations,
        "attention": attention,
        "zero_shot": zero_shot,
        "recovery": recovery,
        "layer_errors": {"blocks": len(probe), **layer_errors(teacher, {"oneshot": oneshot, "student": measured["student"]},
                                                              probe, config.eval.batch_size)},
    }
    speed = _speed(ctx, teacher, models.get(RUNTIME), sets)
    if speed:
        report["speed"] = speed
    report["plot"] = plot(ctx.work_dir / "report.png", report, history)
    write_json(ctx.work_dir / "report.json", report)
    write_text(ctx.work_dir / "report.md", markdown(report, history))
    _complete_model_cards(ctx, export, report)
    ctx.log("\n" + quality_table(sources))
    ctx.log(f"[evaluate] report: {ctx.run_dir / 'evaluate' / 'report.md'}")
    return {name: {model: scores[model] for model in (*MODELS, RUNTIME) if model in scores}
            for name, scores in sources.items()}


def _complete_model_cards(ctx: StageContext, export: ExportRecord, report: dict) -> None:
    """The export dirs' model cards again, now with the report's quality tables and its plot."""
    for form in ("hf", "packed"):
        directory = ctx.stage_dir("export") / form
        if directory.is_dir():
            atomic_write(directory / CARD_PLOT, lambda temp: shutil.copyfile(ctx.work_dir / "report.png", temp))
            write_model_card(directory, model_card(StudentFacts(**export.card), form, card_tables(report), CARD_PLOT))


def _exported_student(ctx: StageContext, dtype: torch.dtype) -> torch.nn.Module:
    """The student as export/hf holds it: dense inputs, full attention."""
    hf_dir = ctx.stage_dir("export") / "hf"
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(ctx.accelerator.device).eval()


def _runtime_student(ctx: StageContext, dtype: torch.dtype) -> torch.nn.Module:
    """The student as a user runs it: load_sparse_model on the packed export (export/hf where there is
    none), its projections on the sparse kernels, with the input thresholds and streaming heads its
    spec names (export/hf runs without them)."""
    export = ctx.stage_dir("export")
    directory = export / "packed" if (export / "packed").is_dir() else export / "hf"
    return load_sparse_model(directory, ctx.accelerator.device, dtype)


def _attention_sparsity(ctx: StageContext, models: dict, sets: dict[str, torch.Tensor], spec: SparsitySpec) -> dict:
    """Attention sparsity in the report: per layer and KV head of each model (as it runs: the
    one-shot student and the student with their streaming heads), the attention mass
    inside attention.sink + window, the fraction of probabilities below 1e-3 and the entropy, on the
    first eval.attention_blocks blocks of the first eval set; and the KV cache bytes at that block
    size, dense against the student's streaming heads."""
    config = ctx.config
    attention = config.attention
    result: dict = {"sink": attention.sink, "window": attention.window, "streaming_fraction": attention.streaming_fraction,
                    "select": attention.select.value}
    if spec.streaming is not None:
        result["streaming"] = spec.streaming.heads
        context = config.eval.block_size
        kv = kv_cache_bytes(models["teacher"], spec.streaming.heads, context, spec.streaming.sink, spec.streaming.window,
                            bytes_per_value=models["teacher"].dtype.itemsize)
        result["kv_cache"] = {"context": context, "dense_bytes": kv.dense, "bytes": kv.sparse, "ratio": kv.ratio}
    if config.eval.attention_blocks and ctx.accelerator.is_main_process:
        probe = next(iter(sets.values()))[:config.eval.attention_blocks]
        try:
            result["heads"] = {name: head_statistics(model, probe, attention.sink, attention.window)
                               for name, model in models.items()}
        except ValueError as error:  # an architecture the registered attention function cannot run
            result["heads_not_measured"] = str(error)
            ctx.log(f"[evaluate] attention per head not measured: {error}")
    return result


def _activation_sparsity(ctx: StageContext, models: dict, sets: dict[str, torch.Tensor]) -> dict:
    """Activation sparsity in the report: per layer and projection input of each model, the zeros
    and |x| quantiles its weights see, and the teacher's perplexity under training-free sparsity at
    eval.activation_levels."""
    config, accelerator = ctx.config, ctx.accelerator
    batch = config.eval.batch_size
    result: dict = {"target": config.activations.target, "allocation": config.activations.allocation.value}
    if config.eval.activation_levels:
        calibration = calibration_blocks(read_token_blocks(ctx.stage_dir("teacher")).train, config.calibration.num_blocks)
        result["teacher_training_free"] = activation_sparsity_curve(models["teacher"], calibration, sets,
                                                                    list(config.eval.activation_levels), accelerator, batch)
    if accelerator.is_main_process:  # only it writes the report; the tables need no other rank
        probe = next(iter(sets.values()))[:batch]  # the inputs as each model's weights see them
        result["inputs"] = {name: activation_table(model, probe, batch) for name, model in models.items()}
        result["zeroed"] = {name: weighted_zero_fraction(rows) for name, rows in result["inputs"].items()}
    return result


def _speed(ctx: StageContext, teacher: torch.nn.Module, runtime: torch.nn.Module | None,
           sets: dict[str, torch.Tensor]) -> dict:
    """Decode and prefill tokens/s and tensor bytes of the teacher and the student as it runs (with its
    thresholds and streaming heads; loaded here when scoring did not need it), timed in turns on this
    machine, from the first eval block; eval.speed_repeats rounds (0: not measured, {})."""
    repeats = ctx.config.eval.speed_repeats
    if not repeats:
        return {}
    runtime = runtime if runtime is not None else _runtime_student(ctx, teacher.dtype)
    result = measure_speed({"teacher": teacher, RUNTIME: runtime}, next(iter(sets.values()))[0], repeats=repeats)
    for name, ratios in result["ratios"].items():
        ctx.log(f"[evaluate] on this machine, {name} vs teacher: decode {ratios['decode']:.2f}x, "
                f"prefill {ratios['prefill']:.2f}x the tokens/s")
    return result


def _probe_blocks(ctx: StageContext, sets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The held-out blocks the recovery curve was measured on (train.eval_blocks of them, sources in
    name order), which the per-layer error measures too; the first eval set's when there are none."""
    heldout = read_token_blocks(ctx.stage_dir("teacher")).all_heldout()
    return (heldout if heldout is not None else next(iter(sets.values())))[:ctx.config.train.eval_blocks]


def _recovery(ctx: StageContext, models: dict, probe: torch.Tensor, history: list[dict]) -> dict:
    """The recovery curve (the held-out rows of distill's metrics), with the teacher's and the
    one-shot student's perplexity and KL on the same blocks, its reference lines."""
    rows = [row for row in history if "heldout_kl" in row]
    if not rows:
        return {}
    scores = score_models({"teacher": models["teacher"], "oneshot": models["oneshot"]}, probe, ctx.accelerator,
                          ctx.config.eval.batch_size, desc="recovery references")
    return {"blocks": len(probe), "steps": [row["step"] for row in rows],
            "heldout_ppl": [row["heldout_ppl"] for row in rows], "heldout_kl": [row["heldout_kl"] for row in rows],
            "teacher_ppl": scores["teacher"]["ppl"], "oneshot_ppl": scores["oneshot"]["ppl"],
            "oneshot_kl": scores["oneshot"]["kl"]}


def _training_history(ctx: StageContext) -> list[dict]:
    return [row for row in read_metrics(ctx.stage_dir("distill")) if "loss" in row]  # a window whose every step was skipped has none
