"""One-shot pruning quality on the demo teacher (SmolLM2-135M-Instruct): wikitext-2 test perplexity of
the dense teacher and of each criterion's N:M student, before any training.

    python benchmarks/quality.py [--criteria magnitude,wanda,sparsegpt,taylor,fisher] [--max-windows 0]
                                 [--calibration-windows 128] [--json quality.json]

Protocol: the test text is tokenized whole and cut into non-overlapping 512-token windows; perplexity
is exp of the mean next-token loss over all windows (--max-windows limits them, 0 = all, ~610).
Calibration (Wanda statistics, gradients, SparseGPT Hessians) uses windows of wikitext-2 *valid*,
never test. Runs on CPU or one GPU (fp32). The table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from distill.calibration import input_square_sums
from distill.config import PROJECTIONS, PruneConfig, TeacherConfig
from distill.criteria import gradient_saliency, sparsegpt_masks
from distill.data import pack, tokenize_files
from distill.evaluation import score_models
from distill.models import load_teacher, load_tokenizer
from distill.sparsity import install_masks
from distill.stages.prune import masks_from_scores, weight_scores
from distill.stages.teacher import calibration_blocks

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"


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
            scores = weight_scores(model, prune, statistics)
        masks = masks_from_scores(model, prune, scores, dense={})
    return install_masks(model, masks).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criteria", default="magnitude,wanda,sparsegpt,taylor,fisher")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--max-windows", type=int, default=0, help="test windows of 512 tokens (0: all)")
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--json", help="save the results (JSON)")
    args = parser.parse_args(argv)
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
