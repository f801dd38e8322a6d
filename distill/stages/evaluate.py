"""Stage 5, evaluate: teacher vs one-shot pruned vs distilled student on every held-out source and on
the extra text files in `eval.files`; writes report.json (for machines) and report.md + report.png.

Per source the report holds teacher.ppl, oneshot.ppl, oneshot.kl, student.ppl, student.kl, where kl
is KL(teacher || model) per token in nats at temperature 1, and ppl uses non-overlapping blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.data import pack, tokenize_files
from distill.calibration import calibration_blocks
from distill.evaluation import activation_sparsity_curve, activation_table, score_models
from distill.io import write_json, write_text
from distill.models import load_teacher
from distill.pipeline import StageContext
from distill.artifacts import STUDENT_DIR, read_metrics, read_sparsity_spec, read_summary, read_token_blocks
from distill.sparsity.activations import remove_thresholds, set_thresholds
from distill.sparsity.masks import masked_modules, masked_weight
from distill.student import load_student

MODELS = ("teacher", "oneshot", "student")


def eval_sets(ctx: StageContext, tokenizer) -> dict[str, torch.Tensor]:
    sets = read_token_blocks(ctx.stage_dir("teacher")).heldout_sets()
    for path in ctx.config.eval.files:
        with ctx.accelerator.main_process_first():
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
    student = AutoModelForCausalLM.from_pretrained(ctx.stage_dir("export") / "hf", dtype=teacher.dtype).to(device).eval()
    models = {"teacher": teacher, "oneshot": oneshot, "student": student}

    sources = {}
    for name, blocks in sets.items():
        scores = score_models(models, blocks, accelerator, config.eval.batch_size, desc=f"evaluating {name}")
        scores["tokens"] = int(blocks.numel())
        scores["block_size"] = int(blocks.shape[1])
        sources[name] = scores
    activations = _activation_sparsity(ctx, models, sets, sources)
    if not accelerator.is_main_process:
        return {}

    trained = load_student(ctx.stage_dir("distill") / STUDENT_DIR)
    layers = layer_table(teacher, oneshot, trained)
    export = read_summary(ctx.stage_dir("export"))
    coverage = read_summary(ctx.stage_dir("prune")).get("coverage")
    report = {
        "sources": sources,
        "export": export,
        "coverage": coverage,
        "sparsity": {row["name"]: row["sparsity"] for row in layers},
        "layers": layers,
        "config": {"teacher": config.teacher.source, "criterion": config.prune.criterion,
                   "pattern": export.get("pattern", ""), "steps": config.train.steps},
        "activations": activations,
    }
    write_json(ctx.work_dir / "report.json", report)
    history = _training_history(ctx)
    _plot(ctx.work_dir / "report.png", layers, history, activations)
    write_text(ctx.work_dir / "report.md", _markdown(report, history))
    ctx.log("\n" + _table(sources))
    ctx.log(f"[evaluate] report: {ctx.run_dir / 'evaluate' / 'report.md'}")
    return {name: {model: scores[model] for model in (*MODELS, "student_thresholded") if model in scores}
            for name, scores in sources.items()}


def _activation_sparsity(ctx: StageContext, models: dict, sets: dict[str, torch.Tensor], sources: dict) -> dict:
    """Activation sparsity in the report: per layer and projection input of each model, the zeros
    and |x| quantiles its weights see; the teacher's perplexity under training-free sparsity at
    eval.activation_levels; and, when the student has input thresholds, its perplexity and KL with
    them (added to `sources` as "student_thresholded"; the hf/ export runs without them)."""
    config, accelerator = ctx.config, ctx.accelerator
    batch = config.eval.batch_size
    result: dict = {"target": config.activations.target, "allocation": config.activations.allocation.value}
    spec = read_sparsity_spec(ctx.stage_dir("distill") / STUDENT_DIR)
    if spec.input_thresholds:
        student = models["student"]
        set_thresholds(student, spec.input_thresholds)
        for name, blocks in sets.items():
            scores = score_models({"teacher": models["teacher"], "student_thresholded": student}, blocks, accelerator,
                                  batch, desc=f"student with thresholds on {name}")
            sources[name]["student_thresholded"] = scores["student_thresholded"]
    if config.eval.activation_levels:
        calibration = calibration_blocks(read_token_blocks(ctx.stage_dir("teacher")).train, config.calibration.num_blocks)
        result["teacher_training_free"] = activation_sparsity_curve(models["teacher"], calibration, sets,
                                                                    list(config.eval.activation_levels), accelerator, batch)
    if accelerator.is_main_process:  # only it writes the report; the tables need no other rank
        probe = next(iter(sets.values()))[:batch]  # the inputs as each model's weights see them
        result["inputs"] = {name: activation_table(model, probe, batch) for name, model in models.items()}
    if spec.input_thresholds:
        remove_thresholds(models["student"])
    return result


def _training_history(ctx: StageContext) -> list[dict]:
    return [row for row in read_metrics(ctx.stage_dir("distill")) if "loss" in row]  # a window whose every step was skipped has none


def _table(sources: dict) -> str:
    lines = ["| source | tokens | teacher ppl | one-shot ppl | one-shot KL | student ppl | student KL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in sources.items():
        lines.append(f"| {name} | {s['tokens']} | {s['teacher']['ppl']:.2f} | {s['oneshot']['ppl']:.2f} | "
                     f"{s['oneshot']['kl']:.4f} | {s['student']['ppl']:.2f} | {s['student']['kl']:.4f} |")
    return "\n".join(lines)


def _markdown(report: dict, history: list[dict]) -> str:
    config, export = report["config"], report["export"]
    mean_sparsity = sum(report["sparsity"].values()) / max(len(report["sparsity"]), 1)
    parts = [
        "# distill report", "",
        f"Teacher `{config['teacher']}`, {config['criterion']} {config['pattern']} masks, "
        f"{config['steps']} distillation steps.", "",
        "## Quality on held-out text", "",
        "KL is KL(teacher || model) per token in nats; perplexity over non-overlapping blocks.", "",
        _table(report["sources"]), "",
        "## Export", "",
        f"- structure verified: {export.get('verified')} ({export.get('masked')} projections, "
        f"mean sparsity {mean_sparsity:.3f})",
    ]
    coverage = report.get("coverage")
    if coverage:  # run dirs pruned before the coverage was recorded have none
        parts.append(f"- pruned {coverage['pruned']} of {coverage['decoder_linears']} decoder linear projections, "
                     f"{coverage['pruned_weight_fraction']:.1%} of the decoder's linear weights")
        for name, reason in coverage["left_dense"].items():
            parts.append(f"  - `{name}` dense: {reason}")
    if export.get("packed_dir"):
        parts.append(f"- packed form {export['packed_bytes']} bytes vs dense-with-zeros {export['dense_bytes']} bytes, "
                     "reproduces it bitwise")
    if export.get("note"):
        parts.append(f"- {export['note']}")
    if "sparse_kernel_relative_error" in export:
        for path, error in export["sparse_kernel_relative_error"].items():
            parts.append(f"- 2:4 kernel path `{path}`: logits vs dense, relative error {error:.3g}")
    if history:
        parts += ["", "## Training", "",
                  f"Loss {history[0]['loss']:.4f} at step {history[0]['step']} -> {history[-1]['loss']:.4f} at step "
                  f"{history[-1]['step']}; last logged throughput {history[-1]['tokens_per_s']:.0f} tokens/s."]
    parts += _activation_markdown(report["activations"], report["sources"])
    parts += ["", "![per-layer sparsity, weight error, training loss and activation sparsity](report.png)", ""]
    return "\n".join(parts)


def _activation_markdown(activations: dict, sources: dict) -> list[str]:
    parts = ["", "## Activation sparsity", ""]
    if any("student_thresholded" in scores for scores in sources.values()):
        parts += [f"The student zeroes {activations['target']:.0%} of its projection inputs ({activations['allocation']} "
                  "allocation) when loaded from `export/packed` with `distill.runtime.load_sparse_model`; `export/hf` "
                  "runs without the thresholds. Its quality both ways:", "",
                  "| source | student ppl (hf, dense inputs) | KL | student ppl (thresholds) | KL |", "|---|---:|---:|---:|---:|"]
        for name, s in sources.items():
            parts.append(f"| {name} | {s['student']['ppl']:.2f} | {s['student']['kl']:.4f} | "
                         f"{s['student_thresholded']['ppl']:.2f} | {s['student_thresholded']['kl']:.4f} |")
        parts.append("")
    curve = activations.get("teacher_training_free")
    if curve:
        levels = list(next(iter(curve.values())))
        parts += ["The teacher's perplexity with training-free activation sparsity (every projection input zeroed "
                  "at the same fraction, thresholds from calibration text, no training):", "",
                  "| source | " + " | ".join(f"{float(level):.0%}" for level in levels) + " |",
                  "|---|" + "---:|" * len(levels)]
        for name, values in curve.items():
            parts.append(f"| {name} | " + " | ".join(f"{values[level]:.2f}" for level in levels) + " |")
        parts.append("")
    tables = activations.get("inputs", {})
    if tables:
        labels = list(dict.fromkeys(row["input"] for rows in tables.values() for row in rows))
        parts += ["Fraction of exact zeros in the projection inputs as the weights see them, mean over layers "
                  "(median |x| in brackets; per layer in report.json):", "",
                  "| input | " + " | ".join(tables) + " |", "|---|" + "---:|" * len(tables)]
        for label in labels:
            cells = []
            for rows in tables.values():
                mine = [row for row in rows if row["input"] == label]
                cells.append(f"{sum(r['zero_fraction'] for r in mine) / len(mine):.3f} "
                             f"({sum(r['q0.5'] for r in mine) / len(mine):.3g})" if mine else "-")
            parts.append(f"| {label} | " + " | ".join(cells) + " |")
    return parts


def _plot(path: Path, layers: list[dict], history: list[dict], activations: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((left, middle, right), (zeros, curve, unused)) = plt.subplots(2, 3, figsize=(16, 8))
    unused.axis("off")
    index = range(len(layers))
    left.bar(index, [row["sparsity"] for row in layers])
    left.set(title="sparsity per projection", xlabel="projection (model order)", ylabel="fraction of zeros", ylim=(0, 1))
    middle.plot(index, [row["oneshot_weight_error"] for row in layers], label="one-shot")
    middle.plot(index, [row["student_weight_error"] for row in layers], label="distilled")
    middle.set(title="relative weight error vs teacher", xlabel="projection (model order)")
    middle.legend()
    if history:
        right.plot([row["step"] for row in history], [row["loss"] for row in history])
    right.set(title="distillation loss", xlabel="step", ylabel="loss")
    for name, rows in activations.get("inputs", {}).items():
        by_layer: dict[int, list[float]] = {}
        for row in rows:
            by_layer.setdefault(row["layer"], []).append(row["zero_fraction"])
        zeros.plot(list(by_layer), [sum(v) / len(v) for v in by_layer.values()], marker=".", label=name)
    zeros.set(title="zeros in projection inputs (mean per layer)", xlabel="decoder layer", ylim=(0, 1))
    zeros.legend()
    sweep = activations.get("teacher_training_free")
    if sweep:
        for name, values in sweep.items():
            curve.plot([float(level) for level in values], list(values.values()), marker="o", label=name)
        curve.set(title="teacher ppl, training-free activation sparsity", xlabel="fraction of inputs zeroed",
                  ylabel="perplexity", yscale="log")
        curve.legend()
    else:  # eval.activation_levels is empty
        curve.axis("off")
    figure.tight_layout()
    temp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temp, dpi=90)
    plt.close(figure)
    temp.replace(path)
