"""A Triton kernel for y = x @ W.T with W in the 2:4 layout of `distill.runtime.layout`.

Each program computes a [BLOCK_M, BLOCK_N] tile of y. For every K tile it reads only the kept
values and their 2-bit positions (9/16 of the dense bytes in bf16), rebuilds the dense
[BLOCK_N, BLOCK_K] weight tile in registers, and multiplies on tensor cores with tl.dot. Small M
(decode) is bandwidth-bound, so reading fewer bytes is the whole gain; M is padded to BLOCK_M >= 16
inside the tile, which costs compute that decode has to spare.

Split-K: at decode, M fits one tile, so a 4096-row weight with BLOCK_N = 32 gives only 128 programs,
fewer than an H100's 132 SMs, each streaming a whole row block: too few bytes in flight to reach
memory bandwidth. With SPLIT_K > 1 the K range is divided among SPLIT_K programs per output tile;
each writes an fp32 partial sum and one reduction adds them (deterministically, no atomics). Whether
that pays for its extra kernel is measured, not assumed: the split is one more dimension of the
tiles that benchmarks/linear_2_4.py sweeps.

The kernel is registered as the opaque custom op `torch.ops.distill.sparse24_mm` with a fake
(shape-only) implementation, so torch.compile keeps it in one graph without tracing into Triton, and
CUDA graphs (compile's "reduce-overhead" mode, which Hugging Face generate uses with a static KV
cache) capture its launch like any other kernel.

On a CPU machine, set TRITON_INTERPRET=1 before importing triton to run it in Triton's interpreter
(tests do this to check indexing and masking on small shapes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter computes tl.dot on bf16 wrongly (numpy has no bf16); there the product
# runs in fp32, the same indexing and masking around it. On a GPU the dot stays in bf16.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _sparse24_matmul_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_ym, stride_ysplit,
    HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # which slice of K (0 without split-K); y_ptr is its partial-sum slab
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # int64 rows: row * stride overflows int32 once a tensor holds 2^31 elements
    rows_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rows_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_m = rows_m < M
    in_n = rows_n < N
    KEPT: tl.constexpr = BLOCK_K // 2  # kept values per row of a K tile
    WORDS: tl.constexpr = BLOCK_K // 32  # int32 metadata words per row of a K tile
    GROUPS: tl.constexpr = BLOCK_K // 4
    kept = tl.arange(0, KEPT)
    words = tl.arange(0, WORDS)
    shifts = 2 * tl.arange(0, 16)
    positions = tl.arange(0, 4)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        values = tl.load(values_ptr + rows_n[:, None] * (K // 2) + (k0 // 2 + kept)[None, :],
                         mask=in_n[:, None], other=0.0)  # [BLOCK_N, KEPT]
        meta = tl.load(meta_ptr + rows_n[:, None] * (K // 32) + (k0 // 32 + words)[None, :],
                       mask=in_n[:, None], other=0)  # [BLOCK_N, WORDS]
        where = (meta[:, :, None] >> shifts[None, None, :]) & 3  # [BLOCK_N, WORDS, 16]
        where = tl.reshape(where, (BLOCK_N, GROUPS, 2))
        values = tl.reshape(values, (BLOCK_N, GROUPS, 2))
        # dense[n, g, p] = the kept value whose position is p, else 0
        dense = tl.sum(tl.where(where[:, :, :, None] == positions[None, None, None, :], values[:, :, :, None], 0.0), axis=2)
        weight = tl.reshape(dense, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
        columns = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + columns[None, :], mask=in_m[:, None], other=0.0)
        if DOT_IN_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(weight.to(tl.float32)))
        else:
            acc += tl.dot(x, tl.trans(weight))
    if HAS_BIAS and pid_k == 0:  # the bias joins one partial sum only
        acc += tl.load(bias_ptr + rows_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    y_ptr += pid_k.to(tl.int64) * stride_ysplit
    tl.store(y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k); a crossover table measured by
# benchmarks/linear_2_4.py carries the fastest per shape and M, and these defaults fill in otherwise.
# Shorter tuples (3 or 5 entries, as older tables hold) mean num_warps 4, num_stages 3, no split.
Tiles = tuple[int, int, int, int, int, int]


def block_sizes(m: int, k: int) -> Tiles:
    """Default tiles by problem size: decode-sized M gets the smallest M tile tl.dot allows."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_k = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
    return block_m, 64, block_k, 4, 3, 1


def candidate_tiles(m: int, k: int) -> list[Tiles]:
    """The tiles benchmarks/linear_2_4.py tries for M tokens and input size K: block shapes and
    pipeline depths for every M, and for decode-sized M (one M tile, too few programs to fill the
    GPU) also K split 2, 4 or 8 ways with a deeper K tile to keep more bytes in flight."""
    block_ms = [16] if m <= 16 else [16, 32] if m <= 32 else [32, 64] if m <= 64 else [64, 128]
    block_ks = [bk for bk in (64, 128) if k % bk == 0] or [32]
    tiles = [(bm, bn, bk, 4 if bm * bn <= 4096 else 8, stages, 1)
             for bm in block_ms for bn in (32, 64, 128) for bk in block_ks for stages in (3, 4)]
    if m <= 16:
        deep_ks = [bk for bk in (128, 256) if k % bk == 0] or block_ks
        tiles += [(16, bn, bk, 4, 4, split) for bn in (32, 64) for bk in deep_ks for split in (2, 4, 8)
                  if k // bk >= split]
    return tiles


def _full_tiles(tiles) -> Tiles:
    tiles = tuple(tiles)
    if len(tiles) == 3:
        tiles += (4, 3)
    return tiles + (1,) if len(tiles) == 5 else tiles


def _launch(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
            y: torch.Tensor, tiles) -> None:
    """y = x2 @ W.T (+ bias); with split-K the slices' fp32 partial sums are added into y."""
    m, k = x2.shape
    n = values.shape[0]
    block_m, block_n, block_k, num_warps, num_stages, split_k = _full_tiles(tiles)
    if k % block_k:
        raise ValueError(f"input size {k} is not a multiple of the K tile {block_k}")
    # whole K tiles per slice; a split larger than the number of K tiles leaves no slice empty
    k_tiles = k // block_k
    split_k = max(1, min(split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    partials = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=y.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _sparse24_matmul_kernel[grid](
        x2, values, meta, bias if bias is not None else values, partials,
        m, n, k, k_per_split, x2.stride(0), partials.stride(-2), partials.stride(0) if split_k > 1 else 0,
        HAS_BIAS=bias is not None, DOT_IN_FP32=INTERPRETED and x2.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    if split_k > 1:
        y.copy_(partials.sum(dim=0))


@torch.library.custom_op("distill::sparse24_mm", mutates_args=())
def sparse24_mm(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                tiles: list[int]) -> torch.Tensor:
    """x2 [M, K] (unit stride along K) @ W.T, as one opaque op for torch.compile."""
    y = torch.empty(x2.shape[0], values.shape[0], dtype=x2.dtype, device=x2.device)
    _launch(x2, values, meta, bias, y, tiles)
    return y


@sparse24_mm.register_fake
def _(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
      tiles: list[int]) -> torch.Tensor:
    return x2.new_empty(x2.shape[0], values.shape[0])


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                    tiles=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T for the 2:4 weight W given as (values [N, K/2], meta [N, K/32]).

    `tiles` (BLOCK_M, BLOCK_N, BLOCK_K[, num_warps, num_stages[, split_k]]) overrides `block_sizes`; `out`
    ([M, N], contiguous) receives the result (tests pass a poisoned one) and bypasses the custom op."""
    k = x.shape[-1]
    n = values.shape[0]
    if values.shape[1] * 2 != k or meta.shape[1] * 32 != k:
        raise ValueError(f"input size {k} does not match the 2:4 weight ({values.shape[1] * 2} inputs)")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tiles = _full_tiles(tiles) if tiles is not None else block_sizes(x2.shape[0], k)
    if out is None:
        y = sparse24_mm(x2, values, meta, bias, list(tiles))
    else:
        y = out
        _launch(x2, values, meta, bias, y, tiles)
    return y.reshape(*x.shape[:-1], n)
