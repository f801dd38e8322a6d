"""A KV cache bounded for streaming heads: a layer's full heads keep every position, its streaming
heads (distill.sparsity.attention) keep only the first `sink` positions and the last `window - 1`
(the next query completes the window). At a context of C tokens a streaming head holds
sink + window - 1 entries instead of C.

The cache speaks transformers' Cache protocol, so `generate` and a hand-written decode loop use it
unchanged; its `update` hands the registered attention function a `BoundedKV` per keys and values,
and the function runs the full and the streaming heads each over what they keep. Padded batches are
refused: positions are absolute, so a left-padded row would keep pad tokens as its sinks.

    cache = StreamingCache(model)                  # model with streaming heads installed
    model.generate(input_ids, cache=cache, max_new_tokens=64)

`use_streaming_cache(model)` makes a model build one whenever it is called with a fresh default
cache (as `generate` does), which is what `load_sparse_model` sets up.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from distill.sparsity.attention import BoundedKV, attention_modules, kv_head_count


class StreamingLayer(DynamicLayer):
    """One decoder layer's cache: `self.keys`/`self.values` hold the full heads, `stream_keys`/
    `stream_values` the streaming heads at `positions`."""

    is_croppable = False

    def __init__(self, streaming: list[int], kv_heads: int, sink: int, window: int):
        super().__init__()
        self.streaming_heads = torch.tensor(sorted(streaming), dtype=torch.long)
        self.full_heads = torch.tensor([head for head in range(kv_heads) if head not in set(streaming)], dtype=torch.long)
        self.sink, self.window = sink, window
        self.length = 0
        self.stream_keys = self.stream_values = self.positions = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.full_heads, self.streaming_heads = self.full_heads.to(self.device), self.streaming_heads.to(self.device)
        self.keys, self.values = key_states[:, self.full_heads, :0], value_states[:, self.full_heads, :0]
        self.stream_keys = key_states[:, self.streaming_heads, :0]
        self.stream_values = value_states[:, self.streaming_heads, :0]
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[BoundedKV, BoundedKV]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states[:, self.full_heads]], dim=-2)
        self.values = torch.cat([self.values, value_states[:, self.full_heads]], dim=-2)
        stream_keys = torch.cat([self.stream_keys, key_states[:, self.streaming_heads]], dim=-2)
        stream_values = torch.cat([self.stream_values, value_states[:, self.streaming_heads]], dim=-2)
        positions = torch.cat([self.positions, torch.arange(self.length, self.length + new, device=self.device)])
        self.length += new
        keys = BoundedKV(self.keys, stream_keys, self.full_heads, self.streaming_heads, positions, self.length)
        values = BoundedKV(self.values, stream_values, self.full_heads, self.streaming_heads, positions, self.length)
        kept = (positions < self.sink) | (positions >= self.length - (self.window - 1))
        self.stream_keys, self.stream_values = stream_keys[:, :, kept], stream_values[:, :, kept]
        self.positions = positions[kept]
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # the full heads' positions; streaming heads pick theirs

    def reset(self) -> None:
        self.keys = self.values = self.stream_keys = self.stream_values = self.positions = None
        self.length, self.is_initialized = 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "stream_keys", "stream_values"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a streaming heads cache drops old positions; it cannot be cropped")

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(tensor.numel() * tensor.element_size()
                   for tensor in (self.keys, self.values, self.stream_keys, self.stream_values))


class StreamingCache(Cache):
    """A Cache with a StreamingLayer for every decoder layer that has streaming heads and a plain
    DynamicLayer for the others."""

    def __init__(self, model: nn.Module):
        kv_heads, layers = kv_head_count(model), []
        for _, module in attention_modules(model):
            heads = getattr(module, "attention_heads", None)
            streaming = torch.nonzero(heads.streaming).flatten().tolist() if heads is not None else []
            layers.append(StreamingLayer(streaming, kv_heads, heads.sink, heads.window) if streaming else DynamicLayer())
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of keys and values held now."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, StreamingLayer):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total


def _swap_default_cache(model: nn.Module, args: tuple, kwargs: dict):
    cache = kwargs.get("cache")
    if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and cache.get_seq_length() == 0:
        kwargs["cache"] = StreamingCache(model)
    return args, kwargs


def use_streaming_cache(model: nn.Module) -> None:
    """From now on a call of `model` with a fresh, generate-made DynamicCache gets a StreamingCache
    instead; a cache the caller made is left alone."""
    if not getattr(model, "_streaming_cache_hook", None):
        model._streaming_cache_hook = model.register_forward_pre_hook(_swap_default_cache, with_kwargs=True)
