"""Which kernel runs a 2:4 projection for a given number of tokens M.

A crossover table is measured once per device (`benchmarks/linear_2_4.py --write-table`): for each
weight shape it lists M ranges and the path that was fastest there, and names `dense` wherever no
sparse path beat dense, so a sparse model is never slower than the dense one. Without a table the
dispatcher chooses `dense` on GPU (safe) and the exact `reference` path on CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.io import write_json

PATHS = ("dense", "triton", "cusparselt", "reference", "sparse_input", "sparse_input_24")
# paths that skip the weights of zero inputs (distill.runtime.sparse_input_kernels): decode sizes only
SPARSE_INPUT_PATHS = ("sparse_input", "sparse_input_24")
DECODE_MAX_M = 16


@dataclass
class CrossoverTable:
    device: str = ""
    # "NxK" -> [{"max_m": 16, "path": "triton"}, ..., {"max_m": null, "path": "cusparselt"}], ascending max_m
    shapes: dict[str, list[dict]] = field(default_factory=dict)

    def entry(self, n: int, k: int, m: int, on_gpu: bool = True) -> dict:
        """The table's entry for M tokens through an N x K weight: {"path", and for triton "tiles"}."""
        if not on_gpu:
            return {"path": "reference"}
        for entry in self.shapes.get(f"{n}x{k}", []):
            if entry["max_m"] is None or m <= entry["max_m"]:
                return entry
        return {"path": "dense"}

    def choose(self, n: int, k: int, m: int, on_gpu: bool = True) -> str:
        return self.entry(n, k, m, on_gpu)["path"]

    def uses(self, n: int, k: int, path: str) -> bool:
        return any(entry["path"] == path for entry in self.shapes.get(f"{n}x{k}", []))

    @classmethod
    def from_timings(cls, device: str, timings: dict[str, dict[int, dict[str, float]]], min_gain: float = 1.0,
                     tiles: dict[str, dict[int, list[int]]] | None = None) -> "CrossoverTable":
        """Build a table from {shape: {m: {path: seconds}}}: per M the fastest path, and dense
        unless a sparse path is at least `min_gain` times faster than dense; triton entries carry
        the fastest tiles measured for that M (`tiles`: {shape: {m: tiles}}). Neighbouring M with
        the same choice merge into one range; the last range is open-ended."""
        shapes = {}
        for shape, by_m in timings.items():
            ranges: list[dict] = []
            for m in sorted(by_m):
                times = by_m[m]
                candidates = [path for path in times if path != "dense"
                              and (path not in SPARSE_INPUT_PATHS or m <= DECODE_MAX_M)]
                best = min(candidates, key=times.get, default="dense")
                path = best if best != "dense" and times["dense"] / times[best] >= min_gain else "dense"
                entry = {"max_m": m, "path": path}
                if path == "triton" and tiles and m in tiles.get(shape, {}):
                    entry["tiles"] = list(tiles[shape][m])
                if ranges and {**ranges[-1], "max_m": m} == entry:
                    ranges[-1]["max_m"] = m
                else:
                    ranges.append(entry)
            if ranges:
                ranges[-1]["max_m"] = None
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
                if entry["path"] in SPARSE_INPUT_PATHS and (max_m is None or max_m > DECODE_MAX_M):
                    raise DistillError(f"crossover table {path}: shape {shape} uses {entry['path']} up to M={max_m}; "
                                       f"the sparse-input kernels serve decode only (M <= {DECODE_MAX_M})")
        return cls(device=data.get("device", ""), shapes=data.get("shapes", {}))
