"""The teacher cache's codecs on a finished run: bytes per token, and the distillation loss each gives.

    python benchmarks/teacher_cache.py --run runs/demo [--k 128] [--blocks 64] [--json cache.json]

Scores the run's first `--blocks` training blocks with its teacher (distill.data.teacher_cache's
`teacher_topk`, as the teacher_logits stage does), writes them as a cache in each codec
(`CacheWriter`, into a temporary dir), and reads them back (`TeacherCache`). Reports per codec: bytes
per token on disk, write and read seconds per 1,000 tokens, and the loss distill computes from it
(`topk_divergence`, the run's divergence) for the run's one-shot student (prune/student) and its
distilled student (distill/student), with the compact codec's relative difference to the exact one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from distill.data.teacher_cache import CacheLayout, CacheWriter, TeacherCache, teacher_topk
from distill.losses import TopK, topk_divergence
from distill.models import load_teacher
from distill.run.artifacts import STUDENT_DIR, read_token_blocks
from distill.run.config_file import load_config
from distill.sections import CacheCodec
from distill.student import load_student


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@torch.no_grad()
def student_loss(student, blocks: torch.Tensor, cached: TopK, divergence: str, batch_size: int) -> float:
    """Mean divergence over every position of `blocks`, as distill computes it from the cache."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        logits = student(input_ids=blocks[start:start + batch_size]).logits
        part = TopK(*(tensor[start:start + batch_size] if tensor is not None else None for tensor in cached))
        losses = topk_divergence(logits.reshape(-1, logits.shape[-1]), part.rows(), divergence)
        total, count = total + float(losses.sum()), count + losses.numel()
    return total / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run dir (runs/<name>)")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=64, help="training blocks scored (from the first)")
    parser.add_argument("--shard-blocks", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", help="save the measurements (JSON)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    config = load_config(run / "config.yaml")
    blocks = read_token_blocks(run / "teacher").train[:args.blocks]
    tokens = blocks.numel()
    accelerator = Accelerator(cpu=True)
    teacher = load_teacher(config.teacher, accelerator.device)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    started = time.perf_counter()
    scored = teacher_topk(teacher, blocks, args.k, args.batch_size, accelerator)
    score_seconds = time.perf_counter() - started
    del teacher
    students = {name: load_student(run / stage / STUDENT_DIR).eval() for name, stage in
                (("one-shot", "prune"), ("distilled", "distill")) if (run / stage / STUDENT_DIR).is_dir()}
    divergence = config.train.loss.divergence.value
    results = {"run": str(run), "k": args.k, "blocks": len(blocks), "tokens": tokens, "vocab": vocab,
               "divergence": divergence, "teacher_seconds_per_1k_tokens": 1000 * score_seconds / tokens,
               "cpu": cpu_name(), "torch": torch.__version__, "codecs": {}}
    with tempfile.TemporaryDirectory() as temporary:
        for codec in CacheCodec:
            layout = CacheLayout(blocks=len(blocks), positions=blocks.shape[1], k=args.k, vocab=vocab,
                                 codec=codec.value, shard_blocks=args.shard_blocks)
            writer = CacheWriter(Path(temporary) / codec.value, layout)
            writer.start(True)
            started = time.perf_counter()
            for shard in range(layout.shards):
                span = layout.shard_range(shard)
                writer.write_shard(shard, {block: TopK(scored.logp[block], scored.index[block]) for block in span})
            write_seconds = time.perf_counter() - started
            cache = TeacherCache(writer.directory)
            started = time.perf_counter()
            cached = cache.blocks(range(len(blocks)))
            read_seconds = time.perf_counter() - started
            row = {"bytes_per_token": cache.nbytes() / tokens, "write_seconds_per_1k_tokens": 1000 * write_seconds / tokens,
                   "read_seconds_per_1k_tokens": 1000 * read_seconds / tokens, "loss": {}}
            for name, student in students.items():
                row["loss"][name] = student_loss(student, blocks, cached, divergence, args.batch_size)
            results["codecs"][codec.value] = row
    exact, compact = results["codecs"]["exact"], results["codecs"]["compact"]
    print(f"teacher cache codecs on {run} ({len(blocks)} blocks, {tokens} tokens, k={args.k}, vocab {vocab}); "
          f"{results['cpu']}, torch {torch.__version__}")
    print("| codec | bytes/token | write s/1k tokens | read s/1k tokens | " +
          " | ".join(f"{name} {divergence}" for name in students) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(students))
    for codec, row in results["codecs"].items():
        losses = " | ".join(f"{row['loss'][name]:.5f}" for name in students)
        print(f"| {codec} | {row['bytes_per_token']:.1f} | {row['write_seconds_per_1k_tokens']:.3f} | "
              f"{row['read_seconds_per_1k_tokens']:.3f} | {losses} |")
    for name in students:
        difference = compact["loss"][name] / exact["loss"][name] - 1
        results.setdefault("compact_vs_exact_loss", {})[name] = difference
        print(f"{name}: the compact cache's loss is {difference:+.3%} of the exact one's")
    print(f"compact: {compact['bytes_per_token']:.1f} bytes per token, {exact['bytes_per_token'] / compact['bytes_per_token']:.2f}x "
          f"smaller than exact")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
