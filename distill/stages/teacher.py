"""Stage 1, teacher: load the dense teacher and make what later stages need from it.

Writes blocks/ (training blocks and each source's held-out blocks, in shards: distill.data.token_blocks),
calibration.safetensors (input statistics of every target projection), and the teacher's perplexity
on the held-out blocks. All ranks share the work: tokenizing or sampling, packing, calibration and
evaluation; nothing of a source is held whole.
"""

from __future__ import annotations

import shutil

from distill.run.artifacts import BLOCKS_DIR, read_token_blocks, write_calibration
from distill.sparsity.calibration import calibration_blocks, input_square_sums
from distill.data.corpus import file_pieces, hub_pieces, split_source, teacher_pieces
from distill.data.token_blocks import BlocksLayout, SourceBlocksLayout, source_dir, tokenize_pieces, write_layout, write_source_blocks
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


PIECES_DIR = "pieces"  # tokenized pieces, in the work dir until the blocks are packed


def source_pieces(ctx: StageContext, source, tokenizer, teacher):
    """The source's pieces (distill.data.corpus), in order, for tokenize_pieces."""
    config, accelerator = ctx.config, ctx.accelerator
    if source.kind is SourceKind.TEACHER:
        return teacher_pieces(teacher, tokenizer, source.samples, config.run.seed, accelerator.device, accelerator.autocast)
    if source.kind is SourceKind.FILES:
        return file_pieces(source.files, tokenizer, source.text_field)
    with accelerator.main_process_first():  # the main process downloads a (not streamed) hub dataset first
        return hub_pieces(source, tokenizer)


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    data = config.data
    with accelerator.main_process_first():  # the main process fetches and caches the demo teacher first
        tokenizer = load_tokenizer(config.teacher)
        teacher = load_teacher(config.teacher, accelerator.device)
    check_vocabulary(tokenizer, teacher, config.teacher.source)

    directory = ctx.work_dir / BLOCKS_DIR
    layout = BlocksLayout(data.block_size, data.shard_blocks, BlocksLayout.dtype_for(teacher.get_input_embeddings().num_embeddings))
    for index, source in enumerate(data.sources):
        pieces = ctx.work_dir / PIECES_DIR / str(index)
        budget = source.max_blocks * data.block_size
        piece_tokens = tokenize_pieces(source_pieces(ctx, source, tokenizer, teacher), pieces, accelerator, budget,
                                       desc=f"source '{source.name}'")
        tokens = sum(piece_tokens)
        split = split_source(tokens // data.block_size, source, data.max_heldout_blocks)
        write_source_blocks(pieces, piece_tokens, source_dir(directory, index), split, data.block_size, data.shard_blocks,
                            layout.dtype, accelerator)
        layout.sources.append(SourceBlocksLayout(source.name, tokens, split.train, split.heldout))
        ctx.log(f"[teacher] source '{source.name}': {tokens} tokens, "
                f"{split.train} training and {split.heldout} held-out blocks of {data.block_size}")
    accelerator.wait_for_everyone()  # every rank's shards are written
    if accelerator.is_main_process:
        write_layout(directory, layout)
    accelerator.wait_for_everyone()
    blocks = read_token_blocks(ctx.work_dir)

    calibration = calibration_blocks(blocks.train, config.calibration.num_blocks)
    statistics = input_square_sums(teacher, calibration, config.prune.targets, accelerator,
                                   batch_size=config.calibration.batch_size, exclude=config.prune.exclude)

    teacher_ppl = {}
    for name, heldout in blocks.heldout.items():
        if len(heldout):
            scores = score_models({"teacher": teacher}, heldout, accelerator, config.calibration.batch_size, desc=f"teacher on {name}")
            teacher_ppl[name] = scores["teacher"]["ppl"]
            ctx.log(f"[teacher] perplexity on held-out '{name}': {teacher_ppl[name]:.2f}")

    accelerator.wait_for_everyone()  # every rank is done (the pieces were last read before the layout)
    if accelerator.is_main_process:
        write_calibration(ctx.work_dir, statistics)
        tokenizer.save_pretrained(ctx.work_dir / "tokenizer")
        shutil.rmtree(ctx.work_dir / PIECES_DIR, ignore_errors=True)
    counts = {source.name: {"tokens": source.tokens, "train_blocks": source.train, "heldout_blocks": source.heldout}
              for source in layout.sources}
    return {"sources": counts, "train_blocks": len(blocks.train), "calibration_blocks": len(calibration), "teacher_ppl": teacher_ppl}
