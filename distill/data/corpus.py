"""Text sources as token streams: local text files (read directly), jsonl/parquet files and hub
datasets through `datasets` (hub datasets optionally streamed), and text the teacher samples itself.
A source is a sequence of pieces (below), so that ranks can share its tokenization and no source is
ever held whole; distill.data.token_blocks turns the pieces into fixed-length blocks on disk, each
source's last blocks held out for evaluation (`split_source`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import SourceConfig, TeacherSamplesConfig
from distill.data.files import check_text_file
from distill.errors import DistillError
from distill.data.sampling import sample_sequences

TEXT_CHUNK_BYTES = 1 << 22  # lines tokenized together: one call per ~4 MiB of text
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# A piece is a unit of tokenization work: a call that returns its tokens. A source is a sequence of
# pieces whose tokens, concatenated in order, are the source's token stream; the pieces are made cheaply
# in order on every rank (lines read, records fetched) and only the rank that owns one tokenizes it.
Piece = Callable[[], list[int]]
RECORDS_PER_PIECE = 2048  # records of a jsonl/parquet file or dataset tokenized together


def _separator(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _check_texts(batch: dict, text_field: str, first_record: int, origin: str) -> list[str]:
    """The records' texts, refused in one line unless each is a string in `text_field`. A JSON file of
    the wrong shape, such as a list of numbers, loads as records whose "text" is a number."""
    if text_field not in batch:
        raise DistillError(f"{origin}: text field '{text_field}' not in the data's columns {sorted(batch)}")
    texts = batch[text_field]
    for offset, text in enumerate(texts):
        if text is None:
            raise DistillError(f"{origin}: record {first_record + offset} has no text (its '{text_field}' is null)")
        if not isinstance(text, str):
            raise DistillError(f"{origin}: text field '{text_field}' holds {type(text).__name__} values, not strings; "
                               f"each record must be an object with a string field '{text_field}' (or set the "
                               "source's text_field to one)")
    return texts


def dataset_pieces(dataset, tokenizer: PreTrainedTokenizerBase, text_field: str, origin: str) -> Iterator[Piece]:
    """Groups of RECORDS_PER_PIECE records of a `datasets` dataset (map-style or streaming), each record a
    document ended by EOS. Reading the records is done on every rank; tokenizing them only by the caller."""
    separator = _separator(tokenizer)

    def tokenize(texts: list[str]) -> list[int]:
        return [token for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for token in row + separator]

    batches = iter(dataset.iter(batch_size=RECORDS_PER_PIECE))
    first = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DistillError:
            raise
        except Exception as error:  # datasets and pyarrow raise many types for unreadable data
            raise DistillError(f"{origin} could not be read: {str(error).splitlines()[0]}") from None
        texts = _check_texts(batch, text_field, first, origin)
        first += len(texts)
        yield partial(tokenize, texts)


def _text_file_pieces(path: Path, tokenizer: PreTrainedTokenizerBase) -> Iterator[Piece]:
    """A text file's lines, TEXT_CHUNK_BYTES at a time, with the line breaks kept, as datasets' text
    builder splits it (universal newlines, lines end at "\n"), so the tokens are the same; reading it
    directly saves every launch the second it takes to import datasets."""

    def tokenize(lines: list[str]) -> list[int]:
        return [token for row in tokenizer(lines, add_special_tokens=False)["input_ids"] for token in row]

    try:
        with open(path, encoding="utf-8") as handle:
            for lines in iter(lambda: handle.readlines(TEXT_CHUNK_BYTES), []):
                yield partial(tokenize, lines)
    except UnicodeDecodeError as error:  # check_text_file judged the first MiB only
        raise DistillError(f"data file {path} is not UTF-8 text past its first MiB ({error.reason})") from None


def file_pieces(files: list[str], tokenizer: PreTrainedTokenizerBase, text_field: str = "text") -> Iterator[Piece]:
    """All files' pieces, in order. Text files keep their line breaks (one document per file); each
    record of a jsonl/parquet file is a document ended by EOS; every file ends with EOS. jsonl and
    parquet files are read by `datasets` as a stream: nothing is cached or held whole."""
    separator = _separator(tokenizer)
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DistillError(f"data file not found: {name}")
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DistillError(f"data file {name}: unknown type '{path.suffix}' (use {', '.join(FILE_BUILDERS)})")
        if builder == "text":
            check_text_file(path)
            yield from _text_file_pieces(path, tokenizer)
        else:
            from datasets import load_dataset

            # streamed, the file is not converted into the datasets cache; its lock files go to a temp dir
            with tempfile.TemporaryDirectory(prefix="distill-datasets-") as cache:
                try:
                    dataset = load_dataset(builder, data_files=str(path.resolve()), split="train", streaming=True,
                                           cache_dir=cache)
                except Exception as error:  # datasets raises many types for unreadable files
                    raise DistillError(f"data file {name} could not be read: {str(error).splitlines()[0]}") from None
                yield from dataset_pieces(dataset, tokenizer, text_field, f"data file {name}")
        yield lambda: list(separator)  # the file's end


def tokenize_files(files: list[str], tokenizer: PreTrainedTokenizerBase, text_field: str = "text") -> torch.Tensor:
    """All files' tokens in one tensor (for texts that fit in memory: evaluation files, benchmarks)."""
    return torch.tensor([token for piece in file_pieces(files, tokenizer, text_field) for token in piece()],
                        dtype=torch.long)


def hub_pieces(source: SourceConfig, tokenizer: PreTrainedTokenizerBase) -> Iterator[Piece]:
    """A hub dataset's records (or a local dataset dir's), downloaded whole into the datasets cache when
    this is called (not lazily: the caller may let one process download first), or read as a stream
    when the source says `streaming: true`."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.dataset, source.subset, split=source.split, streaming=source.streaming)
    except Exception as error:
        raise DistillError(f"dataset '{source.dataset}' could not be loaded: {str(error).splitlines()[0]}") from None
    return dataset_pieces(dataset, tokenizer, source.text_field, f"dataset '{source.dataset}'")


def teacher_pieces(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: TeacherSamplesConfig,
    seed: int,
    device: torch.device,
    autocast: Callable[[], ContextManager],
) -> Iterator[Piece]:
    """The teacher writes `num_sequences` texts from its start token, a batch per piece.

    Batch b is drawn from a generator seeded with (seed, b), so the corpus depends on the seed and the
    precision only, not on which rank wrote which batch. Sequences end at EOS and are joined.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    num_batches = -(-samples.num_sequences // samples.batch_size)

    def write(batch: int) -> list[int]:
        size = min(samples.batch_size, samples.num_sequences - batch * samples.batch_size)
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + batch)
        with autocast():
            rows = sample_sequences(teacher, start, tokenizer.eos_token_id, size, samples.max_new_tokens,
                                    samples.temperature, samples.top_k, generator)
        return [token for row in rows for token in row]

    for batch in range(num_batches):
        yield partial(write, batch)


def pack(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a token stream into [blocks, block_size], dropping the incomplete tail."""
    usable = (tokens.numel() // block_size) * block_size
    return tokens[:usable].reshape(-1, block_size)


@dataclass(frozen=True)
class SourceSplit:
    """How a source's blocks divide: the first `train` train, the next `heldout` are kept for evaluation
    (the held-out blocks past those are dropped)."""

    train: int
    heldout: int


def split_source(num_blocks: int, source: SourceConfig, max_heldout: int) -> SourceSplit:
    """The last `heldout_fraction` of the source's blocks (after `max_blocks`) are held out, at most
    `max_heldout` of them kept; the rest train."""
    if source.max_blocks:
        num_blocks = min(num_blocks, source.max_blocks)
    if num_blocks == 0:
        raise DistillError(f"data source '{source.name}' has fewer tokens than one block")
    num_heldout = round(num_blocks * source.heldout_fraction)
    if source.heldout_fraction > 0:
        num_heldout = max(num_heldout, 1)
    return SourceSplit(train=num_blocks - num_heldout, heldout=min(num_heldout, max_heldout))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without making the host wait: through pinned memory on CUDA."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
