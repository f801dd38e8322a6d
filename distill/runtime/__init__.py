"""The sparse inference runtime: load an exported student with its projections on sparse kernels.

    from distill.runtime import load_sparse_model
    model = load_sparse_model("runs/demo/export/packed")                       # CPU
    model = load_sparse_model("runs/demo/export/packed", device="cuda", table="crossover.json")
    model.generate(input_ids, max_new_tokens=128)

On CPU each 2:4 projection is held once, compressed, in the blocked layout its kernels read
(distill.runtime.cpu_layout); decode (up to 16 tokens at a time) runs distill's CPU kernels, which
read ~17/32 of the dense bytes in fp32 and skip the weights of inputs a threshold zeroed; prefill
unpacks one layer at a time into a shared scratch buffer. On CUDA with `cache_implementation="static"`,
Hugging Face generate compiles the decode step in torch.compile's "reduce-overhead" mode (a CUDA graph
over a static KV cache); the Triton kernel is an opaque custom op inside that graph and cuSPARSELt
operands are built at load time. A student with streaming heads generates with a StreamingCache,
which holds sink + window positions for those heads.
"""

from __future__ import annotations

from distill.runtime.dispatch import CrossoverTable
from distill.runtime.kv_cache import StreamingCache, use_streaming_cache
from distill.runtime.linear import Sparse24Linear, SparseInputLinear, sparsify
from distill.runtime.loading import load_sparse_model, runtime_projection

__all__ = ["CrossoverTable", "Sparse24Linear", "SparseInputLinear", "StreamingCache", "load_sparse_model",
           "runtime_projection", "sparsify", "use_streaming_cache"]
