"""The 2:4 layout our Triton kernel reads: kept values plus 2-bit positions packed in int32 words.

For a 2:4 weight W of shape [N, K] (every group of 4 consecutive inputs keeps 2):
  values  [N, K/2]   W's dtype: the kept weights of each group, in ascending position
  meta    [N, K/32]  int32: 16 two-bit positions per word; bits 2j..2j+1 of meta[n, w] hold the
                     position (0..3) inside its group of kept value values[n, 16*w + j]
In bf16 that is 2 bytes per kept weight plus 2 bits, 9/16 of the dense bytes: the bandwidth
limit of decode (M <= 16) is about 16/9 = 1.78x dense.
"""

from __future__ import annotations

import torch

from distill.errors import DistillError
from distill.sparsity.packing import full_groups_mask, pack_nm, unpack_nm

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
META_VALUES_PER_WORD = 16


def check_2_4_weight(weight: torch.Tensor, name: str = "weight", input_multiple: int = 32) -> torch.Tensor:
    """The boolean mask of a 2:4 weight, or a DistillError naming the layer and the problem. The GPU
    layout packs 16 positions per int32 word, so its input size must be a multiple of 32; the CPU
    layouts need whole groups of 4 (`input_multiple=4`)."""
    if weight.dim() != 2:
        raise DistillError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise DistillError(f"{name}: dtype {weight.dtype} is not supported (use float16, bfloat16 or float32)")
    rows, cols = weight.shape
    if cols % input_multiple:
        raise DistillError(f"{name}: input size {cols} is not a multiple of {input_multiple}, which the 2:4 kernels need")
    return full_groups_mask(weight != 0, 2, 4, name)


def compress_2_4(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of a dense-with-zeros 2:4 weight."""
    mask = check_2_4_weight(weight, name)
    values, positions = pack_nm(weight, mask, 2, 4)
    rows = weight.shape[0]
    positions = positions.to(torch.int64).reshape(rows, -1, META_VALUES_PER_WORD)
    shifts = 2 * torch.arange(META_VALUES_PER_WORD, device=weight.device)
    words = (positions << shifts).sum(-1)  # < 2**32, fits int64
    meta = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed int32
    return values, meta.contiguous()


def positions_2_4(meta: torch.Tensor) -> torch.Tensor:
    """The position (0..3) inside its group of every kept value, [N, K/2] uint8, from the packed meta."""
    shifts = 2 * torch.arange(META_VALUES_PER_WORD, device=meta.device)
    positions = (meta.to(torch.int64)[..., None] >> shifts) & 3
    return positions.reshape(meta.shape[0], -1).to(torch.uint8)


def decompress_2_4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense-with-zeros weight back from (values, meta): the exact reference."""
    return unpack_nm(values, positions_2_4(meta), 2, 4)
