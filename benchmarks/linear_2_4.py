"""2:4 linear layers against dense cuBLAS at Llama-3-8B shapes, bf16, one GPU, one run.

    python benchmarks/linear_2_4.py [--write-table crossover.json] [--json results.json]
    python benchmarks/linear_2_4.py --shapes 576x576,192x576,1536x576,576x1536   # the demo student's

For each weight shape and M (tokens) it times, as device time per call with the calls captured in a
CUDA graph (so host overhead is out of the number), each call on the next of several copies of the
weight that together exceed the L2 cache (so small M reads its weight from memory, as in a model):
  dense        F.linear on the dense-with-zeros weight (cuBLAS)
  triton       our kernel on the compressed layout (distill.runtime.triton_kernels), at the fastest of
               its candidate tiles for that shape and M (`candidate_tiles`, split-K included for
               M <= 16; the table records the winner, the JSON the tiles the GPU refused)
  cslt         F.linear on torch.sparse.to_sparse_semi_structured (cuSPARSELt)
  cslt eager   the same without a CUDA graph (wall time per call: what users saw)
  dispatch     Sparse24Linear with the crossover table built from this run's timings
and prints speed-ups over dense (>1 is faster) and each path's relative error against a float64
reference, table last. Needs CUDA; prints why and exits 2 without it (`--device cpu` runs the CPU
measurement below instead).

    python benchmarks/linear_2_4.py --device cpu [--dtype fp32|bf16] [--shapes ...] [--m 1,4,16,512]
                                    [--write-table cpu_crossover.json] [--json linear_cpu.json] [--smoke]

On CPU, for each shape N x K and M it times wall time per call, each call on the next of several
copies of the weight that together exceed the last-level cache (the copies are capped by a memory
budget, `--memory-gb`; the output says where that left fewer than the cache asks for), median over
`--repeats` rounds in which the candidates take turns:
  dense              F.linear on the dense weight: the baseline of every ratio
  cpu_unpack         Sparse24Linear (grouped layout), unpacked into the scratch buffer + GEMM
  cpu_kernel         Sparse24Linear (grouped layout), the decode kernel (M <= 16)
  2:4 x50%           Sparse24Linear(sparse_inputs=True) (input-major layout), decode kernel, on an
                     input with half its entries zero (M <= 16)
  dense x50%         SparseInputLinear (dense weight, input-major), decode kernel, same input (M <= 16)
  embedding_bag x50% F.embedding_bag over the active inputs' rows of W.T (K x N), M = 1, same input
  gather 2:4         torch.compile (Inductor) of y = (values * x[4 * group + position]).sum(-1) over
                     pack_nm's form (values [N, K/2], uint8 positions), M = 1
The half of the inputs that is zero is drawn independently for each of the M rows (a threshold zeroes
each token's own small inputs), so only inputs zero in all M rows can be skipped: at M = 4 that is
~1/16 of them (`--shared-zeros` zeroes the same half in every row instead). The output has the
ratio dense time / candidate time (>1 is faster), each candidate's bytes limit (dense weight bytes /
the bytes the candidate reads: what it could gain if both ran at memory bandwidth), the machine's
read bandwidth (a sum over a large tensor), its CPU and the ISA the kernels were built for.
`--write-table` writes the CPU crossover table (cpu_kernel against cpu_unpack, per shape and M).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (out, in) of Llama-3-8B projections
MS = [1, 4, 16, 64, 256, 1024, 2048, 8192]


# Weights rotate among copies that together exceed the L2 cache (50 MB on H100), so small-M calls
# stream their weight from device memory as they would in a model, not from cache (METHOD.md).
ROTATION_BYTES = 200e6
MAX_COPIES = 16


def copies_for(n: int, k: int) -> int:
    return int(min(MAX_COPIES, max(1, -(-ROTATION_BYTES // (n * k * 2)))))


def graphed_time(fns, calls: int = 24, replays: int = 10) -> float:
    """Median device seconds per call, `calls` calls (cycling over `fns`, one per weight copy)
    captured in one CUDA graph, so host overhead is out of the number."""
    fns = fns if isinstance(fns, list) else [fns]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in range(calls):
            fns[call % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def eager_time(fn, calls: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-table", help="save the measured crossover table (JSON) for the runtime")
    parser.add_argument("--json", help="save every measurement (JSON)")
    parser.add_argument("--ms", "--m", dest="ms", help=f"token counts M, comma separated (GPU default "
                        f"{','.join(map(str, MS))}, CPU {','.join(map(str, CPU_MS))})")
    parser.add_argument("--shapes", help="out x in, comma separated (default: Llama-3-8B's projections; on CPU "
                        "also the demo student's)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="CPU: weights and inputs (default fp32); the GPU "
                        "measures bf16")
    parser.add_argument("--repeats", type=int, default=5, help="CPU: rounds, the median is kept")
    parser.add_argument("--memory-gb", type=float, help="CPU: memory for the weight copies (default 40%% of "
                        "MemAvailable)")
    parser.add_argument("--shared-zeros", action="store_true", help="CPU: the same half of the inputs is zero in "
                        "every row (default: drawn per row)")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, few copies, to check the script")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        args.ms = args.ms or ",".join(map(str, MS))
        args.shapes = args.shapes or ",".join(f"{n}x{k}" for n, k in SHAPES)
    return args


def parse_grid(args: argparse.Namespace) -> tuple[list[tuple[int, ...]], list[int]]:
    """The (out, in) weight shapes and the Ms to time, from the comma-separated flags."""
    ms = [int(m) for m in args.ms.split(",")]
    shapes = [tuple(int(size) for size in shape.split("x")) for shape in args.shapes.split(",")]
    return shapes, ms


def sparse_weights(n: int, k: int) -> list[torch.Tensor]:
    """`copies_for(n, k)` random 2:4-pruned bf16 weights, enough to rotate past the L2 cache."""
    from distill.sparsity.masks import nm_mask

    weights = []
    for _ in range(copies_for(n, k)):
        weight = torch.randn(n, k, device="cuda")
        weights.append((weight * nm_mask(weight.abs(), 2, 4)).to(torch.bfloat16))
    return weights


def triton_calls(x, compressed, tiles) -> list:
    """One call of our kernel per compressed weight copy, at the given tiles."""
    from distill.runtime.triton_kernels import sparse24_matmul

    return [lambda v=v, meta=meta: sparse24_matmul(x, v, meta, tiles=tiles) for v, meta in compressed]


def search_tiles(x, compressed, m: int, k: int) -> tuple[tuple, dict, list]:
    """Time every candidate tile of our kernel for this M; returns (fastest, times tried, refused)."""
    from distill.runtime.triton_kernels import candidate_tiles
    from triton.runtime.errors import OutOfResources

    tried, refused = {}, []
    for tiles in candidate_tiles(m, k):
        try:  # the warm-up call compiles before any graph capture, so a refusal leaves no capture open
            tried[tiles] = graphed_time(triton_calls(x, compressed, tiles))
        except OutOfResources:  # e.g. deep K tiles x pipeline stages over the shared memory
            refused.append(list(tiles))
    return min(tried, key=tried.get), tried, refused


def measure_m(shape: str, m: int, weights, compressed, semis) -> tuple[dict, dict, tuple]:
    """Time and check dense, triton and cslt at one shape and M; returns (row, times, triton tiles)."""
    k = weights[0].shape[1]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    reference = x.double() @ weights[0].double().T
    tiles, tried, refused = search_tiles(x, compressed, m, k)
    # the winner is timed again below with the other paths: the minimum over many noisy
    # timings is biased low, a fresh one is not
    paths = {
        "dense": [lambda w=w: F.linear(x, w) for w in weights],
        "triton": triton_calls(x, compressed, tiles),
        "cslt": [lambda w=w: F.linear(x, w) for w in semis],
    }
    row = {"shape": shape, "m": m, "weight_copies": len(weights), "triton_tiles": list(tiles),
           "tiles_tried": len(tried), "tiles_refused": refused}
    times = {}
    for path, fns in paths.items():
        out = fns[0]()
        row[f"{path}_error"] = float((out.double() - reference).norm() / reference.norm())
        times[path] = graphed_time(fns)
    row["cslt_eager_s"] = eager_time(paths["cslt"][0])
    row.update({f"{path}_s": seconds for path, seconds in times.items()})
    return row, times, tiles


def measure_shape(n: int, k: int, ms: list[int], rows: list, timings: dict, best_tiles: dict) -> list:
    """Time every M at one weight shape, appending to `rows`, `timings` and `best_tiles`;
    returns the weight copies, which the dispatch timing reuses."""
    from distill.runtime.layout import compress_2_4
    from torch.sparse import to_sparse_semi_structured

    weights = sparse_weights(n, k)
    compressed = [compress_2_4(weight) for weight in weights]
    semis = [to_sparse_semi_structured(weight) for weight in weights]
    shape = f"{n}x{k}"
    timings[shape], best_tiles[shape] = {}, {}
    for m in ms:
        row, times, tiles = measure_m(shape, m, weights, compressed, semis)
        best_tiles[shape][m] = tiles
        timings[shape][m] = {"dense": times["dense"], "triton": times["triton"], "cusparselt": times["cslt"]}
        rows.append(row)
        print(f"{shape} M={m}: dense {times['dense'] * 1e6:.1f} us, triton x{times['dense'] / times['triton']:.2f} "
              f"(tiles {tiles}), cslt x{times['dense'] / times['cslt']:.2f}", flush=True)
    return weights


def time_dispatch(table, layers_by_shape: dict, rows: list) -> None:
    """Add the dispatcher's chosen path and time (`Sparse24Linear` with `table`) to every row."""
    from distill.runtime import Sparse24Linear

    for shape, weights in layers_by_shape.items():
        layers = [Sparse24Linear(weight, None, shape, table) for weight in weights]
        for layer in layers:
            layer.prepare_kernels()
        for row in (row for row in rows if row["shape"] == shape):
            x = torch.randn(row["m"], layers[0].in_features, device="cuda", dtype=torch.bfloat16)
            row["dispatch_path"] = table.choose(layers[0].out_features, layers[0].in_features, row["m"])
            row["dispatch_s"] = graphed_time([lambda layer=layer: layer(x) for layer in layers])
        del layers  # free this shape's prepared layers before the next shape's are built


def write_results(args: argparse.Namespace, table, device_name: str, rows: list) -> None:
    """Save the crossover table and/or every measurement, where the flags ask for them."""
    if args.write_table:
        table.save(args.write_table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "torch": torch.__version__, "rows": rows}, handle, indent=1)


def print_table(device_name: str, rows: list) -> None:
    """The markdown table of speed-ups over dense (>1 is faster) and the worst relative error."""
    print(f"\n2:4 linear vs dense, bf16, {device_name}, torch {torch.__version__}; speed-up = dense time / path time\n")
    print("| shape (out x in) | M | dense us | triton | cslt (graph) | cslt eager | dispatch (path) | max rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        dense = row["dense_s"]
        error = max(row["triton_error"], row["cslt_error"])
        print(f"| {row['shape']} | {row['m']} | {dense * 1e6:.1f} | {dense / row['triton_s']:.2f}x | "
              f"{dense / row['cslt_s']:.2f}x | {dense / row['cslt_eager_s']:.2f}x | "
              f"{dense / row['dispatch_s']:.2f}x ({row['dispatch_path']}) | {error:.1e} |")


# ---------------------------------------------------------------------------------------------------
# CPU (`--device cpu`): the runtime's CPU paths against F.linear, wall time per call

CPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336),  # Llama-3-8B
              (576, 576), (192, 576), (1536, 576), (576, 1536)]  # the demo student (SmolLM2-135M)
CPU_MS = [1, 4, 16, 512]
SMOKE_SHAPES = [(192, 576), (576, 576)]
SMOKE_MS = [1, 4, 512]
SMOKE_LARGE = 1 << 20  # under --smoke, shapes of more weights than this skip M > 16
CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECODE_M = 16  # the decode kernels' largest M
ROTATION_LLC = 2  # each candidate's copies together read at least twice the last-level cache
MIN_SECONDS = 0.02  # per candidate and round: at least this much work (and one pass over the copies)
CANDIDATES = ["dense", "cpu_unpack", "cpu_kernel", "2:4 x50%", "dense x50%", "embedding_bag x50%", "gather 2:4"]
SPARSE_INPUT = {"2:4 x50%", "dense x50%", "embedding_bag x50%"}  # read the input with half its entries zero
M1_ONLY = {"embedding_bag x50%", "gather 2:4"}
DECODE_ONLY = {"cpu_kernel", "2:4 x50%", "dense x50%"}


def last_level_cache() -> tuple[int, str]:
    """(bytes, "L3 32 MiB") of the last-level cache, from /sys (lscpu's source), else lscpu."""
    best = (0, 0)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        best = max(best, (level, nbytes))
    if not best[1]:
        try:
            for line in subprocess.run(["lscpu", "-B"], capture_output=True, text=True).stdout.splitlines():
                if line.startswith(("L3 cache", "L2 cache")):
                    best = max(best, (int(line[1]), int(line.split(":")[1].split()[0])))
        except (OSError, ValueError, IndexError):
            pass
    level, nbytes = best
    return nbytes or 32 << 20, f"L{level} {nbytes / 2**20:.0f} MiB" if nbytes else "unknown (32 MiB assumed)"


def memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a sum over an fp32 tensor of `nbytes` (memory read bandwidth, all threads)."""
    data = torch.ones(nbytes // 4)
    data.sum()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times)


def forced(path: str, n: int, k: int):
    """A crossover table that sends shape n x k to `path` at every M."""
    from distill.runtime import CrossoverTable

    return CrossoverTable("cpu", {f"{n}x{k}": [{"max_m": None, "path": path}]})


def gather_24(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """y [1, N] = sum over kept weights of values * x[4 * group + position] (pack_nm's form), M = 1."""
    base = torch.arange(values.shape[1], device=x.device) // 2 * 4
    gathered = x[0].float()[base + positions.to(torch.int64)]
    return (values.float() * gathered).sum(-1)[None].to(x.dtype)


def embedding_bag_product(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ W.T through the rows of W.T (K x N) of x's non-zero inputs, M = 1."""
    active = x[0].nonzero().squeeze(1)
    return F.embedding_bag(active[None], weight_t, per_sample_weights=x[0, active][None], mode="sum")


def times_x(value: float) -> str:
    """A ratio as "1.85x" (three significant digits below 0.1, so a slow candidate does not read 0.00x)."""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3g}x"


def load_note() -> str | None:
    """A warning when other processes keep the CPUs busy (1-minute load average over half the cores)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        return (f"the load average was {load:.1f} on {cores} cores before this run: other processes share the "
                f"CPUs, so these timings (multi-threaded ones most) are not the machine's")
    return None


def nbytes(*tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


class CpuShape:
    """One shape's weight copies in every candidate's form, and the bytes each copy holds."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, llc: int, budget: int, smoke: bool):
        from distill.runtime import Sparse24Linear, SparseInputLinear
        from distill.sparsity.masks import nm_mask
        from distill.sparsity.packing import pack_nm

        self.n, self.k, self.dtype = n, k, dtype
        weight = torch.randn(n, k)
        mask = nm_mask(weight.abs(), 2, 4)
        weight = (weight * mask).to(dtype)
        first = {
            "dense": weight,
            "cpu_kernel": Sparse24Linear.from_dense(weight, None, f"{n}x{k}", forced("cpu_kernel", n, k)),
            "2:4 x50%": Sparse24Linear.from_dense(weight, None, f"{n}x{k}", forced("cpu_kernel", n, k), sparse_inputs=True),
            "dense x50%": SparseInputLinear(weight, None, f"{n}x{k}", forced("cpu_kernel", n, k)),
            "embedding_bag x50%": weight.t().contiguous(),
            "gather 2:4": pack_nm(weight, mask, 2, 4),
        }
        self.resident = {  # bytes of one copy, per candidate's storage
            "dense": nbytes(weight), "cpu_kernel": first["cpu_kernel"].resident_bytes(),
            "2:4 x50%": first["2:4 x50%"].resident_bytes(), "dense x50%": first["dense x50%"].resident_bytes(),
            "embedding_bag x50%": nbytes(weight), "gather 2:4": nbytes(*first["gather 2:4"]),
        }
        self.resident["cpu_unpack"] = self.resident["cpu_kernel"]
        per_copy = sum(value for name, value in self.resident.items() if name != "cpu_unpack")
        # the candidate reading the least per call (the input-major 2:4 at half its inputs) still
        # streams its copies from memory: together they read ROTATION_LLC times the cache
        least = min(self.resident["2:4 x50%"] / 2, self.resident["gather 2:4"], self.resident["cpu_kernel"])
        wanted = max(2, math.ceil(ROTATION_LLC * llc / least))
        fits = max(2, budget // per_copy)
        self.copies = min(wanted, fits, 8) if smoke else min(wanted, fits)
        self.note = ""
        if self.copies < wanted:
            why = "--smoke" if smoke and self.copies == 8 and fits > 8 else "the memory budget"
            self.note = (f"{n}x{k}: {self.copies} weight copies ({why}; {self.copies * per_copy / 2**30:.2f} GiB for "
                         f"all candidates); the smallest rotation reads {self.copies * least / 2**20:.0f} MiB against a "
                         f"{llc / 2**20:.0f} MiB last-level cache, so the candidates reading least may be served "
                         f"partly from cache")
        self.forms = {name: [value] for name, value in first.items()}
        for _ in range(self.copies - 1):
            for name, value in first.items():
                if isinstance(value, torch.Tensor):
                    self.forms[name].append(value.clone())
                elif isinstance(value, tuple):
                    self.forms[name].append(tuple(tensor.clone() for tensor in value))
                else:
                    self.forms[name].append(copy.deepcopy(value))
        unpack = forced("cpu_unpack", n, k)
        self.forms["cpu_unpack"] = []
        for module in self.forms["cpu_kernel"]:
            twin = copy.copy(module)  # the same buffers, another table
            twin.table = unpack
            self.forms["cpu_unpack"].append(twin)
        self.compiled_gather = None

    def calls(self, name: str, x: torch.Tensor, xs: torch.Tensor) -> list:
        """One call per weight copy of candidate `name`; x dense, xs with half its inputs zero."""
        forms = self.forms[name]
        if name == "dense":
            return [lambda w=w: F.linear(x, w) for w in forms]
        if name in ("cpu_unpack", "cpu_kernel"):
            return [lambda layer=layer: layer(x) for layer in forms]
        if name in ("2:4 x50%", "dense x50%"):
            return [lambda layer=layer: layer(xs) for layer in forms]
        if name == "embedding_bag x50%":
            return [lambda wt=wt: embedding_bag_product(xs, wt) for wt in forms]
        if self.compiled_gather is None:
            self.compiled_gather = torch.compile(gather_24, dynamic=False)
        return [lambda pair=pair: self.compiled_gather(x, *pair) for pair in forms]

    def bytes_read(self, name: str, skipped: float) -> float:
        """Weight bytes one call reads; `skipped`: the fraction of inputs zero in every row."""
        if name == "cpu_unpack":  # its layout, then the scratch weight written and read by the GEMM
            return self.resident[name] + 2 * self.n * self.k * self.dtype.itemsize
        if name in SPARSE_INPUT:
            return self.resident[name] * (1 - skipped)
        return self.resident[name]


def applies(name: str, m: int) -> bool:
    return not ((name in M1_ONLY and m != 1) or (name in DECODE_ONLY and m > DECODE_M))


def sparse_input(m: int, k: int, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """[m, k] with exactly half of each row zero: a random half per row, or the same for all rows."""
    x = torch.randn(m, k)
    order = torch.rand(1 if shared else m, k).argsort(dim=-1)
    zero = torch.zeros(order.shape, dtype=torch.bool).scatter_(-1, order[:, : k // 2], True)
    return x.masked_fill(zero.expand(m, k), 0).to(dtype)


def time_candidates(calls: dict[str, list], repeats: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each candidate: per round, each candidate in turn (the order rotating)
    runs at least one pass over its weight copies, each call on the next copy."""
    per_round, position = {}, {}
    for name, fns in calls.items():
        for fn in fns:  # warm-up: every copy touched once (pages, compiled code)
            fn()
        started = time.perf_counter()
        for fn in fns:
            fn()
        estimate = (time.perf_counter() - started) / len(fns)
        per_round[name] = max(len(fns), math.ceil(min_seconds / max(estimate, 1e-9)))
        position[name] = 0
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            fns, count, first = calls[name], per_round[name], position[name]
            started = time.perf_counter()
            for index in range(first, first + count):
                fns[index % len(fns)]()
            times[name].append((time.perf_counter() - started) / count)
            position[name] = (first + count) % len(fns)
    return {name: statistics.median(values) for name, values in times.items()}


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm())


def measure_cpu_shape(shape: CpuShape, ms: list[int], args, notes: list[str]) -> list[dict]:
    rows = []
    n, k = shape.n, shape.k
    for m in ms:
        x = torch.randn(m, k).to(shape.dtype)
        xs = sparse_input(m, k, shape.dtype, args.shared_zeros)
        skipped = float((xs == 0).all(dim=0).float().mean())
        references = {False: x.double() @ shape.forms["dense"][0].double().T,
                      True: xs.double() @ shape.forms["dense"][0].double().T}
        calls, errors = {}, {}
        for name in CANDIDATES:
            if not applies(name, m):
                continue
            try:
                fns = shape.calls(name, x, xs)
                errors[name] = relative_error(fns[0](), references[name in SPARSE_INPUT])
            except Exception as error:  # noqa: BLE001 — a PyTorch product this build cannot run: said, skipped
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
                notes.append(f"{n}x{k} M={m}: {name} failed ({type(error).__name__}: {first_line})")
                if name == "gather 2:4":
                    shape.compiled_gather = None
                continue
            calls[name] = fns
        times = time_candidates(calls, args.repeats, MIN_SECONDS / 10 if args.smoke else MIN_SECONDS)
        dense_bytes = shape.resident["dense"]
        row = {"shape": f"{n}x{k}", "m": m, "dtype": args.dtype, "copies": shape.copies, "inputs_skipped": skipped,
               "seconds": times, "errors": errors,
               "bytes_read": {name: shape.bytes_read(name, skipped) for name in times},
               "dense_gb_s": dense_bytes / times["dense"] / 1e9}
        row["bytes_limit"] = {name: dense_bytes / value for name, value in row["bytes_read"].items()}
        rows.append(row)
        ratios = ", ".join(f"{name} {times_x(times['dense'] / seconds)}" for name, seconds in times.items() if name != "dense")
        print(f"{n}x{k} M={m}: dense {times['dense'] * 1e3:.3f} ms; {ratios}", flush=True)
    return rows


def cpu_ratio_table(rows: list[dict]) -> list[str]:
    header = ["shape", "M", "dtype", "copies", "dense ms", "dense GB/s", *CANDIDATES[1:], "max rel err"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---|---:|" + "---:|" * (len(header) - 4)]
    for row in rows:
        dense = row["seconds"]["dense"]
        cells = [times_x(dense / row["seconds"][name]) if name in row["seconds"] else "-" for name in CANDIDATES[1:]]
        error = max(row["errors"].values())
        lines.append(f"| {row['shape']} | {row['m']} | {row['dtype']} | {row['copies']} | {dense * 1e3:.3f} | "
                     f"{row['dense_gb_s']:.1f} | " + " | ".join(cells) + f" | {error:.1e} |")
    return lines


def cpu_bytes_table(rows: list[dict]) -> list[str]:
    header = ["shape", "M", "inputs zero in all rows", *CANDIDATES[1:]]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * (len(header) - 3)]
    for row in rows:
        cells = [times_x(row["bytes_limit"][name]) if name in row["bytes_limit"] else "-" for name in CANDIDATES[1:]]
        lines.append(f"| {row['shape']} | {row['m']} | {row['inputs_skipped']:.0%} | " + " | ".join(cells) + " |")
    return lines


def cpu_main(args: argparse.Namespace) -> int:
    from distill.precision import cpu_model
    from distill.runtime import CrossoverTable
    from distill.runtime import cpu_kernels

    started = time.perf_counter()
    args.dtype = args.dtype or "fp32"
    dtype = CPU_DTYPES[args.dtype]
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    shapes = ([tuple(int(size) for size in shape.split("x")) for shape in args.shapes.split(",")] if args.shapes
              else SMOKE_SHAPES if args.smoke else CPU_SHAPES)
    ms = [int(m) for m in args.ms.split(",")] if args.ms else SMOKE_MS if args.smoke else CPU_MS
    llc, llc_text = last_level_cache()
    budget = int(args.memory_gb * 2**30) if args.memory_gb else int(0.4 * memory_available())
    isa = cpu_kernels.loaded_isa()  # builds the kernels now (~20 s once), not inside a timing
    bandwidth = read_bandwidth(min(1 << 30, budget // 4) if not args.smoke else 64 << 20)
    print(f"CPU {cpu_model()}, {torch.get_num_threads()} threads, last-level cache {llc_text}, read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (sum over a {'64 MiB' if args.smoke else 'large'} fp32 tensor); distill CPU "
          f"kernels: {isa or 'not built (PyTorch fallback)'} (DISTILL_CPU_ISA={os.environ.get('DISTILL_CPU_ISA', '')!r}); "
          f"torch {torch.__version__}; {args.dtype}; memory budget for weight copies {budget / 2**30:.1f} GiB", flush=True)
    torch.manual_seed(0)
    rows, notes, timings = [], [load_note()] if load_note() else [], {}
    for n, k in shapes:
        shape_ms = [m for m in ms if not (args.smoke and m > DECODE_M and n * k > SMOKE_LARGE)]
        shape = CpuShape(n, k, dtype, llc, budget, args.smoke)
        if shape.note:
            notes.append(shape.note)
        shape_rows = measure_cpu_shape(shape, shape_ms, args, notes)
        rows += shape_rows
        timings[f"{n}x{k}"] = {row["m"]: {path: row["seconds"][path] for path in ("cpu_kernel", "cpu_unpack")
                                          if path in row["seconds"]} for row in shape_rows}
        del shape
    zeros = "the same half of the inputs in every row" if args.shared_zeros else "a random half of each row's inputs"
    print(f"\n2:4 linear vs dense on CPU: {cpu_model()}, {torch.get_num_threads()} threads, {args.dtype}, kernels "
          f"{isa}, torch {torch.__version__}, read bandwidth {bandwidth / 1e9:.1f} GB/s; ratio = dense time / "
          f"candidate time (>1 is faster); x50%: {zeros} zero\n")
    print("\n".join(cpu_ratio_table(rows)))
    print("\nBytes limit: dense weight bytes / the bytes a candidate reads (cpu_unpack: its layout, then the "
          "dense scratch written and read; x50%: only inputs zero in every row are skipped)\n")
    print("\n".join(cpu_bytes_table(rows)))
    for note in notes:
        print(f"\nnote: {note}")
    if args.write_table:
        label = f"cpu: {cpu_model()}, {isa}, {args.dtype}, {torch.get_num_threads()} threads"
        CrossoverTable.from_timings(label, timings, baseline="cpu_unpack").save(Path(args.write_table))
        print(f"\ncrossover table: {args.write_table}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": "cpu", "cpu": cpu_model(), "threads": torch.get_num_threads(), "isa": isa,
                       "dtype": args.dtype, "torch": torch.__version__, "read_bandwidth_bytes_s": bandwidth,
                       "last_level_cache_bytes": llc, "notes": notes, "rows": rows}, handle, indent=1)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        return cpu_main(args)
    if not torch.cuda.is_available():
        print("linear_2_4.py needs a CUDA GPU (or --device cpu); none is visible", file=sys.stderr)
        return 2

    # the GPU-side imports (here and in the helpers) come only after the check, so the refusal
    # above works without them
    from distill.runtime import CrossoverTable

    device_name = torch.cuda.get_device_name()
    shapes, ms = parse_grid(args)
    torch.manual_seed(0)  # before any weight or input is drawn, so every run times the same tensors
    rows, timings, best_tiles, layers_by_shape = [], {}, {}, {}
    for n, k in shapes:
        layers_by_shape[f"{n}x{k}"] = measure_shape(n, k, ms, rows, timings, best_tiles)

    # the dispatcher, with the crossover table from these very timings (5% margin towards dense)
    table = CrossoverTable.from_timings(device_name, timings, min_gain=1.05, tiles=best_tiles)
    time_dispatch(table, layers_by_shape, rows)
    write_results(args, table, device_name, rows)
    print_table(device_name, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
