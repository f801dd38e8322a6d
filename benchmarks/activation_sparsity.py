"""Activation sparsity on the demo teacher: quality of 2:4 weights with 50% sparse activations,
distilled under the thresholds against thresholds applied afterwards (wikitext-2 test perplexity).

    python benchmarks/activation_sparsity.py [--set key=value ...] [--activations key=value ...]
                                             [--json out.json] [--write-results]

Rows, all at the same distill budget (configs/quality.yaml, overridable with --set):
  teacher, training-free    the dense teacher with every projection input zeroed at 40% and 50%
                            (uniform thresholds from calibration text; the evaluate stage's sweep)
  2:4                       the Wanda 2:4 student, fixed masks, distilled, dense activations
  2:4 + 50%, after          that student with 50% thresholds calibrated on it after distill
  2:4 + 50%, under          thresholds calibrated on the one-shot student in the prune stage and
                            distilled under (activations.target=0.5)
Each distilled row is the pipeline itself (launch.sh), scored by its evaluate stage on the first
`eval.max_blocks` (48) windows of 512 tokens of wikitext-2 test; calibration is wikitext-2 valid.
The "after" row calibrates with the same library call the prune stage makes. --activations sets keys
of the `activations:` section (allocation, greedy_blocks, straight_through, recalibrate_every,
ramp_steps) for the two thresholded rows only, so the rows without thresholds are not run again.
The table in RESULTS.md (about 90 minutes on 2 CPU cores with native bf16 when every row runs):

    python benchmarks/activation_sparsity.py --set train.steps=100 --activations allocation=greedy \\
        greedy_blocks=8 straight_through=true recalibrate_every=10 ramp_steps=40 --write-results

--write-results puts the table into benchmarks/RESULTS.md between its activation-sparsity markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline_runs import REPO, run_pipeline, write_results

CONFIG = REPO / "configs" / "quality.yaml"
MARKERS = ("<!-- activation-sparsity:start -->", "<!-- activation-sparsity:end -->")
BASE = ["eval.max_blocks=48", "eval.activation_levels=[0.4,0.5]"]
TARGET = 0.5


def thresholds_after_distill(run_dir: Path, target: float, activations: list[str]) -> dict:
    """The distilled 2:4 student of `run_dir` with `target` of its projection inputs zeroed by
    thresholds calibrated on it (with the `activations.` overrides given), scored like the evaluate
    stage scores (KL to the teacher), with the fraction of inputs it zeroes as the evaluate stage
    measures it (`measured`: on the first held-out blocks, weighted by the weights each input multiplies)."""
    from accelerate import Accelerator

    from distill.run.artifacts import STUDENT_DIR, read_token_blocks
    from distill.sparsity.calibration import calibration_blocks
    from distill.run.config_file import load_config
    from distill.data.corpus import pack, tokenize_files
    from distill.eval.scoring import activation_table, score_models, weighted_zero_fraction
    from distill.models import load_teacher, load_tokenizer
    from distill.sparsity.activations import calibrate_thresholds, install_thresholds
    from distill.student import load_student

    config = load_config(run_dir / "config.yaml", activations)
    accelerator = Accelerator(cpu=True)
    teacher = load_teacher(config.teacher, accelerator.device)
    student = load_student(run_dir / "distill" / STUDENT_DIR)
    blocks = read_token_blocks(run_dir / "teacher")
    calibration = calibration_blocks(blocks.train, config.calibration.num_blocks)
    # the allocation chosen by --set or --activations applies to this row too; the target is this row's
    calibrated = calibrate_thresholds(student, calibration, config.activations, config.calibration.batch_size, target)
    install_thresholds(student, calibrated.groups, calibrated.thresholds)
    test = pack(tokenize_files(config.eval.files, load_tokenizer(config.teacher)), config.eval.block_size)
    test = test[:config.eval.max_blocks]
    scores = score_models({"teacher": teacher, "student": student}, test, accelerator, config.eval.batch_size)
    probe = next(iter(blocks.heldout_sets().values()))[:config.eval.batch_size]
    measured = weighted_zero_fraction(activation_table(student, probe, config.eval.batch_size))
    return {**scores["student"], "measured": measured}


def _zeroed(measured: float | None) -> str:
    """The thresholded rows' column: the target, and what the student zeroes as measured."""
    return f"{TARGET:.0%}" + (f" ({measured:.1%} measured)" if measured is not None else "")


def table(rows: list[dict], source: dict, teacher: str, config: Path, activations: list[str],
          overrides: list[str] = ()) -> str:
    windows, teacher_ppl = source["tokens"] // source["block_size"], source["teacher"]["ppl"]
    budget = f"`{config.relative_to(REPO)}`" + "".join(f", `{setting}`" for setting in overrides)
    lines = [f"Teacher `{teacher}`, wikitext-2 test, the first {windows} windows of {source['block_size']} tokens "
             f"(teacher {teacher_ppl:.2f}); every distilled row at the budget of {budget} "
             f"(its calibration text, wikitext-2 valid); thresholded rows with "
             f"{', '.join(f'`{setting}`' for setting in activations) or 'the activations section as configured'}.", "",
             "| row | activations zeroed | ppl | x teacher | KL |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        kl = f"{row['kl']:.4f}" if row.get("kl") is not None else "-"
        lines.append(f"| {row['row']} | {row['zeroed']} | {row['ppl']:.2f} | {row['ppl'] / teacher_ppl:.3f} | {kl} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the pipeline config every row runs on")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the config for every run")
    parser.add_argument("--activations", nargs="*", default=[], metavar="KEY=VALUE",
                        help="activations.KEY=VALUE for the thresholded rows only, e.g. allocation=greedy")
    parser.add_argument("--json", help="save the rows (JSON)")
    parser.add_argument("--write-results", action="store_true", help="update the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the configs name their files relative to the repo
    started = time.time()
    config = args.config.resolve()
    activations = [f"activations.{setting}" for setting in args.activations]
    plain = run_pipeline(config, "activations_none", [*BASE, *args.set])
    under = run_pipeline(config, "activations_under", [*BASE, "eval.activation_levels=[]", f"activations.target={TARGET}",
                                                       *args.set, *activations])
    report = json.loads((plain / "evaluate" / "report.json").read_text())
    test = report["sources"]["test"]  # eval.files names wikitext-2 test.txt
    curve = report["activations"]["teacher_training_free"]["test"]
    after = thresholds_after_distill(plain, TARGET, activations)
    under_report = json.loads((under / "evaluate" / "report.json").read_text())
    under_test = under_report["sources"]["test"]
    rows = [
        {"row": "teacher, training-free", "zeroed": "40%", "ppl": curve["0.4"]},
        {"row": "teacher, training-free", "zeroed": "50%", "ppl": curve["0.5"]},
        {"row": "2:4", "zeroed": "0%", "ppl": test["student"]["ppl"], "kl": test["student"]["kl"]},
        {"row": "2:4, thresholds after distill", "zeroed": _zeroed(after["measured"]), "ppl": after["ppl"],
         "kl": after["kl"]},
        {"row": "2:4, distilled under thresholds", "zeroed": _zeroed(under_report["activations"].get("zeroed", {}).get("student")),
         "ppl": under_test["student_runtime"]["ppl"], "kl": under_test["student_runtime"]["kl"]},
    ]
    text = table(rows, test, report["config"]["teacher"], config, activations, args.set)
    text += (f"\n\nDistilled under the thresholds against applied after: {rows[3]['ppl'] / rows[4]['ppl']:.3f}x lower "
             f"perplexity; 2:4 + 50% under thresholds against 2:4 alone: {rows[4]['ppl'] / rows[2]['ppl']:.3f}x.")
    print("\n" + text)
    print(f"\n({time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"set": args.set, "activations": args.activations, "rows": rows}, indent=1))
    if args.write_results:
        write_results(MARKERS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
