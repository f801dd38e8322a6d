"""How fast the teacher writes its corpus: transformers' `generate` against distill's sampler, and
`generate` with its decode step compiled over a static KV cache, on the same model, batch and device.

    python benchmarks/teacher_sampling.py                          # the demo teacher, the demo's corpus shape
    python benchmarks/teacher_sampling.py --batch 32 --new-tokens 160 --variants generate,distill

Every variant writes `--batch` sequences of up to `--new-tokens` tokens from the start token, in the
precision the pipeline would choose here (`--precision` forces one). Seconds include everything the
variant needs (the compile too); tokens count what the corpus keeps (up to each sequence's EOS).
The table is printed last; RESULTS.md records it with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import time
import torch

VARIANTS = ("generate", "generate-static-compiled", "distill")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="a save_pretrained dir (default: the demo teacher)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    return parser.parse_args(argv)


def kept_tokens(rows: list[list[int]], eos: int) -> int:
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def run_generate(model, tokenizer, args, static: bool) -> list[list[int]]:
    prompt = torch.full((args.batch, 1), tokenizer.bos_token_id)
    extra = {"cache_implementation": "static"} if static else {}
    output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                            top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, pad_token_id=tokenizer.eos_token_id, **extra)
    return output[:, 1:].tolist()


def run_distill(model, tokenizer, args) -> list[list[int]]:
    from distill.data.sampling import sample_sequences

    return sample_sequences(model, tokenizer.bos_token_id, tokenizer.eos_token_id, args.batch, args.new_tokens,
                            1.0, 0, torch.Generator().manual_seed(0))


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models import fetch_demo_teacher
    from distill.precision import Precision, choose_precision, cpu_model

    args = parse_args(argv)
    source = args.teacher or fetch_demo_teacher()
    tokenizer = AutoTokenizer.from_pretrained(source)
    choice = choose_precision(args.precision, "cpu")
    bf16 = choice.precision is Precision.BF16
    rows = []
    for variant in args.variants.split(","):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        if variant == "generate-static-compiled":
            model.forward = torch.compile(model.forward)
        torch.manual_seed(0)
        started = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if variant == "distill":
                written = run_distill(model, tokenizer, args)
            else:
                written = run_generate(model, tokenizer, args, static=variant != "generate")
        seconds = time.perf_counter() - started
        tokens = kept_tokens(written, tokenizer.eos_token_id)
        rows.append((variant, seconds, tokens))
        print(f"{variant}: {seconds:.1f} s, {tokens} tokens", flush=True)

    base = dict((variant, tokens / seconds) for variant, seconds, tokens in rows).get("generate")
    print(f"\nteacher sampling, {args.batch} sequences x up to {args.new_tokens} tokens, {choice.describe()}, "
          f"CPU: {cpu_model()}, torch {torch.__version__}\n")
    print("| variant | seconds | tokens kept | tokens/s | vs generate |")
    print("|---|---:|---:|---:|---:|")
    for variant, seconds, tokens in rows:
        ratio = f"{tokens / seconds / base:.2f}x" if base else "-"
        print(f"| {variant} | {seconds:.2f} | {tokens} | {tokens / seconds:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
