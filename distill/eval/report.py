"""The evaluate stage's report rendered for people: report.md (tables) and report.png (plots), from
the report dict that report.json holds. Nothing here computes a score."""

from __future__ import annotations

from pathlib import Path

from distill.io import atomic_write

RUNTIME = "student_runtime"  # the student with its input thresholds and streaming heads (load_sparse_model)


def quality_table(sources: dict) -> str:
    lines = ["| source | tokens | teacher ppl | one-shot ppl | one-shot KL | student ppl | student KL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in sources.items():
        lines.append(f"| {name} | {s['tokens']} | {s['teacher']['ppl']:.2f} | {s['oneshot']['ppl']:.2f} | "
                     f"{s['oneshot']['kl']:.4f} | {s['student']['ppl']:.2f} | {s['student']['kl']:.4f} |")
    return "\n".join(lines)


def markdown(report: dict, history: list[dict]) -> str:
    config, export = report["config"], report["export"]
    mean_sparsity = sum(report["sparsity"].values()) / max(len(report["sparsity"]), 1)
    parts = [
        "# distill report", "",
        f"Teacher `{config['teacher']}`, {config['criterion']} {config['pattern']} masks, "
        f"{config['steps']} distillation steps.", "",
        "## Quality on held-out text", "",
        "KL is KL(teacher || model) per token in nats; perplexity over non-overlapping blocks.", "",
        quality_table(report["sources"]), "",
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
    if export.get("sparse_kernel_relative_error"):  # measured on CUDA only
        for path, error in export["sparse_kernel_relative_error"].items():
            parts.append(f"- 2:4 kernel path `{path}`: logits vs dense, relative error {error:.3g}")
    if history:
        parts += ["", "## Training", "",
                  f"Loss {history[0]['loss']:.4f} at step {history[0]['step']} -> {history[-1]['loss']:.4f} at step "
                  f"{history[-1]['step']}; last logged throughput {history[-1]['tokens_per_s']:.0f} tokens/s."]
    parts += _zero_shot_markdown(report.get("zero_shot", {}))
    parts += _runtime_markdown(report)
    parts += _activation_markdown(report["activations"])
    parts += _attention_markdown(report.get("attention", {}))
    parts += ["", "![per-layer sparsity, weight error, training loss, activation and attention sparsity](report.png)", ""]
    return "\n".join(parts)


def _activation_markdown(activations: dict) -> list[str]:
    parts = ["", "## Activation sparsity", ""]
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
        zeroed = activations.get("zeroed") or {}
        if any(value is not None for value in zeroed.values()):
            parts.append("| all, weighted by the weights each input multiplies | " + " | ".join(
                f"{zeroed[name]:.3f}" if zeroed.get(name) is not None else "-" for name in tables) + " |")
    return parts


def plot(path: Path, layers: list[dict], history: list[dict], activations: dict, attention: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 3, figsize=(16, 12))
    (left, middle, right), (zeros, curve, unused), heatmaps = axes
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
    _head_heatmaps(figure, heatmaps, attention)
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, dpi=90, format="png"))
    plt.close(figure)


def card_tables(report: dict) -> str:
    """What a model card shows of the report: held-out quality, the runtime-sparsity rows and the
    zero-shot accuracies."""
    parts = ["KL is KL(teacher || model) per token in nats; perplexity over non-overlapping blocks.", "",
             quality_table(report["sources"])]
    parts += _runtime_markdown(report) + _zero_shot_markdown(report.get("zero_shot", {}))
    return "\n".join(parts)


def _runtime_markdown(report: dict) -> list[str]:
    sources = report["sources"]
    if not any(RUNTIME in scores for scores in sources.values()):
        return []
    what = []
    if report["activations"].get("target"):
        what.append(f"zeroes {report['activations']['target']:.0%} of its projection inputs "
                    f"({report['activations']['allocation']} allocation)")
    streaming = report.get("attention", {}).get("streaming")
    if streaming:
        attention = report["attention"]
        what.append(f"streams {sum(len(heads) for heads in streaming.values())} KV heads (sink {attention['sink']} + "
                    f"window {attention['window']}, chosen by {attention['select']})")
    parts = ["", "## The student with runtime sparsity", "",
             f"Loaded from `export/packed` with `distill.runtime.load_sparse_model`, the student {' and '.join(what)}; "
             "`export/hf` runs without either. Its quality both ways:", "",
             "| source | student ppl (hf) | KL | student ppl (runtime sparsity) | KL |", "|---|---:|---:|---:|---:|"]
    for name, s in sources.items():
        parts.append(f"| {name} | {s['student']['ppl']:.2f} | {s['student']['kl']:.4f} | "
                     f"{s[RUNTIME]['ppl']:.2f} | {s[RUNTIME]['kl']:.4f} |")
    return parts


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _attention_markdown(attention: dict) -> list[str]:
    heads, kv = attention.get("heads"), attention.get("kv_cache")
    if attention.get("heads_not_measured"):
        return ["", "## Attention sparsity", "", f"Not measured per head: {attention['heads_not_measured']}."]
    if not heads and not kv:
        return []
    parts = ["", "## Attention sparsity", ""]
    if heads:
        parts += [f"Per KV head on held-out text, mean over layers and heads (per layer and head in report.json): the "
                  f"attention mass inside the first {attention['sink']} + last {attention['window']} tokens, the fraction "
                  "of attention probabilities below 1e-3, and the entropy in nats.", "",
                  "| model | mass in sink + window | probabilities < 1e-3 | entropy |", "|---|---:|---:|---:|"]
        for model, modules in heads.items():
            columns = [[value for stats in modules.values() for value in stats[key]]
                       for key in ("local_mass", "below_floor", "entropy")]
            parts.append(f"| {model} | {_mean(columns[0]):.3f} | {_mean(columns[1]):.3f} | {_mean(columns[2]):.2f} |")
        parts.append("")
    if kv:
        parts.append(f"KV cache at {kv['context']} tokens: {_size(kv['bytes'])} against {_size(kv['dense_bytes'])} dense "
                     f"({kv['ratio']:.3f}x); each streaming head holds {attention['sink']} + {attention['window']} positions.")
    return parts


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def _head_heatmaps(figure, axes, attention: dict) -> None:
    """Layers x KV heads of attention mass inside sink + window, per model; streaming heads crossed."""
    from matplotlib.ticker import MaxNLocator

    heads = attention.get("heads") or {}
    streaming = attention.get("streaming") or {}
    for axis, (model, modules) in zip(axes, heads.items()):
        grid = [stats["local_mass"] for stats in modules.values()]
        image = axis.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        for layer, name in enumerate(modules):
            for head in streaming.get(name, []):
                axis.text(head, layer, "x", ha="center", va="center", color="red", fontsize=7)
        axis.set(title=f"{model}: mass in sink + window", xlabel="KV head", ylabel="layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axis)
    for axis in list(axes)[len(heads):]:
        axis.axis("off")


def _zero_shot_markdown(zero_shot: dict) -> list[str]:
    """Accuracy per task (lm-evaluation-harness, zero-shot), one column per model."""
    if not zero_shot:
        return []
    models = list(zero_shot)
    tasks = list(dict.fromkeys(task for results in zero_shot.values() for task in results))
    parts = ["", "## Zero-shot accuracy", "",
             "lm-evaluation-harness, zero-shot, accuracy ± standard error (acc_norm where the task has it):", "",
             "| task | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for task in tasks:
        cells = []
        for model in models:
            scores = zero_shot[model].get(task, {})
            metric = "acc_norm" if "acc_norm" in scores else "acc"
            stderr = scores.get(f"{metric}_stderr")
            cells.append(f"{scores[metric]:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "") if metric in scores else "-")
        parts.append(f"| {task} | " + " | ".join(cells) + " |")
    return parts
