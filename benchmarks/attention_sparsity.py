"""Attention sparsity on the demo teacher: a 2:4 student with part of its KV heads streaming (the
first `attention.sink` and the last `attention.window` tokens only) against the same student with full
attention, at the same distill budget (wikitext-2 test perplexity in 2048-token windows).

    python benchmarks/attention_sparsity.py [--rows full,mass50,...] [--set key=value ...] [--json out.json]
                                            [--write-results]

Rows, every one the pipeline itself (launch.sh on configs/attention.yaml, overridable with --set):
  full      the Wanda 2:4 student, fixed masks, distilled, every head full
  mass50    50% of the KV heads stream, those whose attention falls most inside sink + window
  distill50 50% stream, chosen by gates trained against the teacher (DuoAttention), lowest gates
  distill25, distill75   the same at 25% and 75%
Each streaming row is scored as `load_sparse_model` runs it (its streaming heads on), by its evaluate
stage on the first `eval.max_blocks` (12) windows of 2048 tokens of wikitext-2 test; the KV cache is
counted at 2048 tokens in bf16. --write-results puts the table into benchmarks/RESULTS.md between its
attention-sparsity markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline_runs import REPO, run_pipeline, write_results

CONFIG = REPO / "configs" / "attention.yaml"
MARKERS = ("<!-- attention-sparsity:start -->", "<!-- attention-sparsity:end -->")
ROWS = {  # name -> (label, streaming fraction, selection)
    "full": ("2:4, full attention", 0.0, "mass"),
    "mass50": ("2:4, 50% of KV heads streaming, chosen by mass", 0.5, "mass"),
    "distill50": ("2:4, 50% streaming, chosen by gates (distill)", 0.5, "distill"),
    "distill25": ("2:4, 25% streaming, distill", 0.25, "distill"),
    "distill75": ("2:4, 75% streaming, distill", 0.75, "distill"),
}


def score_row(config: Path, name: str, overrides: list[str]) -> dict:
    label, fraction, select = ROWS[name]
    run_dir = run_pipeline(config, f"attention_{name}",
                           [f"attention.streaming_fraction={fraction}", f"attention.select={select}", *overrides])
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    test = report["sources"]["test"]  # eval.files names wikitext-2 test.txt
    scores = test["student_runtime"] if fraction else test["student"]
    row = {"row": name, "label": label, "ppl": scores["ppl"], "kl": scores["kl"], "teacher_ppl": test["teacher"]["ppl"],
           "windows": test["tokens"] // test["block_size"], "block_size": test["block_size"]}
    kv = report["attention"].get("kv_cache")
    if kv:
        row["kv_ratio"], row["kv_context"] = kv["ratio"], kv["context"]
    return row


def table(rows: list[dict], config: Path) -> str:
    first = rows[0]
    lines = [f"Teacher `demo`, wikitext-2 test, the first {first['windows']} windows of {first['block_size']} tokens "
             f"(teacher {first['teacher_ppl']:.2f}); every row distilled at the budget of `{config.relative_to(REPO)}`.", "",
             "| row | ppl | x full attention | KL | KV cache at 2048 vs dense |", "|---|---:|---:|---:|---:|"]
    full = next((row for row in rows if row["row"] == "full"), None)
    for row in rows:
        versus = f"{row['ppl'] / full['ppl']:.3f}" if full else "-"
        kv = f"{row['kv_ratio']:.3f}" if "kv_ratio" in row else "1.000"
        lines.append(f"| {row['label']} | {row['ppl']:.2f} | {versus} | {row['kl']:.4f} | {kv} |")
    by_name = {row["row"]: row for row in rows}
    if {"mass50", "distill50"} <= set(by_name):
        lines += ["", f"At 50%: gates (distill) against mass selection, {by_name['mass50']['ppl'] / by_name['distill50']['ppl']:.3f}x "
                      "lower perplexity."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the pipeline config every row runs on")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the config for every run")
    parser.add_argument("--json", help="save the rows (JSON)")
    parser.add_argument("--write-results", action="store_true", help="update the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    names = args.rows.split(",")
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    os.chdir(REPO)  # the configs name their files relative to the repo
    started = time.time()
    config = args.config.resolve()
    rows = []
    for name in names:
        rows.append(score_row(config, name, args.set))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"set": args.set, "rows": rows}, indent=1))
    text = table(rows, config)
    print("\n" + text)
    print(f"\n({time.time() - started:.0f} s)")
    if args.write_results:
        write_results(MARKERS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
