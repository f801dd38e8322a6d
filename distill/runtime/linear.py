"""Sparse24Linear: a 2:4 projection that runs on the kernel the dispatcher picks for its M.

Paths: `triton` (our kernel on the compressed layout; decode-sized M), `cusparselt` (PyTorch's
semi-structured sparse tensor; large M; capture the forward in a CUDA graph to remove its per-call
host cost), `dense` (cuBLAS on the dense-with-zeros weight, where sparse would lose), `reference`
(CPU: the exact dense-with-zeros product), and at decode, for inputs that activation thresholds
made sparse, `sparse_input` / `sparse_input_24` (K-major copies of the dense / 2:4 weight, whose
rows of zero inputs are not read; distill.runtime.sparse_input_kernels).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.runtime.dispatch import CrossoverTable
from distill.targets import replace_module
from distill.runtime.layout import check_2_4_weight, compress_2_4, decompress_2_4, positions_2_4

# under Triton's CPU interpreter (tests), CPU tensors may take the table's kernel paths too
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class Sparse24Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str, table: CrossoverTable,
                 keep_dense: bool = True):
        super().__init__()
        self.name = name
        self.out_features, self.in_features = weight.shape
        values, meta = compress_2_4(weight.detach(), name)
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        # the dense-with-zeros weight backs the `dense` fallback; drop it to save memory when the
        # crossover table never picks dense for this shape
        self.register_buffer("dense_weight", weight.detach().clone() if keep_dense else None)
        self.table = table
        self._semi_structured = None
        self._k_major: tuple[torch.Tensor, ...] | None = None  # built when the table picks a sparse-input path

    def extra_repr(self) -> str:
        return f"{self.name}: in_features={self.in_features}, out_features={self.out_features}, 2:4"

    def weight_dense(self) -> torch.Tensor:
        return self.dense_weight if self.dense_weight is not None else decompress_2_4(self.values, self.meta)

    def prepare_kernels(self) -> None:
        """Build the cuSPARSELt operand ahead of time if the table ever picks it for this shape, so
        no forward does setup work (and torch.compile / CUDA graphs see a steady forward)."""
        shape = (self.out_features, self.in_features)
        if self._k_major is None and self.table.uses(*shape, "sparse_input"):
            from distill.runtime.sparse_input_kernels import k_major

            self._k_major = (k_major(self.weight_dense()),)
        elif self._k_major is None and self.table.uses(*shape, "sparse_input_24"):
            from distill.runtime.sparse_input_kernels import k_major_24

            self._k_major = k_major_24(self.values, positions_2_4(self.meta))
        if self._semi_structured is None and self.table.uses(self.out_features, self.in_features, "cusparselt"):
            from torch.sparse import to_sparse_semi_structured

            try:
                self._semi_structured = to_sparse_semi_structured(self.weight_dense())
            except (RuntimeError, ValueError) as error:  # shapes or dtypes cuSPARSELt does not take
                raise DistillError(f"{self.name}: cuSPARSELt cannot take this {self.out_features}x{self.in_features} "
                                   f"{self.values.dtype} weight ({str(error).splitlines()[0]}); remove the shape's "
                                   f"cusparselt entries from the crossover table") from None

    def kernel_entry(self, x: torch.Tensor) -> dict:
        """The crossover table's entry for input `x`: its `path` is the kernel the forward runs on `x`."""
        m = x.numel() // self.in_features
        return self.table.entry(self.out_features, self.in_features, m, on_gpu=x.is_cuda or INTERPRETED)

    def kernel_path(self, x: torch.Tensor) -> str:
        """Which kernel path the forward takes for input `x` (the module docstring lists them)."""
        return self.kernel_entry(x)["path"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.kernel_entry(x)
        path = entry["path"]
        if path == "triton":
            from distill.runtime.triton_kernels import sparse24_matmul

            return sparse24_matmul(x, self.values, self.meta, self.bias, tiles=entry.get("tiles"))
        if path == "cusparselt":
            self.prepare_kernels()
            return F.linear(x, self._semi_structured, self.bias)
        if path in ("sparse_input", "sparse_input_24"):
            from distill.runtime.sparse_input_kernels import sparse_input_matmul, sparse_input_matmul_24

            self.prepare_kernels()
            kernel = sparse_input_matmul if path == "sparse_input" else sparse_input_matmul_24
            return kernel(x, *self._k_major, self.bias)
        if path == "dense" and self.dense_weight is None:
            raise DistillError(f"{self.name}: the crossover table picks dense for M={x.numel() // self.in_features} "
                               "but the dense weight was dropped")
        return F.linear(x, self.weight_dense(), self.bias)


def sparsify(model: nn.Module, names: list[str], table: CrossoverTable | None = None, allow_dense: bool = False,
             keep_dense: bool = True) -> dict[str, str]:
    """Replace each named nn.Linear (dense with zeros, 2:4) by a Sparse24Linear, in place.

    A projection that cannot run on the 2:4 kernels (not 2:4, unsupported dtype or shape) raises a
    DistillError naming it, or stays dense when `allow_dense`; returns {name: why it stayed dense}.
    """
    table = table or CrossoverTable()
    kept_dense = {}
    for name in names:
        linear = model.get_submodule(name)
        try:
            check_2_4_weight(linear.weight, name)
        except DistillError as error:
            if not allow_dense:
                raise
            kept_dense[name] = str(error)
            continue
        sparse = Sparse24Linear(linear.weight, linear.bias, name, table, keep_dense=keep_dense)
        replace_module(model, name, sparse)
    return kept_dense
