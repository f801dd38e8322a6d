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
reference, table last. Needs CUDA; prints why and exits 2 without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="out x in, comma separated")
    return parser.parse_args(argv)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("linear_2_4.py needs a CUDA GPU; none is visible", file=sys.stderr)
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
