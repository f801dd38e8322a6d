"""Which kernel runs a sparse projection for a given number of tokens M.

A crossover table is measured once per device (`benchmarks/linear_2_4.py --write-table`, with
`--device cpu` on a CPU): for each weight shape `NxK` (or `*`, any shape) it lists M ranges and the
path that was fastest there.

GPU paths: `triton`, `cusparselt`, `sparse_input`, `sparse_input_24`, and `dense` wherever no sparse
path beat dense, so a sparse model is never slower than the dense one. Without a table the GPU
takes `dense` (safe).
CPU paths: `cpu_kernel` (the decode kernels, M <= 16) and `cpu_unpack` (unpack the layer into a
scratch buffer, multiply with PyTorch's GEMM). Without a table, or for a shape or M a CPU table does
not cover, the CPU takes the shipped default table, `cpu_default_table.json`, measured to be safe on
AVX2-only and AVX512 CPUs (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from distill.errors import DistillError
from distill.io import write_json

GPU_PATHS = ("dense", "triton", "cusparselt", "sparse_input", "sparse_input_24")
CPU_PATHS = ("cpu_kernel", "cpu_unpack")
PATHS = GPU_PATHS + CPU_PATHS
# paths that serve decode only (their kernels keep all M rows in one tile)
DECODE_PATHS = ("sparse_input", "sparse_input_24", "cpu_kernel")
SPARSE_INPUT_PATHS = ("sparse_input", "sparse_input_24")
DECODE_MAX_M = 16
ANY_SHAPE = "*"
DEFAULT_CPU_TABLE = Path(__file__).with_name("cpu_default_table.json")


@dataclass
class CrossoverTable:
    device: str = ""
    # "NxK" or "*" -> [{"max_m": 16, "path": "triton"}, ..., {"max_m": null, "path": "cusparselt"}], ascending max_m
    shapes: dict[str, list[dict]] = field(default_factory=dict)

    def _ranges(self, n: int, k: int) -> list[dict]:
        return self.shapes.get(f"{n}x{k}") or self.shapes.get(ANY_SHAPE) or []

    def entry(self, n: int, k: int, m: int, on_gpu: bool = True) -> dict:
        """The table's entry for M tokens through an N x K weight: {"path", and for triton "tiles"};
        a path of the other kind of device, or none, gives that device's default."""
        for entry in self._ranges(n, k):
            if entry["max_m"] is None or m <= entry["max_m"]:
                if (entry["path"] in GPU_PATHS) == on_gpu:
                    return entry
                break
        if on_gpu:
            return {"path": "dense"}
        default = default_cpu_table()
        return self if default is self else default.entry(n, k, m, on_gpu=False)

    def choose(self, n: int, k: int, m: int, on_gpu: bool = True) -> str:
        return self.entry(n, k, m, on_gpu)["path"]

    def uses(self, n: int, k: int, path: str) -> bool:
        return any(entry["path"] == path for entry in self._ranges(n, k))

    def may_choose(self, n: int, k: int, path: str) -> bool:
        """Whether the GPU ever takes `path` for this shape (`dense` is also the default)."""
        ranges = self._ranges(n, k)
        return any(entry["path"] == path for entry in ranges) or (path == "dense" and not ranges)

    @classmethod
    def from_timings(cls, device: str, timings: dict[str, dict[int, dict[str, float]]], min_gain: float = 1.0,
                     tiles: dict[str, dict[int, list[int]]] | None = None, baseline: str = "dense") -> "CrossoverTable":
        """Build a table from {shape: {m: {path: seconds}}}: per M the fastest path, and `baseline`
        unless a sparse path is at least `min_gain` times faster than the baseline (on CPU the baseline
        is `cpu_unpack`, the dense product after unpacking); triton entries carry the fastest tiles
        measured for that M (`tiles`: {shape: {m: tiles}}). Neighbouring M with the same choice merge
        into one range; the last range is open-ended."""
        shapes = {}
        for shape, by_m in timings.items():
            ranges: list[dict] = []
            for m in sorted(by_m):
                times = {path: seconds for path, seconds in by_m[m].items() if path in PATHS}
                candidates = [path for path in times if path != baseline
                              and (path not in DECODE_PATHS or m <= DECODE_MAX_M)]
                best = min(candidates, key=times.get, default=baseline)
                path = best if best != baseline and times[baseline] / times[best] >= min_gain else baseline
                entry = {"max_m": m, "path": path}
                if path == "triton" and tiles and m in tiles.get(shape, {}):
                    entry["tiles"] = list(tiles[shape][m])
                if ranges and {**ranges[-1], "max_m": m} == entry:
                    ranges[-1]["max_m"] = m
                else:
                    ranges.append(entry)
            if ranges:
                ranges[-1]["max_m"] = None
                if ranges[-1]["path"] in DECODE_PATHS:  # beyond the measured M, a decode path cannot serve
                    ranges[-1]["max_m"] = min(max(by_m), DECODE_MAX_M)
                    ranges.append({"max_m": None, "path": baseline})
            shapes[shape] = ranges
        return cls(device=device, shapes=shapes)

    def save(self, path: Path) -> None:
        write_json(path, {"device": self.device, "shapes": self.shapes})

    @classmethod
    def load(cls, path: Path) -> "CrossoverTable":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DistillError(f"crossover table not found: {path}") from None
        except json.JSONDecodeError as error:
            raise DistillError(f"crossover table {path} is not valid JSON: {error.msg}") from None
        for shape, ranges in data.get("shapes", {}).items():
            for entry in ranges:
                if entry.get("path") not in PATHS:
                    raise DistillError(f"crossover table {path}: shape {shape} names unknown path {entry.get('path')!r}")
                max_m = entry.get("max_m")
                if entry["path"] in DECODE_PATHS and (max_m is None or max_m > DECODE_MAX_M):
                    raise DistillError(f"crossover table {path}: shape {shape} uses {entry['path']} up to M={max_m}; "
                                       f"that path serves decode only (M <= {DECODE_MAX_M})")
        return cls(device=data.get("device", ""), shapes=data.get("shapes", {}))


@lru_cache(maxsize=1)
def default_cpu_table() -> CrossoverTable:
    return CrossoverTable.load(DEFAULT_CPU_TABLE)
