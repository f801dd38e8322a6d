"""The CPU kernels (csrc/cpu_kernels.cpp), compiled on first use for this machine's vector unit.

    y = grouped24_matmul(x, codes, values, bias, n, block)  # 2:4 weight, grouped layout
    y = sparse24_matmul(x, masks, values, bias, n, block)   # 2:4 weight, input-major layout
    y = dense_matmul(x, values, bias, n, block)             # dense weight, input-major layout
    wt = unpack_24_kmajor(masks, values, n, block, k)       # the 2:4 weight dense, [K, N], for prefill

The decode kernels take M = 1 to 16 rows and never read the weights of inputs that are zero in
every row. With `threshold=t` they first zero the inputs below t in magnitude, as they read them
(x * (|x| >= t), the activation threshold), so a thresholded projection needs no separate pass.
They are built with torch.utils.cpp_extension for the widest vector unit PyTorch itself uses here
(`torch.backends.cpu.get_cpu_capability()`: AVX512, AVX2 or neither; ATEN_CPU_CAPABILITY caps both,
DISTILL_CPU_ISA=avx2|portable caps ours alone, to measure a narrower CPU on a wide one). The build
is cached per ISA in torch's extensions dir and takes ~20 s once. Where no compiler is found the
build fails with one printed line and the same products run in plain PyTorch: exact, but without
the speed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.runtime.cpu_layout import unpack_24, unpack_dense, unpack_grouped_24

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mpopcnt"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mpopcnt"],
    "portable": [],
}
_built: dict[str, bool] = {}


def target_isa() -> str:
    """The vector unit the kernels are built for: the narrower of PyTorch's and DISTILL_CPU_ISA."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    isa = "avx512" if capability.startswith("avx512") else "avx2" if capability == "avx2" else "portable"
    cap = os.environ.get("DISTILL_CPU_ISA", "").lower()
    if cap and cap not in ISA_FLAGS:
        raise ValueError(f"DISTILL_CPU_ISA={cap!r}: expected one of {', '.join(ISA_FLAGS)}")
    order = list(ISA_FLAGS)  # widest first
    return max(isa, cap, key=order.index) if cap else isa


def available() -> bool:
    """Whether the compiled kernels are loaded (built now if need be); False after a failed build."""
    isa = target_isa()
    if isa not in _built:
        _built[isa] = _build(isa)
    return _built[isa]


def loaded_isa() -> str | None:
    """The ISA of the loaded kernels (as compiled), or None."""
    return _ops().isa() if available() else None


def _namespace(isa: str) -> str:
    return f"distill_cpu_{isa}"


def _ops():
    return getattr(torch.ops, _namespace(target_isa()))


def _build(isa: str) -> bool:
    from torch.utils.cpp_extension import load

    try:
        # -fopenmp: at::parallel_for is a header template that runs in parallel only where OpenMP is
        # compiled in; the libgomp it links is the one torch has already loaded (same soname)
        load(name=f"distill_cpu_kernels_{isa}", sources=[str(SOURCE)], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-fopenmp", f"-DDISTILL_NAMESPACE={_namespace(isa)}", *ISA_FLAGS[isa]],
             extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, a failed build: the PyTorch products stand in
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        print(f"distill: CPU sparse kernels unavailable ({reason[:200]}); running the plain PyTorch products "
              "(exact, not faster)", file=sys.stderr)
        return False
    return True


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def _matmul(kernel: str, unpack, x: torch.Tensor, layout: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
            n: int, block: int, threshold: float) -> torch.Tensor:
    """(x [..., K] with entries below `threshold` in magnitude zeroed) @ W.T (+ bias) by the compiled
    `kernel` on W's `layout` tensors, or by F.linear on `unpack(*layout, n)` where the kernels could
    not be built."""
    x2 = _rows(x)
    if available():
        y = getattr(_ops(), kernel)(x2, *layout, bias, n, block, threshold)
    else:
        if threshold > 0:
            x2 = x2 * (x2.abs() >= threshold)
        y = F.linear(x2, unpack(*layout, n).to(x2.dtype), bias)
    return y.reshape(*x.shape[:-1], n)


def _unpack_kmajor(kernel: str, unpack, layout: tuple[torch.Tensor, ...], n: int, block: int, k: int,
                   out: torch.Tensor | None) -> torch.Tensor:
    """W dense and K-major, wt [K, N] in the values' dtype (into `out` when given), by the compiled
    `kernel` or by `unpack(*layout, n)`."""
    if out is None:
        out = torch.empty(k, n, dtype=layout[-1].dtype)
    if available():
        getattr(_ops(), kernel)(*layout, n, block, out)
    else:
        out.copy_(unpack(*layout, n).t())
    return out


def sparse24_matmul(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                    n: int, block: int, threshold: float = 0.0) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for a 2:4 weight in the input-major layout; M <= 16 rows."""
    return _matmul("sparse24_matmul", unpack_24, x, (masks, values), bias, n, block, threshold)


def dense_matmul(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, n: int, block: int,
                 threshold: float = 0.0) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for a dense weight in the input-major layout; M <= 16 rows."""
    return _matmul("dense_matmul", unpack_dense, x, (values,), bias, n, block, threshold)


def grouped24_matmul(x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                     n: int, block: int, threshold: float = 0.0) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for a 2:4 weight in the grouped layout; M <= 16 rows."""
    return _matmul("grouped24_matmul", unpack_grouped_24, x, (codes, values), bias, n, block, threshold)


def unpack_24_kmajor(masks: torch.Tensor, values: torch.Tensor, n: int, block: int, k: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The input-major 2:4 weight dense and K-major, wt [K, N], for prefill."""
    return _unpack_kmajor("sparse24_unpack", unpack_24, (masks, values), n, block, k, out)


def unpack_grouped24_kmajor(codes: torch.Tensor, values: torch.Tensor, n: int, block: int, k: int,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """The grouped 2:4 weight dense and K-major, wt [K, N], for prefill."""
    return _unpack_kmajor("grouped24_unpack", unpack_grouped_24, (codes, values), n, block, k, out)
