"""Stage 1, teacher: load the dense teacher and make what later stages need from it.

Writes data.safetensors (training blocks and each source's held-out blocks), calibration.safetensors
(input statistics of every target projection), and the teacher's perplexity on the held-out blocks.
All ranks share the work: sampling, calibration and evaluation.
"""

from __future__ import annotations

import torch

from distill.run.artifacts import TokenBlocks, write_calibration, write_token_blocks
from distill.sparsity.calibration import calibration_blocks, input_square_sums
from distill.data.corpus import pack, sample_from_teacher, split_blocks, tokenize_files, tokenize_hub_dataset
from distill.eval.scoring import score_models
from distill.models import load_teacher, load_tokenizer
from distill.config import SourceKind
from distill.errors import DistillError
from distill.run.pipeline import StageContext


def source_files(config) -> list[str]:
    return [path for source in config.data.sources if source.kind is SourceKind.FILES for path in source.files]


def check_vocabulary(tokenizer, teacher, source: str) -> None:
    """Every token id the tokenizer can produce has a row in the teacher's embedding; a tokenizer from
    another model would otherwise fail with an IndexError in the first forward pass (or on GPU, a
    device-side assert)."""
    rows = teacher.get_input_embeddings().num_embeddings
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= rows:
        raise DistillError(f"teacher '{source}': its tokenizer has {largest + 1} token ids but the model's embedding "
                           f"has only {rows} rows; use the tokenizer this model was trained with")


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    with accelerator.main_process_first():  # the main process fetches and caches the demo teacher first
        tokenizer = load_tokenizer(config.teacher)
        teacher = load_teacher(config.teacher, accelerator.device)
    check_vocabulary(tokenizer, teacher, config.teacher.source)

    train_parts, heldout, counts = [], {}, {}
    for source in config.data.sources:
        if source.kind is SourceKind.TEACHER:
            tokens = sample_from_teacher(teacher, tokenizer, source.samples, config.run.seed, accelerator)
        else:
            with accelerator.main_process_first():  # datasets caches a hub dataset's tokenized text once
                tokens = (tokenize_files(source.files, tokenizer, source.text_field, scratch_dir=ctx.work_dir)
                          if source.kind is SourceKind.FILES else tokenize_hub_dataset(source, tokenizer))
        blocks = split_blocks(pack(tokens, config.data.block_size), source, config.data.max_heldout_blocks)
        train_parts.append(blocks.train)
        heldout[source.name] = blocks.heldout
        counts[source.name] = {"tokens": tokens.numel(), "train_blocks": len(blocks.train), "heldout_blocks": len(blocks.heldout)}
        ctx.log(f"[teacher] source '{source.name}': {tokens.numel()} tokens, "
                f"{len(blocks.train)} training and {len(blocks.heldout)} held-out blocks of {config.data.block_size}")
    train = torch.cat(train_parts)

    calibration = calibration_blocks(train, config.calibration.num_blocks)
    statistics = input_square_sums(teacher, calibration, config.prune.targets, accelerator,
                                   batch_size=config.calibration.batch_size, exclude=config.prune.exclude)

    teacher_ppl = {}
    for name, blocks in heldout.items():
        if len(blocks):
            scores = score_models({"teacher": teacher}, blocks, accelerator, config.calibration.batch_size, desc=f"teacher on {name}")
            teacher_ppl[name] = scores["teacher"]["ppl"]
            ctx.log(f"[teacher] perplexity on held-out '{name}': {teacher_ppl[name]:.2f}")

    if accelerator.is_main_process:
        write_token_blocks(ctx.work_dir, TokenBlocks(train, heldout))
        write_calibration(ctx.work_dir, statistics)
        tokenizer.save_pretrained(ctx.work_dir / "tokenizer")
    return {"sources": counts, "train_blocks": len(train), "calibration_blocks": len(calibration), "teacher_ppl": teacher_ppl}
