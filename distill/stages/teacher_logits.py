"""Stage 2, teacher_logits: cache the teacher's k most likely tokens at every training position, so
distill can train without running the teacher (train.loss.teacher_topk > 0; otherwise a no-op).

Writes teacher_topk.safetensors: `logp` [blocks, positions, k] float16 log-probabilities (<= 0, where
float16 is finer than the bf16 logits a GPU teacher produces) and `index` [blocks, positions, k] int32
token ids, in the order of the teacher stage's training blocks. Every rank scores its share of each
round of blocks; the shares are gathered to the main process, so the file does not depend on the
number of processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from distill.errors import DistillError
from distill.losses import TopK, logit_transform
from distill.models import load_teacher
from distill.run.pipeline import StageContext
from distill.run.artifacts import read_token_blocks, write_teacher_topk



@torch.no_grad()
def teacher_topk(teacher: nn.Module, blocks: torch.Tensor, k: int, batch_size: int, accelerator: Accelerator,
                 chunk_tokens: int = 4096) -> TopK | None:
    """The teacher's top-k log-probabilities and token ids for every position of `blocks` [n, length];
    returned on the main process (None elsewhere). Log-softmax runs a chunk of positions at a time, so
    no batch-sized fp32 logits tensor exists."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise DistillError(f"config key 'train.loss.teacher_topk': {k} is more than the teacher's {vocab} tokens")
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    head, transform = teacher.get_output_embeddings(), logit_transform(teacher)  # as the teacher's forward
    logps, indices = [], []
    per_round = world * batch_size
    for start in tqdm(range(0, len(blocks), per_round), desc="teacher top-k", disable=not accelerator.is_main_process):
        mine = blocks[start + rank * batch_size:start + (rank + 1) * batch_size]
        padded = torch.cat([mine, blocks[:1].expand(batch_size - len(mine), -1)])  # same shape on every rank
        with accelerator.autocast():
            hidden = teacher.get_decoder()(input_ids=padded.to(device), use_cache=False).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1])
        tops = [F.log_softmax(transform(head(rows[i:i + chunk_tokens]).float()), dim=-1).topk(k, dim=-1)
                for i in range(0, len(rows), chunk_tokens)]
        logp = torch.cat([top.values for top in tops]).reshape(*padded.shape, k).half()
        index = torch.cat([top.indices for top in tops]).reshape(*padded.shape, k).int()
        logp, index = accelerator.gather(logp), accelerator.gather(index)  # [world * batch, length, k], by rank
        if accelerator.is_main_process:
            real = [min(max(len(blocks) - start - r * batch_size, 0), batch_size) for r in range(world)]
            keep = torch.cat([torch.arange(r * batch_size, r * batch_size + count) for r, count in enumerate(real)])
            logps.append(logp[keep.to(logp.device)].cpu())
            indices.append(index[keep.to(index.device)].cpu())
    return TopK(torch.cat(logps), torch.cat(indices)) if accelerator.is_main_process else None


def run(ctx: StageContext) -> dict:
    config, accelerator = ctx.config, ctx.accelerator
    k = config.train.loss.teacher_topk
    if not k:
        return {"teacher_topk": 0}
    blocks = read_token_blocks(ctx.stage_dir("teacher")).train
    teacher = load_teacher(config.teacher, accelerator.device)
    cached = teacher_topk(teacher, blocks, k, config.train.micro_batch_size, accelerator)
    if accelerator.is_main_process:
        write_teacher_topk(ctx.work_dir, cached)
        covered = float(cached.logp.float().exp().sum(-1).mean())
        ctx.log(f"[teacher_logits] top-{k} of {len(blocks)} blocks cached; they hold {covered:.1%} of the "
                f"teacher's probability on average")
        return {"teacher_topk": k, "blocks": len(blocks), "mean_topk_mass": covered}
    return {"teacher_topk": k, "blocks": len(blocks)}
