"""Token blocks on disk from a real tokenizer and real text: the shards hold exactly the blocks of the
whole stream packed in memory, whatever the pieces and shard sizes; a token budget stops reading early;
a resumed tokenization keeps its pieces; a changed byte is refused for its block alone."""

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from transformers import AutoTokenizer

from conftest import VALID_TEXT
from distill.config import SourceConfig
from distill.data import corpus
from distill.data.corpus import file_pieces, pack, split_source, tokenize_files
from distill.data.token_blocks import (BlocksLayout, SourceBlocksLayout, StoredBlocks, piece_path, shard_path, source_dir,
                                       tokenize_pieces, write_layout, write_source_blocks)
from distill.errors import DistillError

BLOCK = 64


@pytest.fixture(scope="module")
def tokenizer(demo_teacher_dir):
    return AutoTokenizer.from_pretrained(demo_teacher_dir)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True, mixed_precision="no")


def store(tmp_path, tokenizer, accelerator, shard_blocks, source, vocab=49152):
    """The blocks of one files source written as the teacher stage writes them, and read back."""
    pieces_dir, directory = tmp_path / "pieces", tmp_path / "blocks"
    counts = tokenize_pieces(file_pieces(source.files, tokenizer), pieces_dir, accelerator,
                             source.max_blocks * BLOCK)
    split = split_source(sum(counts) // BLOCK, source, max_heldout=8)
    layout = BlocksLayout(BLOCK, shard_blocks, BlocksLayout.dtype_for(vocab))
    write_source_blocks(pieces_dir, counts, source_dir(directory, 0), split, BLOCK, shard_blocks, layout.dtype, accelerator)
    layout.sources.append(SourceBlocksLayout(source.name, sum(counts), split.train, split.heldout))
    write_layout(directory, layout)
    return StoredBlocks(directory), counts


def test_shards_hold_the_blocks_of_the_whole_stream(tmp_path, tokenizer, accelerator, monkeypatch):
    monkeypatch.setattr(corpus, "TEXT_CHUNK_BYTES", 1 << 16)  # many pieces: blocks cross their boundaries
    source = SourceConfig(name="wiki", kind="files", files=[str(VALID_TEXT)], heldout_fraction=0.1)
    blocks, counts = store(tmp_path, tokenizer, accelerator, shard_blocks=100, source=source)
    assert len(counts) > 10
    expected = pack(tokenize_files([str(VALID_TEXT)], tokenizer), BLOCK)
    split = split_source(len(expected), source, max_heldout=8)
    assert blocks.train.shape == (split.train, BLOCK) and split.train > 300, "several shards of 100"
    assert torch.equal(blocks.train[:], expected[:split.train])
    assert torch.equal(blocks.heldout["wiki"], expected[split.train:split.train + 8])
    picks = torch.randperm(split.train)[:20]
    assert torch.equal(blocks.train[picks], expected[picks])
    assert torch.equal(blocks.train[-1], expected[split.train - 1])
    assert torch.equal(blocks.train[torch.tensor(7)], expected[7]) and torch.equal(blocks.train[picks[0]], expected[picks[0]])
    assert torch.equal(blocks.train[5:9, :10], expected[5:9, :10])
    with safe_open(str(shard_path(source_dir(tmp_path / "blocks", 0), 0)), "pt") as handle:
        assert handle.get_slice("blocks").get_dtype() == "U16", "a 49k vocabulary stores 2 bytes per token"
    with pytest.raises(IndexError):
        blocks.train[split.train]


def test_a_large_vocabulary_stores_int32(tmp_path, tokenizer, accelerator):
    source = SourceConfig(name="wiki", kind="files", files=[str(VALID_TEXT)], max_blocks=40)
    blocks, _ = store(tmp_path, tokenizer, accelerator, shard_blocks=16, source=source, vocab=100_000)
    expected = pack(tokenize_files([str(VALID_TEXT)], tokenizer), BLOCK)
    assert torch.equal(blocks.train[:], expected[:len(blocks.train)])
    with safe_open(str(shard_path(source_dir(tmp_path / "blocks", 0), 0)), "pt") as handle:
        assert handle.get_slice("blocks").get_dtype() == "I32"


def test_a_token_budget_stops_reading(tmp_path, tokenizer, accelerator, monkeypatch):
    monkeypatch.setattr(corpus, "TEXT_CHUNK_BYTES", 1 << 14)
    every = tokenize_pieces(file_pieces([str(VALID_TEXT)], tokenizer), tmp_path / "all", accelerator)
    budget = 20 * BLOCK
    some = tokenize_pieces(file_pieces([str(VALID_TEXT)], tokenizer), tmp_path / "some", accelerator, budget)
    assert some == every[:len(some)] and len(some) < len(every) // 4
    assert sum(some[:-1]) < budget <= sum(some)


def test_a_resumed_tokenization_keeps_its_pieces(tmp_path, tokenizer, accelerator, monkeypatch):
    monkeypatch.setattr(corpus, "TEXT_CHUNK_BYTES", 1 << 16)
    first = tokenize_pieces(file_pieces([str(VALID_TEXT)], tokenizer), tmp_path, accelerator)

    def never_tokenized():
        for _ in first:
            yield lambda: pytest.fail("a kept piece was tokenized again")

    assert tokenize_pieces(never_tokenized(), tmp_path, accelerator) == first
    piece_path(tmp_path, 3).write_bytes(b"half a piece")  # a damaged piece is made again
    remade = iter(file_pieces([str(VALID_TEXT)], tokenizer))
    assert tokenize_pieces(remade, tmp_path, accelerator) == first


def test_a_changed_byte_is_refused_for_its_block_alone(tmp_path, tokenizer, accelerator):
    source = SourceConfig(name="wiki", kind="files", files=[str(VALID_TEXT)], max_blocks=40)
    blocks, _ = store(tmp_path, tokenizer, accelerator, shard_blocks=16, source=source)
    good = blocks.train[:]
    path = shard_path(source_dir(tmp_path / "blocks", 0), 0)
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8:8 + header_size])["blocks"]
    assert entry["shape"] == [16, BLOCK] and entry["dtype"] == "U16"
    data[8 + header_size + entry["data_offsets"][0] + 3 * BLOCK * 2 + 10] ^= 0xFF  # inside block 3
    path.write_bytes(bytes(data))
    again = StoredBlocks(tmp_path / "blocks")
    with pytest.raises(DistillError, match=r"corrupt token block shard .*shard-00000.*block 3's bytes.*rerun the teacher stage"):
        again.train[3]
    assert torch.equal(again.train[4], good[4]) and torch.equal(again.train[2], good[2])
