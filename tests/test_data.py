"""Text sources on real files: plain text, jsonl, parquet, a dataset dir through `datasets` (downloaded
or streamed), packing and held-out splits, and the token blocks on disk: shards written by every rank,
read lazily, checked block by block."""

import json
from pathlib import Path

import datasets

import pytest
import torch
from transformers import AutoTokenizer

from conftest import VALID_TEXT
from distill.config import SourceConfig
from distill.data.corpus import hub_pieces, pack, split_source, tokenize_files
from distill.errors import DistillError


@pytest.fixture(scope="module")
def tokenizer(demo_teacher_dir):
    return AutoTokenizer.from_pretrained(demo_teacher_dir)


@pytest.fixture(scope="module")
def paragraphs():
    lines = [line for line in VALID_TEXT.read_text().splitlines() if len(line.split()) > 20]
    return lines[:30]


def test_text_file_tokens_equal_the_tokenized_text(tmp_path, tokenizer, paragraphs):
    path = tmp_path / "a.txt"
    path.write_text("\n".join(paragraphs) + "\n")
    tokens = tokenize_files([str(path)], tokenizer)
    assert tokens[-1] == tokenizer.eos_token_id  # documents end with EOS
    assert tokenizer.decode(tokens[:-1]) == path.read_text()


def test_jsonl_and_parquet_records_become_eos_separated_documents(tmp_path, tokenizer, paragraphs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": text}) + "\n" for text in paragraphs[:5]))
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": paragraphs[5:10]}), parquet)
    cached_before = set(Path(datasets.config.HF_DATASETS_CACHE).glob("*"))
    tokens = tokenize_files([str(jsonl), str(parquet)], tokenizer, text_field="body")
    documents = tokenizer.decode(tokens).split(tokenizer.eos_token)
    assert documents[:5] == paragraphs[:5] and documents[6:11] == paragraphs[5:10]
    # the files are read as a stream: nothing of them lands in the datasets library's cache
    assert set(Path(datasets.config.HF_DATASETS_CACHE).glob("*")) == cached_before


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataset_dir_loads_like_a_hub_dataset(tmp_path, tokenizer, paragraphs, streaming):
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in paragraphs))
    source = SourceConfig(name="local", kind="hub", dataset=str(folder), split="train", streaming=streaming)
    tokens = [token for piece in hub_pieces(source, tokenizer) for token in piece()]
    assert tokenizer.decode(tokens).split(tokenizer.eos_token)[:-1] == paragraphs


def test_unreadable_sources_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(DistillError, match="data file not found"):
        tokenize_files([str(tmp_path / "none.txt")], tokenizer)
    odd = tmp_path / "a.docx"
    odd.write_text("x")
    with pytest.raises(DistillError, match="unknown type '.docx'"):
        tokenize_files([str(odd)], tokenizer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DistillError, match="broken.jsonl could not be read"):
        tokenize_files([str(broken)], tokenizer)
    wrong_field = tmp_path / "c.jsonl"
    wrong_field.write_text('{"body": "x"}\n')
    with pytest.raises(DistillError, match="text field 'text' not in"):
        tokenize_files([str(wrong_field)], tokenizer)


def test_pack_and_split_hold_out_the_last_blocks():
    tokens = torch.arange(1000)
    blocks = pack(tokens, 64)
    assert blocks.shape == (15, 64) and torch.equal(blocks.flatten(), tokens[:960])
    split = split_source(15, SourceConfig(name="s", kind="files", files=["x"], heldout_fraction=0.2), max_heldout=100)
    assert (split.train, split.heldout) == (12, 3)
    capped = split_source(15, SourceConfig(name="s", kind="files", files=["x"], heldout_fraction=0.2, max_blocks=10), 1)
    assert (capped.train, capped.heldout) == (8, 1)  # 2 held out, 1 of them kept
    with pytest.raises(DistillError, match="fewer tokens than one block"):
        split_source(0, SourceConfig(name="s", kind="files", files=["x"]), 4)


def test_a_hub_source_loads_when_asked_not_when_first_read(tmp_path, tokenizer):
    """The teacher stage lets the main process download a hub dataset first: loading (and refusing)
    happens in the call, before any record is read."""
    missing = SourceConfig(name="none", kind="hub", dataset=str(tmp_path / "no-such-dataset"))
    with pytest.raises(DistillError, match="dataset '.*no-such-dataset' could not be loaded"):
        hub_pieces(missing, tokenizer)
