"""The 2:4 inference runtime: load an exported student with its projections on sparse kernels.

    from distill.runtime import load_sparse_model
    model = load_sparse_model("runs/demo/export/packed", device="cuda", table="crossover.json")
    model.generate(input_ids, max_new_tokens=128, cache_implementation="static")

With `cache_implementation="static"` on CUDA, Hugging Face generate compiles the decode step in
torch.compile's "reduce-overhead" mode, i.e. replays it as a CUDA graph over a static KV cache; the
Triton kernel is an opaque custom op inside that graph and cuSPARSELt operands are built at load
time, so nothing in a decode step does host work beyond the graph launch. For prefill, compile the
forward the same way (`torch.compile(model.forward, mode="reduce-overhead")`), as
benchmarks/end_to_end.py does. On CPU every projection takes the exact reference path, so the runtime
is testable anywhere. A student with streaming heads generates with a StreamingCache, which holds
sink + window positions for those heads (the static cache does not know them: use the default).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill.sparsity.spec import read_sparsity_spec
from distill.sparsity.packing import load_packed
from distill.runtime.dispatch import CrossoverTable
from distill.runtime.kv_cache import StreamingCache, use_streaming_cache
from distill.runtime.linear import Sparse24Linear, sparsify
from distill.student import apply_runtime_sparsity

__all__ = ["CrossoverTable", "Sparse24Linear", "StreamingCache", "load_sparse_model", "sparsify"]


def load_sparse_model(packed_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      table: str | Path | CrossoverTable | None = None, allow_dense: bool = False) -> nn.Module:
    """The packed export as a Hugging Face model whose 2:4 projections are Sparse24Linear, with the
    input thresholds and streaming heads its spec names; streaming heads decode with a bounded KV
    cache (distill.runtime.kv_cache)."""
    spec = read_sparsity_spec(Path(packed_dir))
    if not spec.pattern.accelerated:
        raise ValueError(f"{packed_dir} is {spec.pattern.describe()} sparse; the runtime runs 2:4 only")
    if not isinstance(table, CrossoverTable):
        table = CrossoverTable.load(Path(table)) if table else CrossoverTable()
    model = load_packed(packed_dir, dtype=dtype).to(device).eval()
    sparsify(model, spec.masked, table, allow_dense=allow_dense)
    apply_runtime_sparsity(model, spec)  # small inputs become zero; streaming heads see sink + window
    if spec.streaming is not None:
        use_streaming_cache(model)
    if model.device.type == "cuda":
        for module in model.modules():
            if isinstance(module, Sparse24Linear):
                module.prepare_kernels()
    return model
