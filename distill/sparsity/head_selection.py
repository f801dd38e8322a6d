"""Which KV heads stream, and what streaming saves: the prune side of attention sparsity.

The mechanism (the registered attention function, the heads it installs) is distill.sparsity.attention;
this module measures a model through it and chooses heads from scores:

  head_statistics   per KV head, the attention mass inside sink + window (select=mass streams the
                    heads that already keep most of it), small probabilities and entropy (the report)
  choose_streaming  the fraction of heads with the highest (or lowest) score, model-wide; the scores
                    are those masses or the gates distill.train.head_gates trains (select=distill)
  kv_cache_bytes    the keys and values held at a context, dense against streaming heads
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.sparsity.attention import HeadProbe, attention_modules, head_dim, kv_head_count, registered_attention


@torch.no_grad()
def head_statistics(model: nn.Module, blocks: torch.Tensor, sink: int, window: int) -> dict[str, dict[str, list[float]]]:
    """{attention module name: HeadStatistics.summary()} of `model` on `blocks`, one block per forward
    (the probabilities of a long block are large), measured as the model runs: a streaming head's
    probabilities are over its own sink and window, a full head's over every key (its mass inside
    `sink` + `window` is what streaming it would keep). The model is left as it came."""
    probe = HeadProbe(sink, window)
    device = next(model.parameters()).device
    with registered_attention(model):
        for block in blocks:
            model(input_ids=block[None].to(device), use_cache=False, head_probe=probe)
    modules = attention_modules(model)
    missing = [name for name, module in modules if module.layer_idx not in probe.by_layer]
    if missing:
        raise ValueError(f"{type(model).__name__} does not hand its forward's keyword arguments to the attention "
                         f"function of {missing[0]}, so its heads cannot be measured")
    return {name: probe.by_layer[module.layer_idx].summary() for name, module in modules}


def choose_streaming(scores: dict[str, list[float]], fraction: float, stream_highest: bool) -> dict[str, list[int]]:
    """The `fraction` of all KV heads (rounded) with the highest (or lowest) score, model-wide, as
    {attention module name: sorted KV head indices}; ties go to the earlier head."""
    ranked = [(score, name, head) for name, values in scores.items() for head, score in enumerate(values)]
    count = round(fraction * len(ranked))
    order = sorted(range(len(ranked)), key=lambda i: (-ranked[i][0] if stream_highest else ranked[i][0], i))
    chosen: dict[str, list[int]] = {}
    for i in order[:count]:
        _, name, head = ranked[i]
        chosen.setdefault(name, []).append(head)
    return {name: sorted(chosen[name]) for name in scores if name in chosen}


@dataclass
class KVBytes:
    dense: int
    sparse: int

    @property
    def ratio(self) -> float:
        return self.sparse / self.dense


def kv_cache_bytes(model: nn.Module, streaming: dict[str, list[int]], context: int, sink: int, window: int,
                   bytes_per_value: int = 2) -> KVBytes:
    """Keys and values held at `context` tokens, dense against streaming heads that keep sink + window
    (the working set of the next decode step: what it reads)."""
    modules = attention_modules(model)
    kv_heads, size = kv_head_count(model), head_dim(modules[0][1])
    per_position = 2 * size * bytes_per_value  # a key and a value
    dense = len(modules) * kv_heads * context * per_position
    streamed = sum(len(heads) for heads in streaming.values())
    sparse = dense - streamed * (context - min(context, sink + window)) * per_position
    return KVBytes(dense, sparse)
