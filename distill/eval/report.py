"""The evaluate stage's report rendered for people: report.md (tables) and report.png (plots), from
the report dict that report.json holds. Nothing here computes a score."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill.io import atomic_write

RUNTIME = "student_runtime"  # the student with its input thresholds and streaming heads (load_sparse_model)
MODEL_LABELS = {"teacher": "teacher", "oneshot": "one-shot", "student": "distilled", RUNTIME: "distilled, runtime sparsity"}


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
    if coverage:  # the prune record's; a report dict made in code may have none
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
    parts += _speed_markdown(report.get("speed"))
    if history:
        parts += ["", "## Training", "",
                  f"Loss {history[0]['loss']:.4f} at step {history[0]['step']} -> {history[-1]['loss']:.4f} at step "
                  f"{history[-1]['step']}; last logged throughput {history[-1]['tokens_per_s']:.0f} tokens/s."]
    parts += _recovery_markdown(report.get("recovery"))
    parts += _layer_error_markdown(report.get("layer_errors"))
    parts += _zero_shot_markdown(report.get("zero_shot", {}))
    parts += _runtime_markdown(report)
    parts += _activation_markdown(report["activations"])
    parts += _attention_markdown(report.get("attention", {}))
    drawn = report.get("plot", {})
    if drawn.get("omitted"):
        parts += ["", "## Not plotted", "", "Constant in this run, so not drawn:", ""]
        parts += [f"- {line}" for line in drawn["omitted"]]
    parts += ["", f"![{', '.join(drawn.get('panels', []))}](report.png)", ""]
    return "\n".join(parts)


def _speed_markdown(speed: dict | None) -> list[str]:
    """Decode and prefill tokens/s and tensor bytes per model as measured on the machine evaluate ran
    on, with each model's ratios to the baseline (the teacher)."""
    if not speed:
        return []
    machine = speed["device_name"] or speed["cpu"] or "an unnamed CPU"
    baseline = speed["baseline"]
    parts = ["", "## Speed on this machine", "",
             f"Measured by evaluate in one process on {machine} ({speed['device']}, {speed['threads']} threads, "
             f"{speed['dtype']}), batch 1: decode is greedy generation of {speed['new_tokens']} tokens after a "
             f"{speed['decode_prompt_tokens']}-token prompt (KV cache), prefill one forward over "
             f"{speed['prefill_tokens']} tokens; the models were timed in turns, median of {speed['repeats']} rounds. "
             f"Bytes are the models' tensors (shared ones once); projections are the decoder layers' projections. "
             f"Ratios are against the {MODEL_LABELS.get(baseline, baseline)}. This is a measurement on this machine, "
             f"not a promise for another.", "",
             "| model | decode tok/s | prefill tok/s | projections | total | decode x | prefill x | projections x | total x |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for name, row in speed["models"].items():
        ratios = speed["ratios"].get(name, {"decode": 1.0, "prefill": 1.0, "bytes_projections": 1.0, "bytes_total": 1.0})
        parts.append(f"| {MODEL_LABELS.get(name, name)} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['prefill_tokens_per_s']:.1f} | {_size(row['bytes_projections'])} | {_size(row['bytes_total'])} | "
                     + " | ".join(ratio(ratios[key]) for key in ("decode", "prefill", "bytes_projections", "bytes_total"))
                     + " |")
    if speed.get("process_rss_bytes"):
        parts += ["", f"The process held {_size(speed['process_rss_bytes'])} resident after measuring (every model "
                      "evaluate had loaded, not one of them)."]
    return parts


def _recovery_markdown(recovery: dict | None) -> list[str]:
    """The recovery curve's ends, against the teacher and the one-shot student on the same blocks."""
    if not recovery or not recovery.get("steps"):
        return []
    return ["", f"Recovery on {recovery['blocks']} held-out blocks (the teacher: perplexity "
            f"{recovery['teacher_ppl']:.2f}; the one-shot student: perplexity {recovery['oneshot_ppl']:.2f}, KL "
            f"{recovery['oneshot_kl']:.4f}): the student at step {recovery['steps'][0]} perplexity "
            f"{recovery['heldout_ppl'][0]:.2f}, KL {recovery['heldout_kl'][0]:.4f}; at step {recovery['steps'][-1]} "
            f"perplexity {recovery['heldout_ppl'][-1]:.2f}, KL {recovery['heldout_kl'][-1]:.4f}."]


def _layer_error_markdown(errors: dict | None) -> list[str]:
    """Per decoder layer, the relative error of its output hidden state against the teacher's."""
    if not errors:
        return []
    parts = ["", "## Where the damage is", "",
             f"Per decoder layer, ||h - h_teacher|| / ||h_teacher|| of the layer's output hidden state on "
             f"{errors['blocks']} held-out blocks:", "",
             "| layer | one-shot | distilled |", "|---:|---:|---:|"]
    parts += [f"| {layer} | {oneshot:.4f} | {student:.4f} |"
              for layer, (oneshot, student) in enumerate(zip(errors["oneshot"], errors["student"]))]
    return parts


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


@dataclass
class Panel:
    """One plot of report.png: what it draws, and the series it draws (recorded in report.json, so
    what the picture shows can be checked without reading pixels)."""

    title: str
    draw: Callable  # draw(figure, axis)
    series: list[dict]  # {"label", "values"}: the data, each varying
    references: list[dict] = field(default_factory=list)  # {"label", "value"}: horizontal lines


def plot(path: Path, report: dict, history: list[dict]) -> dict:
    """report.png: one panel per kind of data that varies in this run. Returns what it drew: the
    panels' titles, their series and reference lines, and one line of text for each series left
    out because it was constant (report.md prints those)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    omitted: list[str] = []
    candidates = [_recovery_panels(report.get("recovery") or {}, omitted), [_loss_panel(history, omitted)],
                  [_quality_panel(report["sources"], omitted), _speed_panel(report.get("speed"), omitted)],
                  [_layer_error_panel(report.get("layer_errors"), omitted)],
                  [_input_zeros_panel(report["activations"], omitted), _sweep_panel(report["activations"], omitted)],
                  _heatmap_panels(report.get("attention", {}), omitted)]
    panels = [panel for group in candidates for panel in group if panel is not None]
    columns = min(3, max(len(panels), 1))
    rows = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        panel.draw(figure, axis)
        axis.set_title(panel.title)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, dpi=90, format="png"))
    plt.close(figure)
    return {"panels": [panel.title for panel in panels],
            "series": [{"panel": panel.title, **series} for panel in panels for series in panel.series],
            "references": [{"panel": panel.title, **line} for panel in panels for line in panel.references],
            "omitted": omitted}


# the smallest spread a series must have to be drawn: relative to its values on an axis that scales to
# them; of the whole range on an axis fixed to [0, 1] (fractions), where less is not visible
RELATIVE_SPREAD = 1e-4
FIXED_AXIS_SPREAD = 0.01


def _varies(values: list[float], fixed_axis: bool = False) -> bool:
    if len(values) < 2:
        return False
    spread = max(values) - min(values)
    return spread > (FIXED_AXIS_SPREAD if fixed_axis else RELATIVE_SPREAD * max(abs(value) for value in values))


def _varying(what: str, series: dict[str, list[float]], omitted: list[str],
             fixed_axis: bool = False) -> dict[str, list[float]]:
    """The series that vary; each constant one becomes a line of `omitted` saying what it was."""
    kept = {}
    for label, values in series.items():
        if _varies(values, fixed_axis):
            kept[label] = values
        elif values:
            spread = f"{values[0]:.4g}" if min(values) == max(values) else f"{min(values):.4g} to {max(values):.4g}"
            omitted.append(f"{what}, {label}: {spread} throughout ({len(values)} values)")
    return kept


def _recovery_panels(recovery: dict, omitted: list[str]) -> list[Panel]:
    """The held-out KL and perplexity during distillation, the teacher and the one-shot student as
    horizontal lines."""
    steps = recovery.get("steps", [])
    panels = []
    for key, title, unit, references in (
            ("heldout_kl", "recovery: held-out KL(teacher || student)", "nats per token",
             {"teacher": 0.0, "one-shot": recovery.get("oneshot_kl")}),
            ("heldout_ppl", "recovery: held-out perplexity", "perplexity",
             {"teacher": recovery.get("teacher_ppl"), "one-shot": recovery.get("oneshot_ppl")})):
        kept = _varying(f"held-out {unit} during distillation", {"distilled": recovery.get(key, [])}, omitted)
        if len(steps) < 2 or not kept:
            continue
        lines = [{"label": label, "value": value} for label, value in references.items() if value is not None]

        def draw(figure, axis, values=kept["distilled"], lines=lines, unit=unit):
            axis.plot(steps, values, marker="o", label="student while distilled")
            for line, style in zip(lines, ("--", ":")):
                axis.axhline(line["value"], linestyle=style, color="grey" if style == "--" else "red", label=line["label"])
            every = [value for value in values + [line["value"] for line in lines] if value > 0]
            if every and max(every) / min(every) > 10:
                axis.set_yscale("log")
            axis.set(xlabel="distillation step", ylabel=unit)
            axis.legend()
        panels.append(Panel(f"{title} ({recovery.get('blocks')} blocks)", draw,
                            [{"label": "distilled", "values": kept["distilled"]}],
                            lines))
    return panels


def _loss_panel(history: list[dict], omitted: list[str]) -> Panel | None:
    kept = _varying("distillation loss", {"loss": [row["loss"] for row in history]}, omitted)
    if len(history) < 2 or not kept:
        return None

    def draw(figure, axis):
        axis.plot([row["step"] for row in history], kept["loss"])
        axis.set(xlabel="step", ylabel="training loss (mean over the logged window)")
    return Panel("distillation loss", draw, [{"label": "loss", "values": kept["loss"]}])


def _grouped_bars(axis, groups: list[str], bars: dict[str, list[float]]) -> None:
    """One group of bars per entry of `groups`, one bar per key of `bars`, side by side."""
    width = 0.8 / max(len(bars), 1)
    for offset, (label, values) in enumerate(bars.items()):
        axis.bar([index + (offset - (len(bars) - 1) / 2) * width for index in range(len(groups))], values, width,
                 label=label)
    axis.set_xticks(range(len(groups)), groups)
    axis.legend(ncol=2, fontsize="small", loc="upper center")


def _quality_panel(sources: dict, omitted: list[str]) -> Panel | None:
    """Perplexity per source: teacher, one-shot, student (and the student with runtime sparsity)."""
    names = list(sources)
    models = [model for model in MODEL_LABELS if all(model in scores for scores in sources.values())]
    bars = {MODEL_LABELS[model]: [sources[name][model]["ppl"] for name in names] for model in models}
    values = [value for row in bars.values() for value in row]
    if not _varies(values):
        omitted.append(f"perplexity: {values[0]:.4g} for every model on every source" if values else "no sources scored")
        return None

    def draw(figure, axis):
        _grouped_bars(axis, names, bars)
        if max(values) / min(values) > 10:
            axis.set_yscale("log")
        else:  # room for the legend above the bars
            axis.set_ylim(0, 1.3 * max(values))
        axis.set(xlabel="held-out source", ylabel="perplexity")
    return Panel("perplexity per held-out source", draw, [{"label": "perplexity, models x sources", "values": values}])


SPEED_GROUPS = {"decode": "decode tok/s", "prefill": "prefill tok/s", "bytes_projections": "projection bytes",
                "bytes_total": "total bytes"}


def _speed_panel(speed: dict | None, omitted: list[str]) -> Panel | None:
    """Each model's decode and prefill tokens/s and tensor bytes as ratios to the baseline's (a line
    at 1), measured on this machine; each bar carries its value."""
    if not speed or not speed.get("ratios"):
        return None
    baseline = MODEL_LABELS.get(speed["baseline"], speed["baseline"])
    series = {MODEL_LABELS.get(name, name): [ratios[key] if ratios[key] is not None else 0.0 for key in SPEED_GROUPS]
              for name, ratios in speed["ratios"].items()}
    kept = _varying(f"speed and bytes relative to the {baseline}", series, omitted)
    if not kept:
        return None

    def draw(figure, axis):
        _grouped_bars(axis, list(SPEED_GROUPS.values()), kept)
        for bars in axis.containers:
            axis.bar_label(bars, fmt="%.2fx", fontsize="small")
        axis.axhline(1.0, linestyle="--", color="grey")
        axis.set_ylim(0, 1.35 * max(1.0, *(value for values in kept.values() for value in values)))
        machine = speed.get("device_name") or speed.get("cpu") or speed.get("device")
        axis.set(ylabel=f"x the {baseline}", xlabel=textwrap.shorten(
            f"{machine}, {speed['threads']} threads, {speed['dtype']}, batch 1", 60, placeholder="..."))
    return Panel(f"speed and bytes vs {baseline}, this machine", draw,
                 [{"label": label, "values": values} for label, values in kept.items()],
                 [{"label": speed["baseline"], "value": 1.0}])


def _layer_error_panel(errors: dict | None, omitted: list[str]) -> Panel | None:
    """Per decoder layer, how far the one-shot and the distilled student's output hidden states are
    from the teacher's."""
    if not errors:
        return None
    bars = {"one-shot": errors["oneshot"], "distilled": errors["student"]}
    values = [value for row in bars.values() for value in row]
    if not _varies(values):
        omitted.append(f"per-layer hidden-state error: {values[0]:.4g} in every layer for both students")
        return None

    def draw(figure, axis):
        _grouped_bars(axis, [str(layer) for layer in range(len(errors["oneshot"]))], bars)
        axis.set_ylim(0, 1.3 * max(values))
        axis.set(xlabel="decoder layer", ylabel="||h - h_teacher|| / ||h_teacher||")
    return Panel(f"layer output error vs teacher ({errors['blocks']} held-out blocks)", draw,
                 [{"label": "relative error, students x layers", "values": values}])


def _input_zeros_panel(activations: dict, omitted: list[str]) -> Panel | None:
    """The fraction of exact zeros in the projection inputs, mean per decoder layer, per model."""
    series = {}
    for name, rows in activations.get("inputs", {}).items():
        by_layer: dict[int, list[float]] = {}
        for row in rows:
            by_layer.setdefault(row["layer"], []).append(row["zero_fraction"])
        series[name] = [sum(values) / len(values) for values in by_layer.values()]
    kept = _varying("fraction of zeros in projection inputs per layer", series, omitted, fixed_axis=True)
    if not kept:
        return None

    def draw(figure, axis):
        for name, values in kept.items():
            axis.plot(range(len(values)), values, marker="o", label=name)
        axis.set(xlabel="decoder layer", ylabel="fraction of input entries exactly 0", ylim=(0, 1))
        axis.legend()
    return Panel("zeros in projection inputs (mean per layer)", draw,
                 [{"label": name, "values": values} for name, values in kept.items()])


def _sweep_panel(activations: dict, omitted: list[str]) -> Panel | None:
    """The teacher's perplexity under training-free activation sparsity, per source."""
    sweep = activations.get("teacher_training_free") or {}
    series = {name: list(values.values()) for name, values in sweep.items()}
    kept = _varying("teacher perplexity under training-free activation sparsity", series, omitted)
    if not kept:
        return None
    levels = [float(level) for level in next(iter(sweep.values()))]

    def draw(figure, axis):
        for name, values in kept.items():
            axis.plot(levels, values, marker="o", label=name)
        every = [value for values in kept.values() for value in values]
        if len(levels) > 2 and max(every) / min(every) > 10:
            axis.set_yscale("log")
        axis.set(xlabel="fraction of projection inputs zeroed", ylabel="teacher perplexity")
        axis.legend()
    return Panel("teacher, training-free activation sparsity", draw,
                 [{"label": name, "values": values} for name, values in kept.items()])


def _heatmap_panels(attention: dict, omitted: list[str]) -> list[Panel]:
    """Layers x KV heads of attention mass inside sink + window, per model; streaming heads crossed."""
    heads = attention.get("heads") or {}
    grids = {model: [stats["local_mass"] for stats in modules.values()] for model, modules in heads.items()}
    flat = _varying("attention mass inside sink + window per layer and KV head",
                    {model: [value for row in grid for value in row] for model, grid in grids.items()}, omitted,
                    fixed_axis=True)
    streaming = attention.get("streaming") or {}
    return [Panel(f"{MODEL_LABELS.get(model, model)}: attention mass in sink + window",
                  _heatmap(grids[model], list(heads[model]), streaming), [{"label": model, "values": values}])
            for model, values in flat.items()]


def _heatmap(grid: list[list[float]], modules: list[str], streaming: dict):
    def draw(figure, axis):
        from matplotlib.ticker import MaxNLocator

        image = axis.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        for layer, name in enumerate(modules):
            for head in streaming.get(name, []):
                axis.text(head, layer, "x", ha="center", va="center", color="red", fontsize=14)
        axis.set(xlabel="KV head (x: streaming)", ylabel="decoder layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axis, label="fraction of attention mass")
    return draw


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
