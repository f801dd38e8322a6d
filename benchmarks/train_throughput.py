"""The distill step against a plain distillation loop: tokens/s, peak memory, MFU, loss, same run.

    python benchmarks/train_throughput.py --model demo --batch 16 --seq 1024
    python benchmarks/train_throughput.py --model 1b --batch 8 --seq 2048
    python benchmarks/train_throughput.py --smoke          # tiny shapes on CPU: checks the script only

Models: `demo` is the demo teacher (SmolLM2-135M; `--teacher DIR` for a local copy) with a 2:4
magnitude student of it; `demo-shaped` has its exact shapes with random weights (for machines the
teacher cannot reach: the device machines take no download and 64 MiB of files, the teacher is
270 MB); `1b` is a Llama-shaped model of about 1.2B parameters (hidden 2048, MLP 8192, 16 layers,
vocab 128256) with random weights, teacher and student of the same shape.

Variants (each from the same initial student, on the same batches):
  baseline       a plain distillation loop: teacher bf16 without grad, student fp32 under bf16
                 autocast, full fp32 logits for both, forward KL through F.kl_div, fused AdamW,
                 masks re-applied by a Python loop over the projections
  pipeline       the distill stage's own step (distill.train.step.DistillStep): chunked KD loss with the
                 output projections, masks as weight parametrizations, gradient clipping, the
                 stage's warmup-cosine schedule, no host sync
  +compile       the same with speed.compile (per-layer torch.compile)
  +checkpointing the same with speed.activation_checkpointing
The loss of each variant on the first batch (before any update) is printed beside the baseline's:
they compute the same forward KL. MFU counts FLOP per token as the pipeline does (distill.train.throughput:
6N + 12LHQT for the student, 2N + 4LHQT for the teacher) against the bf16 peak measured here with a
large matrix product.
"host syncs/step" counts the calls in one step that made the host wait for the GPU (CUDA's sync
debug mode); the distill step is meant to have none, reading its losses only at log intervals.
Table last. A variant that runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True)
VARIANTS = ("baseline", "pipeline", "pipeline+compile", "pipeline+checkpointing")


def bf16_autocast(device: torch.device) -> bool:
    """bf16 autocast where the pipeline would use it (always on the GPUs this benchmark is for; on a
    CPU smoke run only where the CPU computes bf16 natively)."""
    from distill.precision import Precision, choose_precision

    return choose_precision(Precision.AUTO, device).precision is Precision.BF16


def build_models(args, device: torch.device):
    """(teacher in bf16, dense fp32 student weights with their 2:4 masks)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from distill.config import PROJECTIONS
    from distill.sparsity.masks import nm_mask
    from distill.targets import target_linears

    if args.model == "demo":
        from distill.models import fetch_demo_teacher

        source = args.teacher or fetch_demo_teacher()
        student = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        shapes = {"smoke": SMOKE, "demo-shaped": SMOLLM2_135M, "1b": LLAMA_1B}[args.model]
        student = LlamaForCausalLM(LlamaConfig(**shapes))
    teacher = copy.deepcopy(student).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    teacher.requires_grad_(False).eval()
    masks = {name: nm_mask(linear.weight.abs(), 2, 4) for name, linear in target_linears(student, PROJECTIONS)}
    return teacher, student, masks


def plain_step_factory(teacher, student, masks, device):
    """The baseline: a plain distillation loop, written the way a first version usually is."""
    from distill.sparsity.masks import remove_masks, install_masks

    model = remove_masks(install_masks(copy.deepcopy(student), masks)).to(device).train()
    pairs = [(model.get_submodule(name).weight, mask.to(device)) for name, mask in masks.items()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step(input_ids: torch.Tensor, update: bool = True) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast(device)):
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids).logits.float()
            student_logits = model(input_ids=input_ids).logits.float()
        loss = F.kl_div(F.log_softmax(student_logits, -1).flatten(0, 1), F.log_softmax(teacher_logits, -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")
        if update:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for weight, mask in pairs:
                    weight.mul_(mask)
        return loss.detach()

    return step, model


def pipeline_step_factory(teacher, student, masks, device, variant: str, chunk_tokens: int):
    """The distill stage's step itself (distill.train.step.DistillStep, built as the stage builds it;
    +compile compiles a copy of the teacher too, as the stage does)."""
    from accelerate import Accelerator

    from distill.config import SpeedConfig, TrainConfig
    from distill.sections import LossConfig
    from distill.train.objective import DistillationObjective, teacher_outputs
    from distill.sparsity.masks import install_masks
    from distill.sparsity.modes import FixedMasks
    from distill.sparsity.patterns import NM
    from distill.train.step import DistillStep, MicroBatch, build_optimizer, speed_up

    accelerator = Accelerator(mixed_precision="bf16" if bf16_autocast(device) else "no", cpu=device.type == "cpu")
    model = install_masks(copy.deepcopy(student), masks).to(device).train()
    speed = SpeedConfig(compile="compile" in variant, activation_checkpointing="checkpointing" in variant)
    speed_up(model, speed, training=True)
    if speed.compile:
        teacher = copy.deepcopy(teacher)
        speed_up(teacher, speed, training=False)
    train = TrainConfig(lr=1e-5, warmup_steps=0, loss=LossConfig(chunk_tokens=chunk_tokens))
    fixed = FixedMasks()
    objective = DistillationObjective(model, train.loss, NM(2, 4))
    optimizer, scheduler, trainable = build_optimizer(model, train, fixed, device)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    distill_step = DistillStep(accelerator, objective, optimizer, scheduler, trainable, fixed, train.max_grad_norm)
    steps_done = [0]

    def step(input_ids: torch.Tensor, update: bool = True) -> torch.Tensor:
        signal = partial(teacher_outputs, teacher, input_ids, train.loss)
        if not update:
            with torch.no_grad(), accelerator.autocast():
                return objective(input_ids, signal())[0].detach()
        losses, _ = distill_step(steps_done[0], train.steps, [MicroBatch(input_ids, signal)])
        steps_done[0] += 1
        return losses["loss"]

    return step, model


def host_syncs(step, input_ids: torch.Tensor, device: torch.device) -> int | None:
    """How many calls in one training step made the host wait for the GPU (torch's CUDA sync debug
    mode warns at each); None off CUDA. The step's loss is not read, as in the stage's loop."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(input_ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


def run_variant(variant, teacher, student, masks, device, args, batches) -> dict:
    from distill.train.throughput import flops_per_token

    gc.collect()  # a compiled module holds a reference cycle: free the previous variant's student now
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if variant == "baseline":
            step, model = plain_step_factory(teacher, student, masks, device)
        else:
            step, model = pipeline_step_factory(teacher, student, masks, device, variant, args.chunk_tokens)
        first_loss = float(step(batches[0], update=False))
        for input_ids in batches[:args.warmup]:
            step(input_ids)
        syncs = host_syncs(step, batches[0], device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for input_ids in batches[args.warmup:]:
            loss = step(input_ids)
        float(loss)  # one host sync, at the end
        elapsed = time.perf_counter() - started
    except torch.OutOfMemoryError:
        return {"variant": variant, "oom": True}
    tokens = (len(batches) - args.warmup) * batches[0].numel()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    result = {"variant": variant, "oom": False, "tokens_per_s": tokens / elapsed, "peak_gib": peak,
              "first_loss": first_loss, "flop_per_token": flops_per_token(model, teacher, batches[0].shape[1]), "host_syncs_per_step": syncs}
    del step, model
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "demo-shaped", "1b"], default="demo")
    parser.add_argument("--teacher", help="a local save_pretrained dir for --model demo (default: the cached demo teacher)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", help="save every measurement (JSON)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.seq, args.steps, args.warmup, args.chunk_tokens = "smoke", 2, 32, 2, 1, 16
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("train_throughput.py needs a CUDA GPU (or --smoke); none is visible", file=sys.stderr)
        return 2
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2

    from distill.train.throughput import measured_peak_flops

    peak_flops = measured_peak_flops(device)
    teacher, student, masks = build_models(args, device)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, student.config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
               for _ in range(args.warmup + args.steps)]
    rows = [run_variant(variant, teacher, student, masks, device, args, batches) for variant in variants]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "torch": torch.__version__, "args": vars(args),
                       "peak_flops": peak_flops, "rows": rows}, handle, indent=1)

    baseline = next((row for row in rows if row["variant"] == "baseline" and not row["oom"]), None)
    print(f"\ndistill step vs plain loop, {args.model} model, batch {args.batch}x{args.seq}, {device_name}, "
          f"torch {torch.__version__}, measured bf16 peak {peak_flops / 1e12:.0f} TFLOP/s\n")
    print("| variant | tokens/s | vs baseline | peak GiB | vs baseline | MFU | first-batch loss | rel. diff | host syncs/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["oom"]:
            print(f"| {row['variant']} | OOM | | | | | | | |")
            continue
        mfu = row["tokens_per_s"] * row["flop_per_token"] / peak_flops
        speed = f"{row['tokens_per_s'] / baseline['tokens_per_s']:.2f}x" if baseline else "-"
        memory = f"{row['peak_gib'] / baseline['peak_gib']:.2f}x" if baseline and device.type == "cuda" else "-"
        diff = f"{abs(row['first_loss'] - baseline['first_loss']) / abs(baseline['first_loss']):.1e}" if baseline else "-"
        syncs = "-" if row["host_syncs_per_step"] is None else row["host_syncs_per_step"]
        print(f"| {row['variant']} | {row['tokens_per_s']:.0f} | {speed} | {row['peak_gib']:.1f} | {memory} | "
              f"{mfu:.1%} | {row['first_loss']:.5f} | {diff} | {syncs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
