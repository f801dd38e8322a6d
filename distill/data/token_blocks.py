"""Token blocks on disk: written in shards as a source is tokenized, read a block at a time.

    counts = tokenize_pieces(pieces, piece_dir, accelerator)         # every rank tokenizes its pieces
    write_source_blocks(piece_dir, counts, directory, ...)           # every rank packs its shards
    write_layout(directory, BlocksLayout(...))                       # the main process, last
    blocks = StoredBlocks(directory)                                 # any stage, lazily
    blocks.train[torch.tensor([4, 17])]                              # int64 [2, block_size]

Tokenizing: a source is a sequence of pieces (distill.data.corpus); piece p is tokenized by rank
p mod world and saved in the stage's scratch dir as soon as it is made, a round of `world` pieces at a
time. After each round the ranks share the pieces' token counts, so every rank knows where each piece
starts in the source's token stream and when a source's `max_blocks` is reached (a stream need not
be read to its end). A resumed stage keeps the pieces it finds.

Packing: the stream is cut into blocks of `block_size` tokens (the incomplete tail dropped); shard s
of a source holds its blocks [s * S, (s + 1) * S) and is written by rank s mod world from the pieces
it spans. So memory holds one piece and one shard per rank whatever the corpus, and the files do not
depend on the number of processes. Token ids are stored as uint16 when the vocabulary allows, else
int32, with a CRC-32 per block checked as it is read (the run's checksums list the shards by size).
`blocks.json`, written last, lists every source: its blocks that train, then those held out.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from distill.data.corpus import Piece, SourceSplit
from distill.errors import DistillError
from distill.io import atomic_write, open_mapped, read_json, save_tensors, write_json

LAYOUT_FILE = "blocks.json"
UINT16_VOCAB = 1 << 16  # a vocabulary this small stores its ids in 2 bytes


@dataclass(frozen=True)
class SourceBlocksLayout:
    """One source's blocks: `train` training blocks, then `heldout` held-out ones, from `tokens` tokens."""

    name: str
    tokens: int
    train: int
    heldout: int

    @property
    def stored(self) -> int:
        return self.train + self.heldout


@dataclass(frozen=True)
class BlocksLayout:
    block_size: int
    shard_blocks: int
    dtype: str  # "uint16" or "int32"
    sources: list[SourceBlocksLayout] = field(default_factory=list)

    @staticmethod
    def dtype_for(vocab: int) -> str:
        return "uint16" if vocab <= UINT16_VOCAB else "int32"


def source_dir(directory: Path, index: int) -> Path:
    return Path(directory) / f"source-{index}"


def shard_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"shard-{shard:05d}.safetensors"


def piece_path(directory: Path, piece: int) -> Path:
    return Path(directory) / f"piece-{piece:07d}.npy"


# ---- tokenizing: pieces, shared by the ranks --------------------------------------------------------

def tokenize_pieces(pieces: Iterator[Piece], directory: Path, accelerator: Accelerator,
                    token_budget: int = 0, desc: str = "tokenizing") -> list[int]:
    """Tokenize a source's pieces into `directory`, piece p on rank p mod world, stopping at the end of
    the pieces or once `token_budget` tokens are made (0: no budget). Returns every piece's token count,
    in order, on every rank. Every rank advances `pieces` (reading is cheap; tokenizing is not)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    directory.mkdir(parents=True, exist_ok=True)
    counts: list[int] = []
    total = 0
    # closed on the way out, an error included: the error's line starts a line of its own
    with tqdm(desc=desc, unit=" tokens", disable=not accelerator.is_main_process) as progress:
        while True:
            round_ = list(islice(pieces, world))
            count = -1  # this rank has no piece in a last, short round
            if rank < len(round_):
                path = piece_path(directory, len(counts) + rank)
                count = _stored_count(path)
                if count is None:  # not made by an earlier launch
                    tokens = np.asarray(round_[rank](), dtype=np.int32)
                    atomic_write(path, lambda temp: _save_npy(temp, tokens))
                    count = len(tokens)
            found = gather_object([count]) if world > 1 else [count]
            made = [c for c in found if c >= 0]
            counts.extend(made)
            total += sum(made)
            progress.update(sum(made))
            if len(round_) < world or (token_budget and total >= token_budget):
                return counts


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save would append ".npy" to a temp name
        np.save(handle, array)


def _stored_count(path: Path) -> int | None:
    """The token count of a piece an earlier launch saved whole (None when there is none)."""
    if not path.is_file():
        return None
    try:
        return len(np.load(path, mmap_mode="r"))
    except (ValueError, OSError):
        return None


def _stream_tokens(directory: Path, counts: list[int], start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the stream the pieces in `directory` make, in order."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    parts, piece = [], first
    while piece < len(counts) and offsets[piece] < stop:
        tokens = np.load(piece_path(directory, piece), mmap_mode="r")
        lo, hi = max(start - offsets[piece], 0), min(stop - offsets[piece], counts[piece])
        parts.append(np.asarray(tokens[lo:hi]))
        piece += 1
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ---- packing: shards of blocks, shared by the ranks ---------------------------------------------------

def write_source_blocks(piece_dir: Path, counts: list[int], directory: Path, split: SourceSplit, block_size: int,
                        shard_blocks: int, dtype: str, accelerator: Accelerator) -> None:
    """Write this rank's shards of a source's stored blocks (training then held-out, `split`) into
    `directory`, from the pieces in `piece_dir`. A shard found whole is kept."""
    stored = split.train + split.heldout
    shards = -(-stored // shard_blocks)
    for shard in range(accelerator.process_index, shards, accelerator.num_processes):
        path = shard_path(directory, shard)
        first, last = shard * shard_blocks, min((shard + 1) * shard_blocks, stored)
        if _complete(path, last - first):
            continue
        tokens = _stream_tokens(piece_dir, counts, first * block_size, last * block_size)
        blocks = torch.from_numpy(tokens.astype(dtype).reshape(last - first, block_size))
        crc = torch.tensor([_crc32(row) for row in blocks], dtype=torch.int64)
        save_tensors(path, {"blocks": blocks, "crc32": crc}, metadata={"first_block": str(first)})


def _crc32(row: torch.Tensor) -> int:
    return zlib.crc32(row.contiguous().view(torch.uint8).numpy().tobytes())


def _complete(path: Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_slice("blocks").get_shape()[0] == rows and handle.get_slice("crc32").get_shape() == [rows]
    except (SafetensorError, OSError, KeyError):
        return False


def write_layout(directory: Path, layout: BlocksLayout) -> None:
    write_json(Path(directory) / LAYOUT_FILE, asdict(layout))


# ---- reading -----------------------------------------------------------------------------------------

class StoredBlocks:
    """The token blocks in `directory`: `train` (a BlockView over every source's training blocks, in
    source order) and `heldout` ({source name: int64 [n, block_size]}, read whole: they are few)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        path = self.directory / LAYOUT_FILE
        data = read_json(path)
        try:
            sources = [SourceBlocksLayout(**source) for source in data.pop("sources")]
            self.layout = BlocksLayout(**data, sources=sources)
        except (TypeError, KeyError, AttributeError) as error:
            raise DistillError(f"corrupt token block layout {path}: {error}") from None
        self.train = BlockView(self, [(index, range(source.train)) for index, source in enumerate(sources)])
        self.heldout = {source.name: BlockView(self, [(index, range(source.train, source.stored))])[:]
                        for index, source in enumerate(sources)}

    def heldout_sets(self) -> dict[str, torch.Tensor]:
        """The sources that hold any held-out blocks, by name."""
        return {name: blocks for name, blocks in sorted(self.heldout.items()) if len(blocks)}

    def all_heldout(self) -> torch.Tensor | None:
        """Every held-out block of every source, in source-name order (None when there are none)."""
        sets = list(self.heldout_sets().values())
        return torch.cat(sets) if sets else None

    def read(self, source: int, block: int) -> torch.Tensor:
        """Block `block` of source `source`, int64 [block_size], checked against its CRC-32."""
        shard_blocks = self.layout.shard_blocks
        path = shard_path(source_dir(self.directory, source), block // shard_blocks)
        row = block % shard_blocks
        try:
            handle = open_mapped(path)
            tokens = handle.get_slice("blocks")[row:row + 1][0]
            if len(tokens) != self.layout.block_size:
                raise ValueError(f"blocks of {len(tokens)} tokens, not {self.layout.block_size}")
            if _crc32(tokens) != int(handle.get_slice("crc32")[row:row + 1][0]):
                raise ValueError(f"block {block}'s bytes do not match the CRC-32 written with them")
        except (SafetensorError, OSError, ValueError, IndexError) as error:
            raise DistillError(f"corrupt token block shard {path}: {str(error).splitlines()[0]}; "
                               "rerun the teacher stage") from None
        return tokens.long()


class BlockView:
    """Blocks of a StoredBlocks, indexed like a tensor [blocks, block_size] (an int, a slice, a list or
    tensor of indices, optionally with a second index into the tokens); reads only the blocks asked for."""

    def __init__(self, store: StoredBlocks, parts: list[tuple[int, range]]):
        self.store, self.parts = store, parts
        self.starts = np.cumsum([0] + [len(blocks) for _, blocks in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self), self.store.layout.block_size])

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"block {index} is outside the {len(self)} blocks")
        index %= len(self)
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        source, blocks = self.parts[part]
        return source, blocks[index - int(self.starts[part])]

    def __getitem__(self, key):
        tokens = None
        if isinstance(key, tuple):
            key, tokens = key[0], key[1:]
        if isinstance(key, (np.integer, torch.Tensor)) and np.ndim(key) == 0:  # one index, as a scalar
            key = int(key)
        if isinstance(key, int):
            rows = self.store.read(*self._locate(key))
        else:
            indices = range(len(self))[key] if isinstance(key, slice) else [int(i) for i in key]
            rows = torch.stack([self.store.read(*self._locate(i)) for i in indices]) if len(indices) else \
                torch.zeros(0, self.store.layout.block_size, dtype=torch.long)
        return rows[(slice(None), *tokens) if not isinstance(key, int) else tokens] if tokens else rows
