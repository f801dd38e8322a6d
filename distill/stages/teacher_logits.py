"""Stage 2, teacher_logits: cache the teacher's k most likely tokens at every training position, so
distill can train without running the teacher (train.loss.teacher_topk > 0; otherwise a no-op).

Writes the cache (distill.data.teacher_cache) into `topk/`: shards of `train.loss.teacher_cache_shard`
training blocks, shard s written by rank s mod world as soon as its blocks are scored, in the codec of
`train.loss.teacher_cache` (compact by default). Nothing is gathered: memory holds one shard per rank
whatever the corpus, the files do not depend on the number of processes, and a resumed run keeps the
shards it finds complete.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from distill.data.teacher_cache import CacheLayout, CacheWriter, TeacherCache, describe, teacher_topk
from distill.errors import DistillError
from distill.losses import TopK
from distill.models import load_teacher
from distill.run.artifacts import TOPK_DIR, read_token_blocks
from distill.run.pipeline import StageContext


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    loss = config.train.loss
    k = loss.teacher_topk
    if not k:
        return {"teacher_topk": 0}
    blocks = read_token_blocks(ctx.stage_dir("teacher")).train
    teacher = load_teacher(config.teacher, accelerator.device)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise DistillError(f"config key 'train.loss.teacher_topk': {k} is more than the teacher's {vocab} tokens")
    layout = CacheLayout(blocks=len(blocks), positions=blocks.shape[1], k=k, vocab=vocab, codec=loss.teacher_cache.value,
                         shard_blocks=loss.teacher_cache_shard)
    directory = ctx.work_dir / TOPK_DIR
    writer = CacheWriter(directory, layout)
    writer.start(accelerator.is_main_process)
    accelerator.wait_for_everyone()  # the layout is on disk before any rank checks its shards against it
    writer.start(False)
    mine = range(accelerator.process_index, layout.shards, accelerator.num_processes)
    todo = [shard for shard in mine if not writer.complete(shard)]
    kept = len(mine) - len(todo)
    if kept and accelerator.is_main_process:
        ctx.log(f"[teacher_logits] resuming: {kept} complete shard(s) of this rank kept")
    mass = torch.zeros(2, dtype=torch.float64)  # the top-k mass summed over this rank's new positions, and their count
    for shard in tqdm(todo, desc="teacher top-k shards", disable=not accelerator.is_main_process):
        span = layout.shard_range(shard)
        scored = teacher_topk(teacher, blocks[span.start:span.stop], k, config.train.micro_batch_size, accelerator)
        writer.write_shard(shard, {block: TopK(scored.logp[i], scored.index[i]) for i, block in enumerate(span)})
        mass += torch.tensor([float(scored.logp.float().exp().sum(-1).sum()), scored.logp[..., 0].numel()],
                             dtype=torch.float64)
    mass = accelerator.reduce(mass.to(accelerator.device), reduction="sum").cpu()
    cache = TeacherCache(directory)
    cache.check(len(blocks), blocks.shape[1], k)
    facts = describe(cache)
    summary = {"teacher_topk": k, "blocks": len(blocks), "codec": layout.codec, "shards": layout.shards,
               "bytes_per_token": round(facts["bytes_per_token"], 1)}
    held = ""
    if mass[1] > 0:  # over the shards this launch scored (a resumed run's kept shards are not read again)
        summary["mean_topk_mass"] = float(mass[0] / mass[1])
        held = f"; they hold {summary['mean_topk_mass']:.1%} of the teacher's probability on average"
    ctx.log(f"[teacher_logits] top-{k} of {len(blocks)} blocks cached in {layout.shards} shard(s), {layout.codec}: "
            f"{facts['bytes_per_token']:.0f} bytes per token{held}")
    return summary
