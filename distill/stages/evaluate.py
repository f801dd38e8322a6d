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
from distill.evaluation import score_models
from distill.io import write_json, write_text
from distill.models import load_teacher
from distill.pipeline import StageContext
from distill.artifacts import STUDENT_DIR, read_metrics, read_summary, read_token_blocks
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
    }
    write_json(ctx.work_dir / "report.json", report)
    history = _training_history(ctx)
    _plot(ctx.work_dir / "report.png", layers, history)
    write_text(ctx.work_dir / "report.md", _markdown(report, history))
    ctx.log("\n" + _table(sources))
    ctx.log(f"[evaluate] report: {ctx.run_dir / 'evaluate' / 'report.md'}")
    return {name: {model: scores[model] for model in MODELS} for name, scores in sources.items()}


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
    parts += ["", "![per-layer sparsity, weight error and training loss](report.png)", ""]
    return "\n".join(parts)


def _plot(path: Path, layers: list[dict], history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4))
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
    figure.tight_layout()
    temp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temp, dpi=90)
    plt.close(figure)
    temp.replace(path)
