"""The teacher's top-k cache on disk: written in shards as it is produced, read a block at a time.

    topk = teacher_topk(teacher, blocks, k, batch_size, accelerator)   # what a shard holds, scored
    writer = CacheWriter(directory, layout)           # every rank writes the shards it owns
    writer.write_shard(shard, {block: TopK, ...})     # atomically; a complete shard is skipped on resume
    cache = TeacherCache(directory)                   # distill reads it lazily
    topk = cache.blocks(torch.tensor([4, 17]))        # TopK [2, positions, k] (+ the residual mass)

A cache covers the training blocks in order; shard s holds blocks [s * S, (s + 1) * S) for the
layout's S (`shard_blocks`), so the files do not depend on the number of processes that wrote them,
and memory does not depend on the corpus: a writer holds one shard, a reader the blocks it decodes.
`cache.json` (the layout) is written first, so a resumed run can tell its shards from another
layout's; `TeacherCache` refuses a missing shard or block by name, and a block whose bytes changed:
every block carries the CRC-32 of its tensors (`block.b.crc32`), checked as it is read, so the run's
checksums need not hash the shards whole at every launch (distill.run.checksums).

Two codecs, per training block:
  exact    fp16 log-probabilities and int32 token ids: 6 bytes per entry
  compact  per position, the token ids sorted and stored as gaps (uint16 below 65,536 tokens, else
           uint32), the log-probabilities in the same order as 8-bit codes on a log scale
           (logp = -code * step, step per position: the least log-probability maps to 255), and the
           residual mass of the other tokens as log(1 - mass), exact to fp16; the whole block then
           xz-compressed (the gaps split into byte planes first, which compress better). About 235
           bytes per position at k = 128 on the demo's text, against 768 exact.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from torch import nn

from distill.errors import DistillError
from distill.io import open_mapped, read_json, save_tensors, write_json
from distill.losses import TopK, logit_transform, other_tokens_logp
from distill.sections import CacheCodec

LAYOUT_FILE = "cache.json"
CODE_LEVELS = 255  # 8-bit log-probability codes
XZ_PRESET = 6  # xz's default; higher presets gained under 1% on the demo's cache


@dataclass(frozen=True)
class CacheLayout:
    """What a cache holds: `blocks` training blocks of `positions` tokens, top-`k` of a `vocab`-token
    teacher, in shards of `shard_blocks` blocks, by `codec`."""

    blocks: int
    positions: int
    k: int
    vocab: int
    codec: str
    shard_blocks: int

    @property
    def shards(self) -> int:
        return -(-self.blocks // self.shard_blocks)

    def shard_of(self, block: int) -> int:
        return block // self.shard_blocks

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_blocks, min((shard + 1) * self.shard_blocks, self.blocks))


def shard_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"shard-{shard:05d}.safetensors"


# ---- what a cache holds: the teacher's top-k of token blocks -------------------------------------------

@torch.no_grad()
def teacher_topk(teacher: nn.Module, blocks: torch.Tensor, k: int, batch_size: int, accelerator: Accelerator,
                 chunk_tokens: int = 4096) -> TopK:
    """The teacher's top-k log-probabilities and token ids for every position of `blocks` [n, length]
    (TopK [n, length, k], on the CPU). Log-softmax runs a chunk of positions at a time, so no
    batch-sized fp32 logits tensor exists."""
    head, transform = teacher.get_output_embeddings(), logit_transform(teacher)  # as the teacher's forward
    logps, indices = [], []
    for start in range(0, len(blocks), batch_size):
        with accelerator.autocast():
            hidden = teacher.get_decoder()(input_ids=blocks[start:start + batch_size].to(accelerator.device),
                                           use_cache=False).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1])
        tops = [F.log_softmax(transform(head(rows[i:i + chunk_tokens]).float()), dim=-1).topk(k, dim=-1)
                for i in range(0, len(rows), chunk_tokens)]
        shape = (*hidden.shape[:2], k)
        logps.append(torch.cat([top.values for top in tops]).reshape(shape).half().cpu())
        indices.append(torch.cat([top.indices for top in tops]).reshape(shape).int().cpu())
    return TopK(torch.cat(logps), torch.cat(indices))


# ---- codecs: one training block (TopK [positions, k]) <-> tensors ----------------------------------------

def _gap_dtype(vocab: int) -> type:
    return np.uint16 if vocab <= 1 << 16 else np.uint32


def encode_block(topk: TopK, codec: CacheCodec, vocab: int) -> dict[str, torch.Tensor]:
    """One block's tensors in `codec` (module docstring)."""
    logp, index = topk.logp.float(), topk.index.long()
    if codec is CacheCodec.EXACT:
        return {"logp": logp.half(), "index": index.int()}
    positions, k = logp.shape
    ids, order = index.sort(dim=-1)
    logp = logp.gather(-1, order)
    gaps = torch.diff(ids, dim=-1, prepend=ids.new_zeros(positions, 1))
    gap_dtype = _gap_dtype(vocab)
    step = (-logp.min(-1).values / CODE_LEVELS).clamp(min=1e-6).half()  # fp16, as stored: codes use it
    codes = torch.round(-logp / step.float()[:, None]).clamp(0, CODE_LEVELS).to(torch.uint8)
    planes = gaps.numpy().astype(gap_dtype).view(np.uint8).reshape(positions, k, -1).transpose(2, 0, 1)
    payload = b"".join([np.ascontiguousarray(planes).tobytes(), codes.numpy().tobytes(),
                        step.view(torch.int16).numpy().tobytes(),
                        other_tokens_logp(topk.logp.float()).half().view(torch.int16).numpy().tobytes()])
    return {"xz": torch.frombuffer(bytearray(lzma.compress(payload, preset=XZ_PRESET)), dtype=torch.uint8)}


def decode_block(tensors: dict[str, torch.Tensor], layout: CacheLayout) -> TopK:
    """TopK [positions, k] (logp float32, index int64, and `rest` for the compact codec) of one block."""
    positions, k = layout.positions, layout.k
    if layout.codec == CacheCodec.EXACT.value:
        return TopK(tensors["logp"].float(), tensors["index"].long())
    payload = lzma.decompress(tensors["xz"].numpy().tobytes())
    gap_dtype = _gap_dtype(layout.vocab)
    width = np.dtype(gap_dtype).itemsize
    sizes = [positions * k * width, positions * k, 2 * positions, 2 * positions]
    if len(payload) != sum(sizes):
        raise ValueError(f"{len(payload)} bytes where {sum(sizes)} were expected")
    parts, offset = [], 0
    for size in sizes:
        parts.append(np.frombuffer(payload, dtype=np.uint8, count=size, offset=offset))
        offset += size
    gaps = parts[0].reshape(width, positions, k).transpose(1, 2, 0).copy().view(gap_dtype).reshape(positions, k)
    index = torch.from_numpy(gaps.astype(np.int64)).cumsum(-1)
    step = torch.from_numpy(parts[2].copy().view(np.float16)).float()
    logp = -torch.from_numpy(parts[1].copy()).float().reshape(positions, k) * step[:, None]
    rest = torch.from_numpy(parts[3].copy().view(np.float16)).float()
    return TopK(logp, index, rest)


# ---- writing ---------------------------------------------------------------------------------------

class CacheWriter:
    """Writes shards into `directory` (every rank its own; the layout file by the main process first,
    see `start`). A shard is written whole and atomically, so one found complete is skipped."""

    def __init__(self, directory: Path, layout: CacheLayout):
        self.directory = Path(directory)
        self.layout = layout

    def start(self, main_process: bool) -> None:
        """The main process records the layout; a partial cache of another layout is refused in one line."""
        path = self.directory / LAYOUT_FILE
        if path.is_file():
            found = read_json(path)
            if found != asdict(self.layout):
                raise DistillError(f"{path} describes another cache ({found}); this run writes {asdict(self.layout)}")
        elif main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json(path, asdict(self.layout))

    def complete(self, shard: int) -> bool:
        """Whether shard `shard` is on disk whole (every block of it, readable header)."""
        path = shard_path(self.directory, shard)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = set(handle.keys())
        except (SafetensorError, OSError):
            return False
        return all(_prefix(block) + name in names for block in self.layout.shard_range(shard)
                   for name in _tensor_names(self.layout.codec))

    def write_shard(self, shard: int, blocks: dict[int, TopK]) -> None:
        expected = list(self.layout.shard_range(shard))
        if sorted(blocks) != expected:
            raise ValueError(f"shard {shard} holds blocks {expected[0]}..{expected[-1]}, got {sorted(blocks)[:3]}...")
        codec = CacheCodec(self.layout.codec)
        tensors = {}
        for block, topk in blocks.items():
            encoded = encode_block(topk, codec, self.layout.vocab)
            encoded[CRC] = torch.tensor([_crc32(encoded)], dtype=torch.int64)
            tensors.update({_prefix(block) + name: tensor for name, tensor in encoded.items()})
        save_tensors(shard_path(self.directory, shard), tensors, metadata={"first_block": str(expected[0])})


def _prefix(block: int) -> str:
    return f"block.{block}."


CRC = "crc32"


def _crc32(tensors: dict[str, torch.Tensor]) -> int:
    """CRC-32 of a block's tensors' bytes, in name order (the CRC itself left out)."""
    crc = 0
    for name in sorted(tensors):
        if name != CRC:
            crc = zlib.crc32(tensors[name].contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _tensor_names(codec: str) -> tuple[str, ...]:
    return (("logp", "index") if codec == CacheCodec.EXACT.value else ("xz",)) + (CRC,)


# ---- reading ---------------------------------------------------------------------------------------

class TeacherCache:
    """A finished cache in `directory`, read a block at a time (shards are opened lazily, memory-mapped)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.layout = CacheLayout(**read_json(self.directory / LAYOUT_FILE))
        except TypeError as error:
            raise DistillError(f"corrupt teacher cache layout {self.directory / LAYOUT_FILE}: {error}") from None

    def check(self, blocks: int, positions: int, k: int) -> None:
        """Refuse, in one line, a cache that does not cover `blocks` training blocks of `positions` at `k`."""
        layout = self.layout
        if (layout.blocks, layout.positions, layout.k) != (blocks, positions, k):
            raise DistillError(f"the teacher cache in {self.directory} holds {layout.blocks} blocks of {layout.positions} "
                               f"positions at k={layout.k}, this run trains on {blocks} of {positions} at k={k}; "
                               "rerun the teacher_logits stage")
        missing = [shard for shard in range(layout.shards) if not shard_path(self.directory, shard).is_file()]
        if missing:
            raise DistillError(f"the teacher cache in {self.directory} lacks {len(missing)} of its {layout.shards} "
                               f"shards (first: {shard_path(self.directory, missing[0]).name}); rerun the teacher_logits stage")

    def nbytes(self) -> int:
        """Bytes of the cache on disk."""
        return sum(shard_path(self.directory, shard).stat().st_size for shard in range(self.layout.shards))

    def block(self, block: int) -> TopK:
        """TopK [positions, k] of training block `block`."""
        if not 0 <= block < self.layout.blocks:
            raise IndexError(f"block {block} is outside the cache's {self.layout.blocks} blocks")
        path = shard_path(self.directory, self.layout.shard_of(block))
        names = _tensor_names(self.layout.codec)
        try:
            handle = open_mapped(path)
            tensors = {name: handle.get_tensor(_prefix(block) + name) for name in names}
            if int(tensors[CRC][0]) != _crc32(tensors):
                raise ValueError("its bytes do not match the CRC-32 written with them")
            return decode_block(tensors, self.layout)
        except (SafetensorError, OSError, ValueError, lzma.LZMAError) as error:
            raise DistillError(f"corrupt teacher cache shard {path} (block {block}): {str(error).splitlines()[0]}; "
                               "rerun the teacher_logits stage") from None

    def blocks(self, indices: torch.Tensor | list[int]) -> TopK:
        """TopK [len(indices), positions, k] of these training blocks, in their order."""
        parts = [self.block(int(index)) for index in indices]
        rest = torch.stack([part.rest for part in parts]) if parts[0].rest is not None else None
        return TopK(torch.stack([part.logp for part in parts]), torch.stack([part.index for part in parts]), rest)


def describe(cache: TeacherCache) -> dict:
    tokens = cache.layout.blocks * cache.layout.positions
    return {**asdict(cache.layout), "bytes": cache.nbytes(), "bytes_per_token": cache.nbytes() / max(tokens, 1)}

