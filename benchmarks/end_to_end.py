"""Whole-model 2:4 inference against dense, in the same run on the same device.

    python benchmarks/end_to_end.py --table crossover.json [--layers 8] [--student runs/demo/export/packed]
    python benchmarks/end_to_end.py --smoke        # tiny shapes on CPU: checks the script, times nothing useful

Models:
  llama8b-shaped  a decoder with Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads,
                  vocab 128256), `--layers` layers (default 8), random weights pruned 2:4 by magnitude
  demo student    `--student`: a packed export (the export stage's `packed/` dir)
Each runs twice, as the dense-with-zeros model (cuBLAS) and as the sparse runtime
(`distill.runtime.sparsify` with the crossover table from `benchmarks/linear_2_4.py --write-table`).

Measurements (bf16):
  prefill  tokens/s of one forward over 1x4096 and 8x2048 tokens (last position's logits only),
           forward compiled in torch.compile's "reduce-overhead" mode (CUDA graphs), timed with
           device events, median of repeats
  decode   tokens/s at batch 1, 8, 32 with Hugging Face generate over a static KV cache (the decode
           step compiled to a CUDA graph by transformers); decode time is separated from prefill by
           two runs, `--new-tokens` and `--new-tokens`/4 new tokens: (b * difference in tokens) /
           difference in seconds
Table last; ratios are sparse / dense tokens/s (>1 is faster).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
SMOKE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=512)
PREFILL = [(1, 4096), (8, 2048)]
DECODE_BATCHES = [1, 8, 32]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call after warm-up (device-synchronized wall time around each call)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def llama_shaped(layers: int, device: torch.device, dtype: torch.dtype, smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.config import PROJECTIONS
    from distill.sparsity.masks import nm_mask
    from distill.targets import target_linears

    config = LlamaConfig(num_hidden_layers=layers, **(SMOKE if smoke else LLAMA_8B))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    names = []
    with torch.no_grad():
        for name, linear in target_linears(model, PROJECTIONS):
            linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4))
            names.append(name)
    return model, names


def packed_student(path: str, device: torch.device, dtype: torch.dtype):
    from distill.sparsity.spec import read_sparsity_spec
    from distill.sparsity.packing import load_packed

    return load_packed(path, dtype=dtype).to(device).eval(), read_sparsity_spec(Path(path)).masked


def measure(model, device: torch.device, vocab: int, args) -> dict:
    torch._dynamo.reset()  # every model and case gets fresh compiles, never another model's graphs
    compiled = model.forward
    if device.type == "cuda":
        compiled = torch.compile(model.forward, mode="reduce-overhead")
    result = {}
    for batch, length in ([(1, 64), (2, 32)] if args.smoke else PREFILL):
        ids = torch.randint(0, vocab, (batch, length), device=device)
        with torch.no_grad():
            t = seconds(lambda: compiled(input_ids=ids, use_cache=False, logits_to_keep=1), device, args.repeats)
        result[f"prefill {batch}x{length}"] = batch * length / t
    long_run, short_run = args.new_tokens, max(1, args.new_tokens // 4)
    for batch in ([1, 2] if args.smoke else DECODE_BATCHES):
        prompt = torch.randint(0, vocab, (batch, args.prompt_tokens), device=device)

        def generate(new_tokens: int):
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  cache_implementation="static", pad_token_id=0)

        with torch.no_grad():
            t_long = seconds(lambda: generate(long_run), device, max(1, args.repeats // 3))
            t_short = seconds(lambda: generate(short_run), device, max(1, args.repeats // 3))
        result[f"decode b={batch}"] = batch * (long_run - short_run) / max(t_long - t_short, 1e-9)
    return result


def compare(label: str, dense, names: list[str], table, device, vocab: int, args) -> list[dict]:
    from distill.runtime import Sparse24Linear, sparsify

    # copied before dense runs: generate caches its compiled forward on the model, and a copy made
    # afterwards would reuse the dense model's graphs
    sparse = copy.deepcopy(dense)
    dense_result = measure(dense, device, vocab, args)
    sparsify(sparse, names, table, keep_dense=any(e["path"] == "dense" for r in table.shapes.values() for e in r)
             or not table.shapes)
    for module in sparse.modules():
        if isinstance(module, Sparse24Linear):
            module.prepare_kernels()
    del dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sparse_result = measure(sparse, device, vocab, args)
    return [{"model": label, "case": case, "dense_tok_s": dense_result[case], "sparse_tok_s": sparse_result[case]}
            for case in dense_result]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", help="crossover table from benchmarks/linear_2_4.py --write-table")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--student", help="a packed export dir (runs/<name>/export/packed)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="save every measurement (JSON)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    args = parser.parse_args(argv)

    from distill.runtime import CrossoverTable

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.prompt_tokens, args.new_tokens, args.repeats = 8, 8, 3
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        print("end_to_end.py needs a CUDA GPU (or --smoke); none is visible", file=sys.stderr)
        return 2
    if device.type == "cuda" and not args.table:  # without one, every projection would run dense
        print("end_to_end.py needs --table (from benchmarks/linear_2_4.py --write-table) on CUDA", file=sys.stderr)
        return 2
    table = CrossoverTable.load(args.table) if args.table else CrossoverTable()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.manual_seed(0)

    rows = []
    model, names = llama_shaped(args.layers, device, dtype, args.smoke)
    rows += compare(f"llama8b-shaped x{args.layers} layers", model, names, table, device, model.config.vocab_size, args)
    del model
    if args.student:
        model, names = packed_student(args.student, device, dtype)
        rows += compare("demo student", model, names, table, device, model.config.vocab_size, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "torch": torch.__version__, "table": args.table, "rows": rows}, handle, indent=1)

    print(f"\n2:4 end to end vs dense, {dtype}, {device_name}, torch {torch.__version__}, table {args.table}\n")
    print("| model | case | dense tok/s | sparse tok/s | sparse / dense |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['case']} | {row['dense_tok_s']:.0f} | {row['sparse_tok_s']:.0f} | "
              f"{row['sparse_tok_s'] / row['dense_tok_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
