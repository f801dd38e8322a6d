"""The runtime's projections: each holds its weight once, in the layout its kernels read.

Sparse24Linear, a 2:4 projection:
  on CPU   one blocked layout (distill.runtime.cpu_layout): `grouped` (kept weights two per group of 4
           inputs, read as full vectors) for inputs that are rarely zero, `inputs` (input-major runs,
           one per input, that a zero input skips) for inputs an activation threshold zeroes. Decode
           (M up to 16) runs the CPU kernels on it; prefill (`cpu_unpack`) unpacks the layer into a
           scratch buffer shared by all projections and multiplies there, so no dense copy stays.
  on GPU   values + 2-bit positions (distill.runtime.layout) for the Triton kernel; cuSPARSELt
           (large M) builds its own compressed operand, and the `dense` path keeps the dense-with-
           zeros weight, each only where the crossover table picks it for the projection's shape.
SparseInputLinear, a dense projection whose input a threshold zeroes (CPU): its weight input-major
  (cpu_layout.pack_dense), whose rows of zero inputs the decode kernel does not read.

On CPU both apply their input threshold (distill.sparsity.activations, `input_threshold`) themselves:
the decode kernels zero the small inputs as they read them, where a forward pre-hook would run three
more PyTorch ops per projection and token.

Which path runs is the crossover table's choice per shape and M (distill.runtime.dispatch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.runtime import cpu_kernels, cpu_layout
from distill.runtime.dispatch import CrossoverTable
from distill.runtime.layout import check_2_4_weight, compress_2_4, decompress_2_4, positions_2_4
from distill.sparsity.packing import pack_nm, unpack_nm
from distill.targets import replace_module

GROUPED, INPUTS, GPU = "grouped", "inputs", "gpu"  # Sparse24Linear's storage layouts


class ScratchBuffer:
    """One growing buffer per dtype that prefill unpacks a projection's weight into: the layers run one
    after another, so one layer's dense weight at a time is ever resident."""

    def __init__(self):
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def matrix(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < rows * cols:
            buffer = self._buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
        return buffer[: rows * cols].view(rows, cols)

    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())


SCRATCH = ScratchBuffer()


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def input_threshold(module: nn.Module, x: torch.Tensor) -> float:
    """The magnitude below which `module`'s inputs become zero, in x's dtype as InputThreshold compares
    (0: none installed)."""
    threshold = getattr(module, "input_threshold", None)
    return float(threshold.threshold.to(x.dtype)) if threshold is not None else 0.0


def _thresholded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    threshold = getattr(module, "input_threshold", None)
    return threshold(x) if threshold is not None else x


def _prefill(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ wt [K, N] (+ bias) in wt's dtype, back in x's."""
    x2 = x.reshape(-1, x.shape[-1]).to(wt.dtype)
    y = torch.addmm(bias.to(wt.dtype), x2, wt) if bias is not None else x2 @ wt
    return y.to(x.dtype).reshape(*x.shape[:-1], wt.shape[1])


class Sparse24Linear(nn.Module):
    """A 2:4 projection (module docstring). Build it from the packed form (`pack_nm`'s kept values and
    their positions), or from a dense-with-zeros weight with `from_dense`; its device is theirs."""

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None, name: str,
                 table: CrossoverTable, sparse_inputs: bool = False, keep_dense: bool | None = None,
                 layout: str | None = None):
        super().__init__()
        self.name = name
        self.table = table
        self.out_features, half = values.shape
        self.in_features = 2 * half
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        # the layout follows the device; `layout="gpu"` on CPU tensors runs the GPU paths in Triton's
        # CPU interpreter (TRITON_INTERPRET=1), as the tests of those kernels do
        self.layout = layout or ((INPUTS if sparse_inputs else GROUPED) if values.device.type == "cpu" else GPU)
        self.applies_input_threshold = self.layout != GPU  # the CPU kernels threshold as they read
        self._semi_structured = None
        self._k_major: tuple[torch.Tensor, ...] | None = None
        if self.layout == GROUPED:
            codes, blocked, self.block = cpu_layout.pack_grouped_24(values, positions)
            self.register_buffer("codes", codes)
            self.register_buffer("values", blocked)
        elif self.layout == INPUTS:
            masks, blocked, self.block = cpu_layout.pack_24(values, positions)
            self.register_buffer("masks", masks)
            self.register_buffer("values", blocked)
        else:
            weight = unpack_nm(values, positions, 2, 4)
            kept_values, meta = compress_2_4(weight, name)
            self.register_buffer("values", kept_values)
            self.register_buffer("meta", meta)
            # the dense-with-zeros weight backs the `dense` path: kept where the table may pick it
            if keep_dense is None:
                keep_dense = table.may_choose(self.out_features, self.in_features, "dense")
            self.register_buffer("dense_weight", weight if keep_dense else None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, name: str, table: CrossoverTable | None = None,
                   sparse_inputs: bool = False, keep_dense: bool | None = None, layout: str | None = None) -> "Sparse24Linear":
        """From a dense-with-zeros 2:4 weight [N, K]; a DistillError names a weight that is not 2:4."""
        on_cpu = weight.device.type == "cpu" and layout != GPU
        mask = check_2_4_weight(weight, name, input_multiple=4 if on_cpu else 32)
        values, positions = pack_nm(weight.detach(), mask, 2, 4)
        return cls(values, positions, bias, name, table or CrossoverTable(), sparse_inputs, keep_dense, layout)

    def extra_repr(self) -> str:
        return f"{self.name}: in_features={self.in_features}, out_features={self.out_features}, 2:4, {self.layout}"

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """pack_nm's (kept values [N, K/2], positions [N, K/2] uint8), from whichever layout holds them."""
        n = self.out_features
        if self.layout == GROUPED:
            return cpu_layout.grouped_slots(self.codes, self.values, n)
        if self.layout == INPUTS:
            return cpu_layout.positions_24(self.masks, self.values, n)
        return self.values, positions_2_4(self.meta)

    def weight_dense(self) -> torch.Tensor:
        """The dense-with-zeros weight [N, K], built anew (except on GPU where the `dense` path keeps it)."""
        if self.layout == GROUPED:
            return cpu_layout.unpack_grouped_24(self.codes, self.values, self.out_features)
        if self.layout == INPUTS:
            return cpu_layout.unpack_24(self.masks, self.values, self.out_features)
        return self.dense_weight if self.dense_weight is not None else decompress_2_4(self.values, self.meta)

    def resident_bytes(self) -> int:
        """Bytes this projection holds: its layout and bias (and on GPU what its paths keep beside)."""
        held = sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())
        extra = list(self._k_major or ())
        if self._semi_structured is not None:
            extra += [self._semi_structured.packed] + ([self._semi_structured.meta] if hasattr(self._semi_structured, "meta") else [])
        return held + sum(tensor.numel() * tensor.element_size() for tensor in extra if tensor is not None)

    def prepare_kernels(self) -> None:
        """GPU: build the operands the table's sparse-input and cuSPARSELt paths read, ahead of time, so
        no forward does setup work (and torch.compile / CUDA graphs see a steady forward)."""
        if self.layout != GPU:
            return
        shape = (self.out_features, self.in_features)
        if self._k_major is None and self.table.uses(*shape, "sparse_input"):
            from distill.runtime.sparse_input_kernels import k_major

            self._k_major = (k_major(self.weight_dense()),)
        elif self._k_major is None and self.table.uses(*shape, "sparse_input_24"):
            from distill.runtime.sparse_input_kernels import k_major_24

            self._k_major = k_major_24(self.values, positions_2_4(self.meta))
        if self._semi_structured is None and self.table.uses(*shape, "cusparselt"):
            from torch.sparse import to_sparse_semi_structured

            try:
                self._semi_structured = to_sparse_semi_structured(self.weight_dense())
            except (RuntimeError, ValueError) as error:  # shapes or dtypes cuSPARSELt does not take
                raise DistillError(f"{self.name}: cuSPARSELt cannot take this {self.out_features}x{self.in_features} "
                                   f"{self.values.dtype} weight ({str(error).splitlines()[0]}); remove the shape's "
                                   f"cusparselt entries from the crossover table") from None

    def kernel_entry(self, x: torch.Tensor) -> dict:
        """The crossover table's entry for input `x`: its `path` is the kernel the forward runs on `x`."""
        return self.table.entry(self.out_features, self.in_features, _rows(x), on_gpu=self.layout == GPU)

    def kernel_path(self, x: torch.Tensor) -> str:
        """Which kernel path the forward takes for input `x` (the module docstring lists them)."""
        return self.kernel_entry(x)["path"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.kernel_entry(x)
        path = entry["path"]
        n, k = self.out_features, self.in_features
        if self.layout != GPU:
            if path == "cpu_kernel":
                threshold = input_threshold(self, x)
                if self.layout == GROUPED:
                    return cpu_kernels.grouped24_matmul(x, self.codes, self.values, self.bias, n, self.block, threshold)
                return cpu_kernels.sparse24_matmul(x, self.masks, self.values, self.bias, n, self.block, threshold)
            wt = SCRATCH.matrix(k, n, self.values.dtype)
            if self.layout == GROUPED:
                cpu_kernels.unpack_grouped24_kmajor(self.codes, self.values, n, self.block, k, out=wt)
            else:
                cpu_kernels.unpack_24_kmajor(self.masks, self.values, n, self.block, k, out=wt)
            return _prefill(_thresholded(self, x), wt, self.bias)
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
        return F.linear(x, self.weight_dense(), self.bias)


class SparseInputLinear(nn.Module):
    """A dense projection whose input a threshold zeroes, on CPU: the weight input-major
    (cpu_layout.pack_dense), so that decode reads only the weights of non-zero inputs."""

    applies_input_threshold = True  # its kernel thresholds as it reads

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str, table: CrossoverTable):
        super().__init__()
        self.name = name
        self.table = table
        self.out_features, self.in_features = weight.shape
        values, self.block = cpu_layout.pack_dense(weight)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    def extra_repr(self) -> str:
        return f"{self.name}: in_features={self.in_features}, out_features={self.out_features}, input-major"

    def weight_dense(self) -> torch.Tensor:
        return cpu_layout.unpack_dense(self.values, self.out_features)

    def resident_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def kernel_path(self, x: torch.Tensor) -> str:
        return self.table.entry(self.out_features, self.in_features, _rows(x), on_gpu=False)["path"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.kernel_path(x) == "cpu_kernel":
            return cpu_kernels.dense_matmul(x, self.values, self.bias, n, self.block, input_threshold(self, x))
        wt = SCRATCH.matrix(k, n, self.values.dtype)
        blocks, _, block = self.values.shape
        # wt [K, N]: the blocks side by side, the last one cut to the real outputs
        for index in range(blocks):
            first = index * block
            width = min(block, n - first)
            wt[:, first:first + width].copy_(self.values[index, :, :width])
        return _prefill(_thresholded(self, x), wt, self.bias)


def sparsify(model: nn.Module, names: list[str], table: CrossoverTable | None = None, allow_dense: bool = False,
             sparse_inputs: frozenset[str] | set[str] = frozenset(), keep_dense: bool | None = None,
             layout: str | None = None) -> dict[str, str]:
    """Replace each named nn.Linear (dense with zeros, 2:4) by a Sparse24Linear, in place; those in
    `sparse_inputs` (their input is thresholded) take the input-major layout on CPU; `layout` forces
    one (Sparse24Linear).

    A projection that cannot run on the 2:4 kernels (not 2:4, unsupported dtype or shape) raises a
    DistillError naming it, or stays dense when `allow_dense`; returns {name: why it stayed dense}.
    """
    table = table or CrossoverTable()
    kept_dense = {}
    for name in names:
        linear = model.get_submodule(name)
        try:
            sparse = Sparse24Linear.from_dense(linear.weight, linear.bias, name, table,
                                               sparse_inputs=name in sparse_inputs, keep_dense=keep_dense, layout=layout)
        except DistillError as error:
            if not allow_dense:
                raise
            kept_dense[name] = str(error)
            continue
        replace_module(model, name, sparse)
    return kept_dense
