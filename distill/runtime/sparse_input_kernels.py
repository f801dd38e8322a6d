"""Triton decode kernels (M <= 16) that skip the weights of zero inputs (activation sparsity).

At decode a projection is bound by the bytes of weight it reads. When a threshold has zeroed part
of the input (distill.sparsity.activations), the weight columns those inputs multiply need not be
read at all. Both kernels hold the weight K-major, so the weights of one input sit together in
memory and a zero input skips them in one contiguous run, as TEAL's kernel does.

  sparse_input_matmul     dense weight, K-major copy wt [K, N]: the row of every input that is zero
                          in all M rows of x is not loaded (a masked load reads no memory).
  sparse_input_matmul_24  2:4 weight, K-major copy of its kept values vt [K/2, N] (row 2g + j is
                          slot j of group g in every output row) and their positions pt [K/2, N]
                          (uint8, 0..3 in the group). A slot's input differs from one output row to
                          the next, so a row of vt can be skipped only when all 4 inputs of its
                          group are zero: the kernel skips whole groups. At 50% independent input
                          sparsity a group is all-zero with probability 1/16, so this saves ~6% of
                          the 2:4 bytes; per-input skipping needs a layout whose kept weights of one
                          input are contiguous, i.e. groups of 4 along the output dimension (see
                          docs/sparsity.md).

Each program computes y[:, n-tile] for all M rows (M padded to 16 for tl.dot) over the whole K, in
fp32 accumulation. Run them under Triton's CPU interpreter (TRITON_INTERPRET=1) to test on a CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DECODE_MAX_M = 16  # the kernels keep all M rows in one tile


@triton.jit
def _sparse_input_kernel(x_ptr, wt_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                         HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    rows_m = tl.arange(0, BLOCK_M)
    cols_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_m, in_n = rows_m < M, cols_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        in_k = ks < K
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        active = tl.max(tl.abs(x.to(tl.float32)), axis=0) != 0  # [BLOCK_K]: an input nonzero in some row
        w = tl.load(wt_ptr + ks[:, None] * N + cols_n[None, :], mask=(active & in_k)[:, None] & in_n[None, :], other=0.0)
        if DOT_IN_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_m[:, None] * stride_ym + cols_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _sparse_input_24_kernel(x_ptr, vt_ptr, pt_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                            HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_n = tl.program_id(0)
    rows_m = tl.arange(0, BLOCK_M)
    cols_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_m, in_n = rows_m < M, cols_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    groups = K // 4
    for g0 in range(0, groups, BLOCK_G):
        gs = (g0 + tl.arange(0, BLOCK_G)).to(tl.int64)
        in_g = gs < groups
        xmask = in_m[:, None] & in_g[None, :]
        # x_p[m, g] = x[m, 4g + p]: the inputs of position p of every group in the tile
        x0 = tl.load(x_ptr + rows_m[:, None] * stride_xm + (4 * gs)[None, :], mask=xmask, other=0.0)
        x1 = tl.load(x_ptr + rows_m[:, None] * stride_xm + (4 * gs + 1)[None, :], mask=xmask, other=0.0)
        x2 = tl.load(x_ptr + rows_m[:, None] * stride_xm + (4 * gs + 2)[None, :], mask=xmask, other=0.0)
        x3 = tl.load(x_ptr + rows_m[:, None] * stride_xm + (4 * gs + 3)[None, :], mask=xmask, other=0.0)
        size = tl.abs(x0.to(tl.float32)) + tl.abs(x1.to(tl.float32)) + tl.abs(x2.to(tl.float32)) + tl.abs(x3.to(tl.float32))
        active = tl.max(size, axis=0) != 0  # [BLOCK_G]: a group with a nonzero input in some row
        wmask = (active & in_g)[:, None] & in_n[None, :]
        v0 = tl.load(vt_ptr + (2 * gs)[:, None] * N + cols_n[None, :], mask=wmask, other=0.0).to(tl.float32)
        v1 = tl.load(vt_ptr + (2 * gs + 1)[:, None] * N + cols_n[None, :], mask=wmask, other=0.0).to(tl.float32)
        p0 = tl.load(pt_ptr + (2 * gs)[:, None] * N + cols_n[None, :], mask=wmask, other=0)
        p1 = tl.load(pt_ptr + (2 * gs + 1)[:, None] * N + cols_n[None, :], mask=wmask, other=0)
        # the dense weight of position p: w_p[g, n] = the kept value of group g whose position is p
        w0 = tl.where(p0 == 0, v0, 0.0) + tl.where(p1 == 0, v1, 0.0)
        w1 = tl.where(p0 == 1, v0, 0.0) + tl.where(p1 == 1, v1, 0.0)
        w2 = tl.where(p0 == 2, v0, 0.0) + tl.where(p1 == 2, v1, 0.0)
        w3 = tl.where(p0 == 3, v0, 0.0) + tl.where(p1 == 3, v1, 0.0)
        if DOT_IN_FP32:
            acc += tl.dot(x0.to(tl.float32), w0) + tl.dot(x1.to(tl.float32), w1)
            acc += tl.dot(x2.to(tl.float32), w2) + tl.dot(x3.to(tl.float32), w3)
        else:
            dtype = x0.dtype
            acc += tl.dot(x0, w0.to(dtype)) + tl.dot(x1, w1.to(dtype))
            acc += tl.dot(x2, w2.to(dtype)) + tl.dot(x3, w3.to(dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_m[:, None] * stride_ym + cols_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])


def k_major(weight: torch.Tensor) -> torch.Tensor:
    """The K-major copy wt [K, N] of a weight [N, K] that sparse_input_matmul reads."""
    return weight.t().contiguous()


def k_major_24(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-major copies (vt [K/2, N], pt [K/2, N] uint8) of a 2:4 weight's kept values [N, K/2]
    and their positions in each group [N, K/2] (distill.sparsity.packing.pack_nm's layout)."""
    return values.t().contiguous(), positions.to(torch.uint8).t().contiguous()


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    if x2.shape[0] > DECODE_MAX_M:
        raise ValueError(f"the sparse-input kernels serve decode (M <= {DECODE_MAX_M}), got M = {x2.shape[0]}")
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _output(x2: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    return out if out is not None else torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)


def sparse_input_matmul(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = 64,
                        block_k: int = 64, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T with W given K-major (wt [K, N]); the rows of wt whose input is zero in every
    row of x are not read. `out` ([M, N], contiguous) receives the result (tests poison it)."""
    k, n = wt.shape
    x2 = _rows(x, k)
    y = _output(x2, n, out)
    _sparse_input_kernel[(triton.cdiv(n, block_n),)](
        x2, wt, bias if bias is not None else wt, y, x2.shape[0], n, k, x2.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, DOT_IN_FP32=INTERPRETED or x2.dtype == torch.float32,
        BLOCK_M=DECODE_MAX_M, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], n)


def sparse_input_matmul_24(x: torch.Tensor, vt: torch.Tensor, pt: torch.Tensor, bias: torch.Tensor | None = None,
                           block_n: int = 64, block_g: int = 16, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T with the 2:4 weight W given K-major (vt, pt from `k_major_24`); the kept
    weights of groups whose 4 inputs are zero in every row of x are not read."""
    half, n = vt.shape
    k = 2 * half
    x2 = _rows(x, k)
    y = _output(x2, n, out)
    _sparse_input_24_kernel[(triton.cdiv(n, block_n),)](
        x2, vt, pt, bias if bias is not None else vt, y, x2.shape[0], n, k, x2.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, DOT_IN_FP32=INTERPRETED or x2.dtype == torch.float32,
        BLOCK_M=DECODE_MAX_M, BLOCK_N=block_n, BLOCK_G=block_g)
    return y.reshape(*x.shape[:-1], n)
