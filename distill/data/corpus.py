"""Text sources to token blocks: local text files (read directly), jsonl/parquet files and hub
datasets through `datasets`, and text the teacher samples itself. Everything ends as fixed-length
blocks of token ids; each source's last blocks are held out for evaluation."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import SourceConfig, TeacherSamplesConfig
from distill.data.files import check_text_file
from distill.errors import DistillError
from distill.data.sampling import sample_sequences

TEXT_CHUNK_BYTES = 1 << 22  # lines tokenized together: one call per ~4 MiB of text
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class SourceBlocks:
    train: torch.Tensor  # [blocks, block_size] int64
    heldout: torch.Tensor


def _separator(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _check_text_field(dataset, text_field: str, origin: str) -> None:
    """The records hold their text as strings in `text_field`. A JSON file of the wrong shape, such as
    a list of numbers, loads as records whose "text" is a number, which the tokenizer cannot take."""
    if text_field not in dataset.column_names:
        raise DistillError(f"{origin}: text field '{text_field}' not in the data's columns {dataset.column_names}")
    feature = dataset.features[text_field]
    kind = getattr(feature, "dtype", None) if type(feature).__name__ == "Value" else type(feature).__name__.lower()
    if kind not in ("string", "large_string"):
        raise DistillError(f"{origin}: text field '{text_field}' holds {kind} values, not strings; each record must "
                           f"be an object with a string field '{text_field}' (or set the source's text_field to one)")


def _tokenize_dataset(dataset, tokenizer: PreTrainedTokenizerBase, text_field: str, origin: str) -> torch.Tensor:
    """Every record's tokens, each record a document ended by EOS."""
    _check_text_field(dataset, text_field, origin)
    separator = _separator(tokenizer)

    def tokenize(batch, indices):
        texts = batch[text_field]
        if None in texts:
            raise DistillError(f"{origin}: record {indices[texts.index(None)]} has no text (its '{text_field}' is null)")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"ids": [row + separator for row in ids]}

    tokenized = dataset.map(tokenize, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            desc="tokenizing")
    flat = [token for row in tokenized["ids"] for token in row]
    return torch.tensor(flat, dtype=torch.long)


def tokenize_files(files: list[str], tokenizer: PreTrainedTokenizerBase, text_field: str = "text",
                   scratch_dir: Path | None = None) -> torch.Tensor:
    """All files' tokens, in order. Text files keep their line breaks (one document per file);
    each record of a jsonl/parquet file is a document ended by EOS. The datasets library's cache of
    a jsonl/parquet file goes to a temp dir inside `scratch_dir` (a stage's work dir: nothing of a
    run lands in ~/.cache, and a killed run's temp dir is cleaned like any other), removed after."""
    pieces = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DistillError(f"data file not found: {name}")
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DistillError(f"data file {name}: unknown type '{path.suffix}' (use {', '.join(FILE_BUILDERS)})")
        if builder == "text":
            check_text_file(path)
            tokens = _tokenize_text_file(path, tokenizer)
        else:
            from datasets import load_dataset

            with tempfile.TemporaryDirectory(prefix=".datasets.", suffix=".tmp", dir=scratch_dir) as cache:
                try:
                    dataset = load_dataset(builder, data_files=str(path.resolve()), split="train", cache_dir=cache)
                except Exception as error:  # datasets raises many types for unreadable files
                    raise DistillError(f"data file {name} could not be read: {str(error).splitlines()[0]}") from None
                tokens = _tokenize_dataset(dataset, tokenizer, text_field, f"data file {name}")
        pieces.append(torch.cat([tokens, torch.tensor(_separator(tokenizer), dtype=torch.long)]))
    return torch.cat(pieces)


def _tokenize_text_file(path: Path, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """A text file's tokens, line by line with the line breaks kept, as datasets' text builder splits
    it (universal newlines, lines end at "\n"), so the tokens are the same; reading it directly saves
    every launch the second it takes to import datasets."""
    ids: list[int] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for lines in iter(lambda: handle.readlines(TEXT_CHUNK_BYTES), []):
                for row in tokenizer(lines, add_special_tokens=False)["input_ids"]:
                    ids.extend(row)
    except UnicodeDecodeError as error:  # check_text_file judged the first MiB only
        raise DistillError(f"data file {path} is not UTF-8 text past its first MiB ({error.reason})") from None
    return torch.tensor(ids, dtype=torch.long)


def tokenize_hub_dataset(source: SourceConfig, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.dataset, source.subset, split=source.split)
    except Exception as error:
        raise DistillError(f"dataset '{source.dataset}' could not be loaded: {str(error).splitlines()[0]}") from None
    return _tokenize_dataset(dataset, tokenizer, source.text_field, f"dataset '{source.dataset}'")


def sample_from_teacher(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: TeacherSamplesConfig,
    seed: int,
    accelerator: Accelerator,
) -> torch.Tensor:
    """The teacher writes `num_sequences` texts from its start token; ranks share the batches.

    Batch b is written by rank b % world_size from a generator seeded with (seed, b), so the corpus
    depends on the seed and the precision only, not on how many processes made it. Sequences end at
    EOS and are joined with EOS.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    num_batches = -(-samples.num_sequences // samples.batch_size)
    mine = range(accelerator.process_index, num_batches, accelerator.num_processes)
    produced = []
    for batch in tqdm(mine, desc="teacher writes text", disable=not accelerator.is_main_process):
        size = min(samples.batch_size, samples.num_sequences - batch * samples.batch_size)
        generator = torch.Generator(accelerator.device).manual_seed(seed * 1_000_003 + batch)
        with accelerator.autocast():
            rows = sample_sequences(teacher, start, tokenizer.eos_token_id, size, samples.max_new_tokens,
                                    samples.temperature, samples.top_k, generator)
        produced.append((batch, rows))
    everything = sorted(gather_object(produced))
    flat = [token for _, rows in everything for row in rows for token in row]
    return torch.tensor(flat, dtype=torch.long)


def pack(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a token stream into [blocks, block_size], dropping the incomplete tail."""
    usable = (tokens.numel() // block_size) * block_size
    return tokens[:usable].reshape(-1, block_size)


def split_blocks(blocks: torch.Tensor, source: SourceConfig, max_heldout: int) -> SourceBlocks:
    """The last `heldout_fraction` of the blocks (at most `max_heldout`) are held out; the rest train."""
    if source.max_blocks:
        blocks = blocks[: source.max_blocks]
    if len(blocks) == 0:
        raise DistillError(f"data source '{source.name}' has fewer tokens than one block")
    num_heldout = round(len(blocks) * source.heldout_fraction)
    if source.heldout_fraction > 0:
        num_heldout = max(num_heldout, 1)
    heldout = blocks[len(blocks) - num_heldout:]
    return SourceBlocks(train=blocks[: len(blocks) - num_heldout], heldout=heldout[:max_heldout])


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without making the host wait: through pinned memory on CUDA."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
