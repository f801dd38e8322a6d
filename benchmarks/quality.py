"""Pruning and distillation quality on the demo teacher (SmolLM2-135M-Instruct), wikitext-2 test perplexity.

One-shot (default): the dense teacher and each criterion's N:M student, before any training.

    python benchmarks/quality.py [--criteria magnitude,wanda,sparsegpt,taylor,fisher] [--max-windows 0]
                                 [--calibration-windows 128] [--json quality.json]

Protocol: the test text is tokenized whole and cut into non-overlapping 512-token windows; perplexity
is exp of the mean next-token loss over all windows (--max-windows limits them, 0 = all, ~610).
Calibration (Wanda statistics, gradients, SparseGPT Hessians) uses windows of wikitext-2 *valid*,
never test. Runs on CPU or one GPU (fp32). The table is printed last.

Distillation (--distill): the pipeline itself (launch.sh) on configs/quality.yaml, once per variant
(fixed, dynamic and learnable masks; forward KL, reverse KL, JSD, KL + LM loss, the cached top-k
teacher; channel permutation), each with the same training budget, overrides of the config given by
--set applying to all. Training text is wikitext-2 valid; the evaluate stage scores wikitext-2 test
in 512-token windows (`eval.max_blocks` of them). The run dir is shared, so a variant re-runs only
the stages it changes.

    python benchmarks/quality.py --distill [--variants fixed,dynamic,...] [--set key=value ...] [--json distill.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from distill.sparsity.calibration import calibration_blocks, input_square_sums
from distill.config import PROJECTIONS, TeacherConfig
from distill.sparsity.criteria import gradient_saliency, sparsegpt_masks
from distill.data.corpus import pack, tokenize_files
from distill.eval.scoring import score_models
from distill.models import load_teacher, load_tokenizer
from distill.sparsity.masks import install_masks
from distill.sparsity.pruning import masks_from_scores, weight_scores
from distill.sparsity.prune_config import PruneConfig
from distill.run.artifacts import read_distill_record
from distill.targets import resolve_targets

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"

# label -> overrides of configs/quality.yaml; "fixed" is the base (Wanda 2:4, fixed mask, forward KL)
DISTILL_VARIANTS = {
    "fixed": [],
    "dynamic": ["train.masks.mode=dynamic"],
    "learnable": ["train.masks.mode=learnable"],
    "reverse_kl": ["train.loss.divergence=reverse_kl"],
    "jsd": ["train.loss.divergence=jsd"],
    "kl+lm": ["train.loss.lm_weight=0.5"],
    "topk64": ["train.loss.teacher_topk=64"],
    "permute": ["prune.permute=true"],
}


def distill_variants(args) -> int:
    """Run the pipeline once per variant and tabulate wikitext-2 test perplexity."""
    from distill.run.config_file import load_config

    names = args.variants.split(",")
    unknown = [name for name in names if name not in DISTILL_VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(DISTILL_VARIANTS)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        overrides = [*args.set, *DISTILL_VARIANTS[name]]
        run_dir = REPO / load_config(args.config, overrides).run_dir
        started = time.time()
        result = subprocess.run(["bash", str(REPO / "launch.sh"), args.config, *overrides], cwd=REPO,
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"variant {name} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
            return 1
        report = json.loads((run_dir / "evaluate" / "report.json").read_text())["sources"]["test"]
        distill = json.loads((run_dir / "distill" / "manifest.json").read_text())  # the seconds it ran
        rows.append({"variant": name, "overrides": DISTILL_VARIANTS[name], "teacher_ppl": report["teacher"]["ppl"],
                     "oneshot_ppl": report["oneshot"]["ppl"], "student_ppl": report["student"]["ppl"],
                     "student_kl": report["student"]["kl"], "tokens": read_distill_record(run_dir / "distill").tokens,
                     "distill_seconds": distill["seconds"], "wall_seconds": time.time() - started})
        print(f"{name}: student {rows[-1]['student_ppl']:.2f} (one-shot {rows[-1]['oneshot_ppl']:.2f}), "
              f"distill {distill['seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "set": args.set, "rows": rows}, indent=1))
    print(f"\ndistillation at a fixed budget, {args.config} {' '.join(args.set)}; wikitext-2 test, "
          f"{report['tokens'] // 512} windows of 512 tokens; teacher {rows[0]['teacher_ppl']:.2f}\n")
    print("| variant | overrides | one-shot ppl | student ppl | student KL | tokens | distill s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {' '.join(row['overrides']) or '-'} | {row['oneshot_ppl']:.2f} | "
              f"{row['student_ppl']:.2f} | {row['student_kl']:.4f} | {row['tokens']} | {row['distill_seconds']:.0f} |")
    return 0


def pruned_student(criterion: str, n: int, m: int, calibration: torch.Tensor, accelerator: Accelerator) -> torch.nn.Module:
    model = load_teacher(TeacherConfig(source="demo"), accelerator.device).float()
    prune = PruneConfig(criterion=criterion, n=n, m=m)
    if criterion == "sparsegpt":
        masks = sparsegpt_masks(model, calibration.to(accelerator.device), PROJECTIONS, n, m)
    else:
        if criterion in ("taylor", "fisher"):
            scores = gradient_saliency(model, calibration, PROJECTIONS, accelerator, criterion)
        else:
            statistics = input_square_sums(model, calibration, PROJECTIONS, accelerator) if criterion == "wanda" else {}
            scores = weight_scores(model, prune, resolve_targets(model, PROJECTIONS), statistics)
        masks = masks_from_scores(model, prune, resolve_targets(model, PROJECTIONS), scores, dense={})
    return install_masks(model, masks).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criteria", default="magnitude,wanda,sparsegpt,taylor,fisher")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--max-windows", type=int, default=0, help="test windows of 512 tokens (0: all)")
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--json", help="save the results (JSON)")
    parser.add_argument("--distill", action="store_true", help="the distillation variants instead of one-shot")
    parser.add_argument("--config", default="configs/quality.yaml", help="--distill: the base config")
    parser.add_argument("--variants", default=",".join(DISTILL_VARIANTS), help="--distill: which variants")
    parser.add_argument("--set", nargs="*", default=[], help="--distill: overrides for every variant (key=value)")
    args = parser.parse_args(argv)
    if args.distill:
        return distill_variants(args)
    n, m = map(int, args.pattern.split(":"))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = load_tokenizer(TeacherConfig(source="demo"))
    test = pack(tokenize_files([str(WIKITEXT / "test.txt")], tokenizer), 512)
    test = test[: args.max_windows] if args.max_windows else test
    calibration = calibration_blocks(pack(tokenize_files([str(WIKITEXT / "valid.txt")], tokenizer), 512),
                                     args.calibration_windows)

    device = str(torch.cuda.get_device_name()) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    teacher = load_teacher(TeacherConfig(source="demo"), accelerator.device).float()
    started = time.time()
    dense = score_models({"teacher": teacher}, test, accelerator, batch_size=4, desc="dense")["teacher"]["ppl"]
    rows.append({"model": "dense teacher", "ppl": dense, "seconds": time.time() - started})
    print(f"dense: {dense:.2f}", flush=True)
    for criterion in args.criteria.split(","):
        started = time.time()
        student = pruned_student(criterion, n, m, calibration, accelerator)
        prune_seconds = time.time() - started
        scores = score_models({"teacher": teacher, "student": student}, test, accelerator, batch_size=4, desc=criterion)
        rows.append({"model": f"{criterion} {n}:{m} one-shot", "ppl": scores["student"]["ppl"],
                     "kl": scores["student"]["kl"], "prune_seconds": prune_seconds})
        print(f"{criterion}: {scores['student']['ppl']:.2f} (pruned in {prune_seconds:.0f} s)", flush=True)
        del student

    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "windows": len(test), "rows": rows}, indent=1))
    print(f"\nwikitext-2 test perplexity, {len(test)} windows of 512 tokens, calibration {len(calibration)} windows "
          f"of wikitext-2 valid, {device}, torch {torch.__version__}\n")
    print("| model | perplexity | KL to teacher (nats/token) | pruning time (s) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        kl = f"{row['kl']:.4f}" if "kl" in row else "-"
        seconds = f"{row['prune_seconds']:.0f}" if "prune_seconds" in row else "-"
        print(f"| {row['model']} | {row['ppl']:.2f} | {kl} | {seconds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
