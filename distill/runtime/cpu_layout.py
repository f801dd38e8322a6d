"""The blocked K-major layouts the CPU kernels read (distill/runtime/csrc/cpu_kernels.cpp).

At decode a projection is bound by the bytes of weight it reads, and a zero input (activation
sparsity) needs none of the weights it multiplies. Both layouts therefore store a weight W [N, K]
input by input inside blocks of `block` consecutive outputs (up to 1024), so the weights of one
input are one contiguous run (1024 outputs: 4 KiB of dense fp32) that a zero input skips whole:

  dense   values [NB, K, block]        every weight
  2:4     masks  [NB, K, block / 16]   int16 words: bit j of masks[b, k, w] says output
                                       b * block + 16 w + j keeps input k
          values [K/2 * N + 16]        the kept weights, block by block, input by input, in output
                                       order (16 trailing zeros: the kernels load 16 at a time)

A 2:4 weight costs 1 bit per weight plus its kept half: 17/32 of the dense bytes in fp32, 9/16 in
bf16, the same as values + 2-bit positions. N is padded to whole blocks (`block_width`); padded
outputs keep nothing. These layouts are the storage of a CPU projection, not a copy beside it.
"""

from __future__ import annotations

import torch

LANES = 16  # outputs per mask word
# the grouped layout reads whole groups, so its blocks need not be long; short ones measured faster
# (fp32, M = 1: 64 outputs 3.08x dense against 2.93x for 256 on 14336x4096, 3.39x against 3.18x on 576x576)
GROUPED_BLOCK = 64
# input-major layouts: a zero input skips one run per block; longer runs skip better (at half the
# inputs zero, 1024-output blocks measured 2.00x dense against 1.90x for 256 on a 14336x4096 2:4 weight)
INPUT_MAJOR_BLOCK = 1024
VALUE_PAD = LANES


def padded_outputs(n: int) -> int:
    return -(-n // LANES) * LANES


def block_width(n: int, widest: int) -> int:
    """The block (a multiple of 16, at most `widest` outputs) for N outputs: N rounded up to 16 when
    that fits, else the widest divisor of it from `widest` / 2 up, else an even split whose last block
    is padded (fewer than 16 outputs per block). Any multiple of 16 serves, not only powers of 2: a
    576-output projection is one block of 576, not nine of 64 whose 256-byte runs a zero input would
    skip one by one."""
    padded = padded_outputs(n)
    if padded <= widest:
        return padded
    divisor = next(width for width in range(widest, 0, -LANES) if padded % width == 0)
    if 2 * divisor >= widest:
        return divisor
    return padded_outputs(-(-padded // -(-padded // widest)))


def blocked_outputs(n: int, block: int) -> int:
    """N padded to whole blocks: padded outputs keep nothing (2:4) or hold zeros (dense)."""
    return -(-n // block) * block


def _blocked(tensor: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] -> [NB, K, block]: outputs padded to whole blocks, each block input-major."""
    n, k = tensor.shape
    padded = torch.zeros(blocked_outputs(n, block), k, dtype=tensor.dtype, device=tensor.device)
    padded[:n] = tensor
    return padded.view(-1, block, k).permute(0, 2, 1)


def pack_dense(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(values [NB, K, block], block) of a dense weight [N, K]."""
    block = block_width(weight.shape[0], INPUT_MAJOR_BLOCK)
    return _blocked(weight.detach(), block).contiguous(), block


def unpack_dense(values: torch.Tensor, n: int) -> torch.Tensor:
    """The weight [N, K] back from `pack_dense`'s values."""
    blocks, k, block = values.shape
    return values.permute(0, 2, 1).reshape(blocks * block, k)[:n]


def pack_24(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(masks, values, block) of a 2:4 weight given as its kept values [N, K/2] and their positions
    (0..3) inside each group of 4 inputs [N, K/2] (distill.sparsity.packing.pack_nm's form)."""
    n, half = values.shape
    k = 2 * half
    slots = positions.reshape(n, k // 4, 2).long()
    kept = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=values.device)
    kept.scatter_(-1, slots, True)
    weight = torch.zeros(n, k // 4, 4, dtype=values.dtype, device=values.device)
    weight.scatter_(-1, slots, values.reshape(n, k // 4, 2))
    block = block_width(n, INPUT_MAJOR_BLOCK)
    kept_blocked = _blocked(kept.view(n, k), block)  # [NB, K, block]
    blocked_values = _blocked(weight.view(n, k), block)[kept_blocked]  # logical order: block, input, output
    masks = _mask_words(kept_blocked)
    return masks, torch.cat([blocked_values, blocked_values.new_zeros(VALUE_PAD)]), block


def _mask_words(kept: torch.Tensor) -> torch.Tensor:
    blocks, k, block = kept.shape
    bits = kept.reshape(blocks, k, block // LANES, LANES).to(torch.int32) << torch.arange(LANES, device=kept.device)
    words = bits.sum(-1)
    return torch.where(words >= 2**15, words - 2**16, words).to(torch.int16).contiguous()  # reinterpreted as uint16


def kept_mask(masks: torch.Tensor) -> torch.Tensor:
    """[NB, K, block] bool from the mask words."""
    blocks, k, words = masks.shape
    bits = (masks.to(torch.int32)[..., None] >> torch.arange(LANES, device=masks.device)) & 1
    return bits.bool().reshape(blocks, k, words * LANES)


def unpack_24(masks: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The dense-with-zeros weight [N, K] back from `pack_24`'s masks and values (plain PyTorch)."""
    kept = kept_mask(masks)
    blocked = torch.zeros(kept.shape, dtype=values.dtype, device=values.device)
    blocked[kept] = values[: int(kept.sum())]
    return unpack_dense(blocked, n)


def positions_24(masks: torch.Tensor, values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_nm's (values [N, K/2], positions [N, K/2] uint8) back from the blocked 2:4 layout."""
    kept = unpack_dense(kept_mask(masks), n)  # [N, K] bool
    weight = unpack_24(masks, values, n)
    k = weight.shape[1]
    slots = torch.sort((~kept).reshape(n, k // 4, 4).to(torch.uint8), dim=-1, stable=True).indices[..., :2]
    kept_values = weight.reshape(n, k // 4, 4).gather(-1, slots)
    return kept_values.reshape(n, -1).contiguous(), slots.to(torch.uint8).reshape(n, -1).contiguous()


def pack_grouped_24(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(codes, values, block) of the grouped 2:4 layout, for projections whose inputs are rarely zero:
    per block of outputs and group of 4 inputs, the first kept weight of every output, then the
    second (values [NB, K/4, 2, block]), and per output a 4-bit code p0 | p1 << 2 naming the two
    inputs they multiply (codes [NB, K/4, block/2] uint8; byte i of each 16 outputs holds output i's
    code low and output i + 8's high). Every kept weight is read as part of a full vector, with no
    expansion, but only a group whose 4 inputs are all zero is skipped."""
    n, half = values.shape
    groups = half // 2
    block = block_width(n, GROUPED_BLOCK)
    padded = blocked_outputs(n, block)
    slots = torch.zeros(padded, groups, 2, dtype=values.dtype, device=values.device)
    slots[:n] = values.reshape(n, groups, 2)
    grouped = slots.view(-1, block, groups, 2).permute(0, 2, 3, 1).contiguous()  # [NB, K/4, 2, block]
    pairs = positions.reshape(n, groups, 2).to(torch.int32)
    codes = torch.zeros(padded, groups, dtype=torch.int32, device=values.device)
    codes[:n] = pairs[..., 0] | (pairs[..., 1] << 2)
    lanes = codes.view(-1, block // LANES, LANES, groups).permute(0, 3, 1, 2)  # [NB, K/4, words, 16]
    packed = (lanes[..., :8] | (lanes[..., 8:] << 4)).to(torch.uint8).contiguous()
    return packed.reshape(-1, groups, block // 2), grouped.reshape(-1), block


def grouped_slots(codes: torch.Tensor, values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_nm's (values [N, K/2], positions [N, K/2] uint8) back from the grouped layout."""
    blocks, groups, half_block = codes.shape
    block = 2 * half_block
    grouped = values.view(blocks, groups, 2, block).permute(0, 3, 1, 2).reshape(blocks * block, groups * 2)[:n]
    bytes_ = codes.view(blocks, groups, block // LANES, 8).to(torch.int32)
    lanes = torch.cat([bytes_ & 15, bytes_ >> 4], dim=-1)  # [NB, K/4, words, 16]
    per_output = lanes.permute(0, 2, 3, 1).reshape(blocks * block, groups)[:n]
    positions = torch.stack([per_output & 3, per_output >> 2], dim=-1).reshape(n, groups * 2)
    return grouped.contiguous(), positions.to(torch.uint8).contiguous()


def unpack_grouped_24(codes: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The dense-with-zeros weight [N, K] back from the grouped layout (plain PyTorch)."""
    kept_values, positions = grouped_slots(codes, values, n)
    groups = kept_values.shape[1] // 2
    weight = torch.zeros(n, groups, 4, dtype=values.dtype, device=values.device)
    weight.scatter_(-1, positions.reshape(n, groups, 2).long(), kept_values.reshape(n, groups, 2))
    return weight.reshape(n, groups * 4)
