"""The recipe frontier: for each sparsity recipe at the demo's distill budget, the student's wikitext-2
test perplexity relative to the teacher's, against its decode speedup and memory ratio.

    for recipe in 2-4 2-4-act50 act50-dense mlp-channels-50; do bash launch.sh configs/frontier/$recipe.yaml; done
    python benchmarks/frontier.py --runs runs/frontier-2-4 runs/frontier-2-4-act50 runs/frontier-act50-dense \\
        runs/frontier-mlp-channels-50 [--source test] [--write benchmarks/frontier.md] [--plot benchmarks/frontier.png]

The configs in configs/frontier/ are configs/demo.yaml (48 steps of 8 x 128 tokens on text the
teacher writes) with wikitext-2 test in the evaluation, and differ only in their sparsity: 2:4 weights,
2:4 weights + 50% of every projection input zeroed, 50% of the inputs zeroed on dense weights
(prune.pattern none), and half of every MLP's intermediate channels removed (exported as a smaller
dense model). Each launch takes 8 to 12 minutes on 2 CPU cores.

Quality comes from each run's evaluate/report.json, on the eval source `--source` (`test`: the
stem of wikitext-2's test.txt in eval.files): teacher and student perplexity, their ratio, and the
student's KL to the teacher. The student is the one a user runs: with input thresholds (the report's
`student_runtime`) where the recipe has them, else the exported student. Speed and memory come from
the report's `speed` section (distill.eval.speed.measure_speed's result: per-model tokens/s and bytes,
and `ratios` of each model to the teacher); a run without it prints "speed: not in report" and its
speed cells stay empty. The table goes to stdout, and with --write / --plot to a markdown file and a
PNG (perplexity ratio against decode speedup, marker area by memory ratio; each written atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUNTIME = "student_runtime"  # distill.eval.report.RUNTIME: the student with its input thresholds
PPL_LABEL = "student ppl / teacher ppl (wikitext-2 test)"
SPEED_KEYS = {"decode": "decode", "prefill": "prefill", "memory": "bytes_total"}  # frontier name: report's ratio key


def quality(report: dict, source: str) -> dict:
    """Teacher and student perplexity on `source`, their ratio, and the student's KL to the teacher."""
    sources = report["sources"]
    if source not in sources:
        raise SystemExit(f"no eval source {source!r} in the report (it has {sorted(sources)}); "
                         "the frontier configs add eval.files=[../shared/data/wikitext-2/test.txt]")
    scores = sources[source]
    model = RUNTIME if RUNTIME in scores else "student"
    teacher, student = scores["teacher"]["ppl"], scores[model]["ppl"]
    return {"model": model, "tokens": scores.get("tokens"), "teacher_ppl": teacher, "oneshot_ppl": scores["oneshot"]["ppl"],
            "student_ppl": student, "ppl_ratio": student / teacher, "kl": scores[model]["kl"]}


def speed(report: dict, model: str) -> dict | None:
    """{decode, prefill, memory}: `model`'s ratios to the teacher in the report's `speed` section
    (tokens/s student / teacher, and tensor bytes student / teacher), or None when the report has none.
    (Where a report lacks it, this is the one place to time the run here instead, with
    distill.eval.speed.measure_speed on the run's teacher and exported student.)"""
    section = report.get("speed")
    if not section:
        return None
    ratios = section["ratios"]
    row = ratios.get(model) or ratios.get("student")  # a speed section may time only the exported student
    if row is None:
        return None
    return {name: row.get(key) for name, key in SPEED_KEYS.items()}


def measure(run_dirs: list[Path], dtype: str, repeats: int) -> dict[str, dict]:
    """{run name: {decode, prefill, memory}}: each run's student as a user runs it (load_sparse_model on
    its packed export, its hf export where it has none) timed against the teacher, in this one process,
    with distill.eval.speed.measure_speed, on the first wikitext-2 test tokens: the same machine and
    the same teacher for every recipe, unlike the reports, each measured while other work ran."""
    import torch
    from transformers import AutoTokenizer

    from distill.eval.speed import measure_speed
    from distill.models import load_teacher
    from distill.run.config_file import load_config
    from distill.runtime import load_sparse_model

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    first = run_dirs[0]
    config = load_config(first / "config.yaml")
    teacher = load_teacher(config.teacher, torch.device("cpu")).to(torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(first / "teacher" / "tokenizer")
    text = Path(config.eval.files[0]).read_text() if config.eval.files else "The history of the city " * 200
    prompt = tokenizer(text[:8000], return_tensors="pt").input_ids[0]
    found = {}
    for run_dir in run_dirs:
        export = run_dir / "export"
        directory = export / "packed" if (export / "packed").is_dir() else export / "hf"
        student = load_sparse_model(directory, dtype=torch_dtype)
        result = measure_speed({"teacher": teacher, "student": student}, prompt, repeats=repeats)
        ratios = result["ratios"]["student"]
        found[run_dir.name] = {name: ratios.get(key) for name, key in SPEED_KEYS.items()}
        found[run_dir.name]["machine"] = f"{result['cpu']}, {result['threads']} threads, {result['dtype']}"
        del student
    return found


def recipe(report: dict) -> dict:
    """What the run's sparsity is: its weight pattern as the export describes it, and the fraction
    of projection inputs its thresholds zero."""
    return {"weights": report["export"]["pattern"], "activations": (report.get("activations") or {}).get("target", 0.0),
            "steps": report["config"]["steps"]}


def row(name: str, report: dict, source: str) -> dict:
    found = {"run": name, **recipe(report), **quality(report, source)}
    found["speed"] = speed(report, found["model"])
    return found


def _cell(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def table(rows: list[dict]) -> str:
    lines = ["| run | weights | activations zeroed | steps | teacher ppl | one-shot ppl | student ppl | ppl ratio | "
             "student KL | decode speedup | prefill speedup | memory ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for found in rows:
        timed = found["speed"] or {}
        lines.append(f"| {found['run']} | {found['weights']} | {found['activations']:.0%} | {found['steps']} | "
                     f"{found['teacher_ppl']:.2f} | {found['oneshot_ppl']:.2f} | {found['student_ppl']:.2f} | "
                     f"{found['ppl_ratio']:.3f} | {found['kl']:.4f} | {_cell(timed.get('decode'), 2, 'x')} | "
                     f"{_cell(timed.get('prefill'), 2, 'x')} | {_cell(timed.get('memory'), 3)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity ratio against decode speedup (marker area by memory ratio); without speed in any
    report, the perplexity ratio per run alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.io import atomic_write

    timed = [found for found in rows if found["speed"] and found["speed"].get("decode") is not None]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if timed:
        for found in timed:
            memory = found["speed"].get("memory") or 1.0
            axis.scatter(found["speed"]["decode"], found["ppl_ratio"], s=300 * memory, alpha=0.6)
            axis.annotate(f"{found['run']} (memory {memory:.2f}x)", (found["speed"]["decode"], found["ppl_ratio"]),
                          textcoords="offset points", xytext=(6, 6), fontsize=8)
        axis.axvline(1.0, color="grey", lw=0.8, ls=":")
        axis.axhline(1.0, color="grey", lw=0.8, ls=":")
        axis.set_xlabel("decode speedup (student tokens/s / teacher tokens/s)")
        axis.set_ylabel(PPL_LABEL)
        axis.set_title("recipe frontier (marker area: memory ratio)")
    else:
        axis.barh([found["run"] for found in rows], [found["ppl_ratio"] for found in rows])
        axis.invert_yaxis()
        axis.axvline(1.0, color="grey", lw=0.8, ls=":")
        axis.set_xlabel(PPL_LABEL)
        axis.set_title("recipe frontier (speed: not in report)")
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=120))
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished run dirs (runs/frontier-2-4 ...)")
    parser.add_argument("--source", default="test", help="the eval source the ratio is taken on (default: test)")
    parser.add_argument("--write", type=Path, help="save the table (markdown)")
    parser.add_argument("--plot", type=Path, help="save the frontier plot (PNG)")
    parser.add_argument("--measure", action="store_true",
                        help="time every run's student against the teacher here, in one process (not the reports' speed)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="--measure: the models' dtype")
    parser.add_argument("--repeats", type=int, default=5, help="--measure: interleaved rounds, the median is kept")
    args = parser.parse_args(argv)
    rows = []
    for run_dir in args.runs:
        path = run_dir / "evaluate" / "report.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: has {run_dir} finished its evaluate stage?")
        rows.append(row(run_dir.name, json.loads(path.read_text()), args.source))
    if args.measure:
        measured = measure(args.runs, args.dtype, args.repeats)
        for found in rows:
            found["speed"] = measured[found["run"]]
        machine = next(iter(measured.values()))["machine"]
        print(f"speed and memory measured here, in one process: {machine}")
    text = table(rows)
    print(text)
    for found in rows:
        if found["speed"] is None:
            print(f"speed: not in report ({found['run']})")
    if args.write:
        from distill.io import write_text

        write_text(args.write, text + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
