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

    python benchmarks/end_to_end.py --device cpu [--student runs/demo/export/packed] [--llama1b]
                                    [--dtype fp32|bf16] [--new-tokens 32] [--repeats 5] [--smoke]

On CPU, in one process, each model runs in five forms, timed interleaved (A B A B) by
distill.eval.speed.measure_speed (batch 1: greedy decode tokens/s, prefill tokens/s):
  dense                              the dense-with-zeros model, eager
  dense compiled                     the same, generating over a static KV cache with the decode step
                                     compiled by torch.compile (skipped, with the reason, if it fails)
  2:4                                Sparse24Linear projections (grouped layout)
  2:4 + 50% activations              Sparse24Linear (input-major layout) with a threshold on every
                                     projection input: the median |x| over a forward of random tokens
  50% activations on dense weights   SparseInputLinear (dense weights, input-major), same thresholds
Models: the demo student (`--student`, a packed export; its dense form is the same export loaded
dense with zeros), and with `--llama1b` a Llama of ~1B parameters (hidden 2048, MLP 8192, 16 layers,
32 heads, 8 KV heads, vocab 49152) of random weights pruned 2:4 by magnitude. Ratios are against the
faster of the two dense forms; "projections MB" is the decoder projections' resident bytes
(distill.eval.speed.tensor_bytes) and "RSS MB" the resident set of a fresh process holding only that
form, after loading it and one forward (this script, `--rss-of FORM`). The Llama-3-8B linear shapes
at M = 1, 4, 16, 512 are `benchmarks/linear_2_4.py --device cpu`'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
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


# ---------------------------------------------------------------------------------------------------
# CPU (`--device cpu`): every form of a model in one process, through distill.eval.speed.measure_speed

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096)
SMOKE_1B = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
SMOKE_STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True)
CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMS = ["dense", "dense compiled", "2:4", "2:4 + 50% activations", "50% activations on dense weights"]
DENSE_FORMS = ("dense", "dense compiled")
CALIBRATION_TOKENS = 128  # random tokens whose projection inputs set the thresholds (median |x|)
ACTIVATION_SPARSITY = 0.5  # the share of projection inputs those thresholds zero


def prune_24(model) -> list[str]:
    """Prune every decoder projection 2:4 by magnitude (in place); their names."""
    from distill.config import PROJECTIONS
    from distill.sparsity.masks import nm_mask
    from distill.targets import target_linears

    names = []
    with torch.no_grad():
        for name, linear in target_linears(model, PROJECTIONS):
            linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4))
            names.append(name)
    return names


def random_llama(sizes: dict, dtype: torch.dtype):
    """A Llama of random weights (seeded), its projections pruned 2:4; (model, projection names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**sizes)).to(dtype).eval()
    return model, prune_24(model)


def smoke_student(directory: Path) -> Path:
    """A tiny random student exported packed (2:4) into `directory`, for --smoke."""
    from distill.sparsity.packing import save_packed
    from distill.sparsity.patterns import NM
    from distill.sparsity.spec import SparsitySpec

    model, names = random_llama(SMOKE_STUDENT, torch.float32)
    save_packed(model, SparsitySpec(NM(2, 4), names), directory)
    return directory


def dense_base(kind: str, args, dtype: torch.dtype):
    """(dense-with-zeros model, its 2:4 projection names) of model `kind`: "student" or "llama1b"."""
    if kind == "llama1b":
        return random_llama(SMOKE_1B if args.smoke else LLAMA_1B, dtype)
    from distill.runtime import load_sparse_model
    from distill.sparsity.activations import remove_thresholds
    from distill.sparsity.spec import read_sparsity_spec

    model = load_sparse_model(args.student, dtype=dtype, sparse=False)
    remove_thresholds(model)  # the dense baseline reads every input
    return model, list(read_sparsity_spec(Path(args.student)).masked)


def calibrate(model, names: list[str], vocab: int) -> dict[str, float]:
    """{projection: median |x| of its input} over a forward of random tokens: thresholds that zero
    about half of every projection's inputs."""
    medians, hooks = {}, []
    for name in names:
        def record(module, inputs, name=name):
            medians[name] = float(inputs[0].detach().float().abs().flatten().median())
        hooks.append(model.get_submodule(name).register_forward_pre_hook(record))
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        model(input_ids=torch.randint(0, vocab, (1, CALIBRATION_TOKENS), generator=generator))
    for hook in hooks:
        hook.remove()
    return medians


def sharing_copy(model):
    """A copy of `model` whose modules are its own but whose tensors are the original's (replacing a
    projection in the copy leaves the original whole, and nothing else is held twice)."""
    memo = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def compiled_decode(model):
    """The dense model generating over a static KV cache with its decode step compiled (Inductor), as
    Hugging Face generate does on GPU; on CPU generate compiles only when the compile config asks for
    every device. Same tensors and modules, its own generation config."""
    from transformers.generation.configuration_utils import CompileConfig

    clone = copy.copy(model)
    clone.generation_config = copy.deepcopy(model.generation_config)
    clone.generation_config.cache_implementation = "static"
    config = CompileConfig(mode="default")  # "reduce-overhead" is CUDA graphs
    config._compile_all_devices = True
    clone.generation_config.compile_config = config
    return clone


def build_form(form: str, kind: str, base, names: list[str], thresholds: dict, table, args, dtype):
    """Model `form` of model `kind` (FORMS), from the dense base where it needs one."""
    from distill.runtime import SparseInputLinear, load_sparse_model, sparsify
    from distill.runtime.loading import INPUT_MAJOR_MIN_SPARSITY
    from distill.sparsity.activations import set_thresholds
    from distill.targets import replace_module

    if form == "dense":
        return base
    if form == "dense compiled":
        return compiled_decode(base)
    if form == "2:4" and kind == "student":  # the runtime's own loader: no dense copy is ever made
        return load_sparse_model(args.student, dtype=dtype, table=table)
    model = sharing_copy(base)
    if form == "2:4":
        sparsify(model, names, table)
    elif form == "2:4 + 50% activations":
        # the layout the loader picks at this share of zeroed inputs (distill.runtime.loading)
        skipping = set(names) if ACTIVATION_SPARSITY >= INPUT_MAJOR_MIN_SPARSITY else set()
        sparsify(model, names, table, sparse_inputs=skipping)
        set_thresholds(model, thresholds)
    else:  # 50% activations on dense weights
        for name in names:
            linear = model.get_submodule(name)
            bias = linear.bias.detach() if linear.bias is not None else None
            replace_module(model, name, SparseInputLinear(linear.weight.detach(), bias, name, table))
        set_thresholds(model, thresholds)
    return model.eval()


def zero_input_fraction(model, names: list[str], prompt: torch.Tensor, new_tokens: int) -> float:
    """The fraction of projection inputs that are zero (after their thresholds) over a greedy decode."""
    zeros, total, hooks = [0], [0], []

    def count(module, inputs):
        x = inputs[0]
        if getattr(module, "applies_input_threshold", False) and hasattr(module, "input_threshold"):
            x = module.input_threshold(x)  # its kernel thresholds as it reads: count what the kernel sees
        if x.dim() < 2 or x.shape[-2] == 1:  # decode steps only
            zeros[0] += int((x == 0).sum())
            total[0] += x.numel()
    for name in names:  # registered after a threshold's pre-hook, where it has one: sees the thresholded input
        hooks.append(model.get_submodule(name).register_forward_pre_hook(count))
    with torch.inference_mode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    for hook in hooks:
        hook.remove()
    return zeros[0] / max(total[0], 1)


def times_x(value: float) -> str:
    """A ratio as "1.85x" (three significant digits below 0.1, so a slow form does not read 0.00x)."""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3g}x"


def vm_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


def release_freed_memory() -> None:
    """Freed memory back to the OS, so VmRSS is what is held (glibc keeps freed heap pages otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_of(args, dtype: torch.dtype, table) -> int:
    """--rss-of: build only `args.rss_of` of `args.rss_model`, run one forward, print its VmRSS."""
    torch.manual_seed(0)
    kind, form = args.rss_model, args.rss_of
    if form == "2:4" and kind == "student":
        base, names, thresholds = None, [], {}
    else:
        base, names = dense_base(kind, args, dtype)
        thresholds = calibrate(base, names, base.config.vocab_size) if "50%" in form else {}
    model = build_form(form, kind, base, names, thresholds, table, args, dtype)
    del base
    release_freed_memory()
    with torch.inference_mode():
        model(input_ids=torch.randint(0, model.config.vocab_size, (1, 16)))
    release_freed_memory()
    print("RSS " + json.dumps({"model": kind, "form": form, **vm_status()}), flush=True)
    return 0


def measure_rss(kind: str, form: str, args) -> dict:
    """The RSS of a fresh process holding only `form` of model `kind` (this script, --rss-of)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu", "--dtype", args.dtype,
               "--rss-of", form, "--rss-model", kind]
    command += ["--student", str(args.student)] if args.student else []
    command += ["--table", args.table] if args.table else []
    command += ["--smoke"] if args.smoke else []
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("RSS "):
            return json.loads(line[4:])
    tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"--rss-of {form!r} exited {result.returncode}: {tail[:200]}"}


def measure_model(kind: str, label: str, args, dtype: torch.dtype, table, notes: list[str]) -> list[dict]:
    """Every form of model `kind` timed in this process (interleaved), and each one's RSS in its own."""
    from distill.eval.speed import measure_speed

    base, names = dense_base(kind, args, dtype)
    vocab = base.config.vocab_size
    thresholds = calibrate(base, names, vocab)
    forms = {}
    for form in FORMS:
        if form == "dense compiled" and args.no_compile:
            why = "--smoke: the compile alone takes ~40 s; --compile keeps it" if args.smoke else "--no-compile"
            notes.append(f"{label}: dense compiled skipped ({why})")
            continue
        forms[form] = build_form(form, kind, base, names, thresholds, table, args, dtype)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (1, max(args.prefill_tokens, 16)), generator=generator)
    if "dense compiled" in forms:  # compile once, untimed; a failure drops the form and says why
        try:
            with torch.inference_mode():
                forms["dense compiled"].generate(prompt[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                                 pad_token_id=0)
        except Exception as error:  # noqa: BLE001 — whatever the compile raised, in one line
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            notes.append(f"{label}: dense compiled skipped: the compiled decode failed ({type(error).__name__}: "
                         f"{first_line})")
            del forms["dense compiled"]
    print(f"{label}: timing {', '.join(forms)} ({args.repeats} rounds)", flush=True)
    result = measure_speed(forms, prompt, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
                           repeats=args.repeats, baseline="dense")
    zero_share = zero_input_fraction(forms["2:4 + 50% activations"], names, prompt[:, :16],
                                     min(args.new_tokens, 8))
    notes.append(f"{label}: thresholds (median |x| of each projection's input over {CALIBRATION_TOKENS} random "
                 f"tokens) zero {zero_share:.0%} of the projection inputs during decode")
    del forms, base
    release_freed_memory()
    rows = []
    models = result["models"]
    best = {metric: max(models[form][f"{metric}_tokens_per_s"] for form in DENSE_FORMS if form in models)
            for metric in ("decode", "prefill")}
    rss = {}
    if args.smoke and kind == "llama1b" and not args.no_rss:
        notes.append(f"{label}: RSS not measured under --smoke (a process per form; the student's are)")
    for form in models:
        if args.no_rss or (args.smoke and kind == "llama1b"):
            continue
        if form == "dense compiled":  # the same tensors as dense; its forward (prefill) is the eager one
            rss[form] = rss.get("dense", {})
            continue
        rss[form] = measure_rss(kind, form, args)
        if "error" in rss[form]:
            notes.append(f"{label} {form}: RSS not measured: {rss[form]['error']}")
    for form, row in models.items():
        rows.append({"model": label, "form": form, "decode_tokens_per_s": row["decode_tokens_per_s"],
                     "prefill_tokens_per_s": row["prefill_tokens_per_s"],
                     "decode_ratio": row["decode_tokens_per_s"] / best["decode"],
                     "prefill_ratio": row["prefill_tokens_per_s"] / best["prefill"],
                     "projection_bytes": row["bytes_projections"], "total_bytes": row["bytes_total"],
                     "rss_bytes": rss.get(form, {}).get("VmRSS"), "peak_rss_bytes": rss.get(form, {}).get("VmHWM")})
    return rows


def cpu_main(args) -> int:
    from distill.precision import cpu_model
    from distill.runtime import cpu_kernels
    from distill.runtime.loading import crossover_table

    import transformers

    dtype = CPU_DTYPES[args.dtype]
    table = crossover_table(args.table)
    if args.rss_of:
        return rss_of(args, dtype, table)
    command = " ".join(shlex.quote(part) for part in ["python", *sys.argv])
    temporary = None
    if args.smoke:
        args.new_tokens = min(args.new_tokens, 4)
        args.repeats = min(args.repeats, 1)
        args.prefill_tokens = min(args.prefill_tokens, 16)
        args.no_compile = args.no_compile or not args.compile
        if not args.student:
            temporary = tempfile.TemporaryDirectory()
            args.student = str(smoke_student(Path(temporary.name) / "packed"))
        args.llama1b = True
    if not args.student and not args.llama1b:
        print("end_to_end.py --device cpu: give --student DIR (a packed export) and/or --llama1b", file=sys.stderr)
        return 2
    started = time.perf_counter()
    isa = cpu_kernels.loaded_isa()
    print(f"command: {command}")
    print(f"CPU {cpu_model()}, {torch.get_num_threads()} threads, {args.dtype}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, distill CPU kernels {isa or 'not built (PyTorch fallback)'}, "
          f"crossover table {args.table or 'the shipped CPU default'}", flush=True)
    rows, notes = [], []
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        notes.append(f"the load average was {load:.1f} on {cores} cores before this run: other processes share the "
                     f"CPUs, so these timings are not the machine's")
    if args.student:
        rows += measure_model("student", "demo student" if not args.smoke else "smoke student", args, dtype, table, notes)
    if args.llama1b:
        rows += measure_model("llama1b", "llama-1b-shaped" if not args.smoke else "smoke llama", args, dtype, table, notes)
    if temporary is not None:
        temporary.cleanup()

    print(f"\n2:4 end to end on CPU\n\ncommand: {command}\nCPU {cpu_model()}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, torch {torch.__version__}, transformers {transformers.__version__}, kernels {isa}; batch 1, "
          f"decode {args.new_tokens} new tokens after 16, prefill {args.prefill_tokens} tokens, median of "
          f"{args.repeats} interleaved rounds; ratios against the faster of dense and dense compiled\n")
    print("| model | form | decode tok/s | prefill tok/s | decode ratio | prefill ratio | projections MB | RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        rss = f"{row['rss_bytes'] / 2**20:.0f}" if row["rss_bytes"] else "-"
        print(f"| {row['model']} | {row['form']} | {row['decode_tokens_per_s']:.2f} | {row['prefill_tokens_per_s']:.1f} | "
              f"{times_x(row['decode_ratio'])} | {times_x(row['prefill_ratio'])} | {row['projection_bytes'] / 2**20:.1f} | "
              f"{rss} |")
    print("\nRSS: a fresh process holding only that form, after loading it and one forward (dense compiled: "
          "the dense model's; it compiles only while generating)")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": "cpu", "cpu": cpu_model(), "threads": torch.get_num_threads(), "dtype": args.dtype,
                       "torch": torch.__version__, "command": command, "notes": notes, "rows": rows}, handle, indent=1)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", help="crossover table from benchmarks/linear_2_4.py --write-table")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--student", help="a packed export dir (runs/<name>/export/packed)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, help="decode tokens per generate (GPU default 128, CPU 32)")
    parser.add_argument("--repeats", type=int, help="rounds, the median is kept (GPU default 9, CPU 5)")
    parser.add_argument("--json", help="save every measurement (JSON)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="fp32", choices=list(CPU_DTYPES), help="CPU: the models' dtype")
    parser.add_argument("--llama1b", action="store_true", help="CPU: also the ~1B-parameter Llama-shaped model")
    parser.add_argument("--prefill-tokens", type=int, default=128, help="CPU: tokens of the timed prefill forward")
    parser.add_argument("--no-compile", action="store_true", help="CPU: leave out the dense compiled form")
    parser.add_argument("--compile", action="store_true", help="CPU --smoke: keep the dense compiled form")
    parser.add_argument("--no-rss", action="store_true", help="CPU: do not measure each form's RSS")
    parser.add_argument("--rss-of", choices=FORMS, help=argparse.SUPPRESS)  # one form's RSS, in a process of its own
    parser.add_argument("--rss-model", choices=["student", "llama1b"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        args.new_tokens, args.repeats = args.new_tokens or 32, args.repeats or 5
        return cpu_main(args)
    args.new_tokens, args.repeats = args.new_tokens or 128, args.repeats or 9

    from distill.runtime import CrossoverTable

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.prompt_tokens, args.new_tokens, args.repeats = 8, 8, 3
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        print("end_to_end.py needs a CUDA GPU (or --device cpu, or --smoke); none is visible", file=sys.stderr)
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
