"""Attention sparsity: some KV heads attend only to the first `sink` tokens and the last `window` ones
(StreamingLLM's attention sinks plus a recent window; DuoAttention chooses such heads per KV head).

The one mechanism is a transformers attention function, `ATTENTION`, registered by
`register_attention()` where a model is switched to it (`install_heads`, `registered_attention`). A
model switched to it runs its own modelling code unchanged. Its state is the `AttentionHeads` child
of every attention module (`<attention>.attention_heads`), set when heads are installed and never
changed by a forward: a bool per KV head saying which heads (and every query head of their GQA
group) see only the sink and the window.

Measuring and gating are not state of the model: they are objects passed to one forward as keyword
arguments, which transformers hands on to the attention function of every layer, so nothing is set
on the model before a call or cleared after it:

  model(input_ids, head_probe=HeadProbe(sink, window))   adds, per KV head, the attention mass inside
      the probe's sink + window, the fraction of probabilities below PROBABILITY_FLOOR and the entropy
      (HeadStatistics) to the probe
  model(input_ids, head_gates=HeadGates(...))            mixes full (gate 1) and streaming (gate 0)
      attention per KV head by the gates' values (DuoAttention; distill.train.head_gates trains them)

Choosing the heads from those measures is distill.sparsity.head_selection's.

"Sink" and "window" count the keys a query is allowed to see, so the rule is the same for a training
block, a padded batch and a decode step: a key is kept when it is among the first `sink` allowed keys
or among the last `window` (the query itself included). A module without `AttentionHeads` runs plain
scaled-dot-product attention. Decode with a bounded KV cache (distill.runtime.kv_cache) hands the
function `BoundedKV` halves instead of key and value tensors: the full heads' whole history and the
streaming heads' sink and window only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask


ATTENTION = "distill_heads"  # the registered attention implementation's name
PROBABILITY_FLOOR = 1e-3  # the report's "attention probabilities below" this
# attention-function arguments that change the scores (Gemma 2's logit soft-capping, learned sinks);
# transformers' own sdpa refuses them too
UNSUPPORTED = ("softcap", "s_aux")


@dataclass
class HeadStatistics:
    """Running sums over query positions (and query heads of a group), per KV head."""

    kv_heads: int
    queries: torch.Tensor = None  # count of (query position, query head) pairs per KV head
    local_mass: torch.Tensor = None
    below_floor: torch.Tensor = None  # count of allowed probabilities below the floor
    allowed: torch.Tensor = None  # count of allowed (query, key) pairs
    entropy: torch.Tensor = None

    def __post_init__(self):
        for name in ("queries", "local_mass", "below_floor", "allowed", "entropy"):
            setattr(self, name, torch.zeros(self.kv_heads, dtype=torch.float64))

    def summary(self) -> dict[str, list[float]]:
        """Per KV head: mean attention mass inside sink + window, fraction of probabilities below the
        floor, mean entropy (nats)."""
        queries = self.queries.clamp(min=1)
        return {"local_mass": (self.local_mass / queries).tolist(),
                "below_floor": (self.below_floor / self.allowed.clamp(min=1)).tolist(),
                "entropy": (self.entropy / queries).tolist()}


class HeadProbe:
    """What one measuring forward fills: HeadStatistics per attention module (by layer index) of the
    attention mass inside its own `sink` + `window`, which need not be what streaming heads keep."""

    def __init__(self, sink: int, window: int):
        self.sink, self.window = int(sink), int(window)
        self.by_layer: dict[int, HeadStatistics] = {}

    def statistics(self, layer_idx: int, kv_heads: int) -> HeadStatistics:
        return self.by_layer.setdefault(layer_idx, HeadStatistics(kv_heads))


class HeadGates(nn.Module):
    """A gate per KV head of every attention module (by layer index), each in [0, 1] after `clamp_`:
    1 is full attention, 0 streaming over `sink` + `window`. Starts at 1 (full)."""

    def __init__(self, layer_indices: list[int], kv_heads: int, sink: int, window: int, device=None):
        super().__init__()
        self.sink, self.window = int(sink), int(window)
        self.rows = {layer: row for row, layer in enumerate(layer_indices)}
        self.values = nn.Parameter(torch.ones(len(layer_indices), kv_heads, device=device))

    def of_layer(self, layer_idx: int) -> torch.Tensor:
        return self.values[self.rows[layer_idx]].clamp(0, 1)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.values.clamp_(0, 1)


class AttentionHeads(nn.Module):
    """The sparse-attention state of one attention module (see the module docstring), fixed from
    install to removal. `streaming` is not a persistent buffer: the sparsity spec is its one home on disk."""

    def __init__(self, kv_heads: int, sink: int, window: int, streaming=(), previous_attention: str = "sdpa"):
        super().__init__()
        self.sink, self.window = int(sink), int(window)
        self.previous_attention = previous_attention  # what remove_heads switches the model back to
        mask = torch.zeros(kv_heads, dtype=torch.bool)
        mask[list(streaming)] = True
        self.register_buffer("streaming", mask, persistent=False)
        self.any_streaming = bool(mask.any())  # on the host: the forward never reads the buffer to decide

    @property
    def kv_heads(self) -> int:
        return self.streaming.numel()

    def extra_repr(self) -> str:
        return f"kv_heads={self.kv_heads}, sink={self.sink}, window={self.window}, streaming={self.streaming.tolist()}"


@dataclass
class BoundedKV:
    """The keys (or values) a bounded KV cache hands to attention: `full` [batch, full heads, length,
    dim] for the heads that see everything, `streaming` [batch, streaming heads, kept, dim] for the
    others at absolute `positions` [kept]; `length` positions exist in all."""

    full: torch.Tensor
    streaming: torch.Tensor
    full_heads: torch.Tensor  # KV head indices, int64
    streaming_heads: torch.Tensor
    positions: torch.Tensor
    length: int


def head_dim(module: nn.Module) -> int | None:
    """An attention module's head size (`head_dim`, or GPT-NeoX's `head_size`); None for other modules."""
    return getattr(module, "head_dim", None) or getattr(module, "head_size", None)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the attention module of every decoder layer, in layer order: the outermost
    submodule holding a `layer_idx` and a head size (how transformers builds attention modules;
    found by attribute, so projections swapped for sparse kernels do not hide it)."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if isinstance(head_dim(module), int) and isinstance(getattr(module, "layer_idx", None), int):
            found.setdefault(module.layer_idx, (name, module))
    if not found:
        raise ValueError(f"{type(model).__name__}: no attention modules (with a layer_idx and a head_dim) to stream")
    return [found[index] for index in sorted(found)]


def kv_head_count(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def install_heads(model: nn.Module, streaming: dict[str, list[int]], sink: int, window: int) -> None:
    """Give every attention module an AttentionHeads (its streaming KV heads from `streaming`, by
    module name; absent names stream none) and switch the model to the registered function."""
    kv_heads = kv_head_count(model)
    unknown = set(streaming) - {name for name, _ in attention_modules(model)}
    if unknown:
        raise ValueError(f"streaming heads for modules the model does not have: {sorted(unknown)[:3]}")
    device = next(model.parameters()).device
    modules = attention_modules(model)
    for name, _ in modules:
        heads = list(streaming.get(name, ()))
        if any(not 0 <= head < kv_heads for head in heads):
            raise ValueError(f"{name}: streaming KV heads {heads} outside 0..{kv_heads - 1}")
    previous = _installed_previous(model) or model.config._attn_implementation
    for name, module in modules:
        module.attention_heads = AttentionHeads(kv_heads, sink, window, streaming.get(name, ()), previous).to(device)
    _use_registered_attention(model)


def _installed_previous(model: nn.Module) -> str | None:
    """The attention implementation the model had before heads were first installed, if they are."""
    installed = heads_of(model)
    return installed[0][1].previous_attention if installed else None


def register_attention() -> None:
    """Register the attention function, and the boolean masks sdpa gets, under ATTENTION with
    transformers (its registries are global; registering again replaces the entry with itself)."""
    AttentionInterface.register(ATTENTION, heads_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _use_registered_attention(model: nn.Module) -> None:
    if model.config._attn_implementation == ATTENTION:
        return
    if not model._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not run attention through transformers' AttentionInterface, "
                         "so its heads cannot stream")
    register_attention()
    model.set_attn_implementation(ATTENTION)


@contextmanager
def registered_attention(model: nn.Module):
    """`model` on the registered function for the block (to measure or gate it with a probe or gates
    passed to its forward), back on its own implementation after, heads installed or not."""
    previous = model.config._attn_implementation
    _use_registered_attention(model)
    try:
        yield model
    finally:
        if previous != ATTENTION:
            model.set_attn_implementation(previous)


def streaming_heads(model: nn.Module) -> dict[str, list[int]]:
    """{attention module name: its streaming KV heads} for the modules with any."""
    return {name: torch.nonzero(module.attention_heads.streaming).flatten().tolist()
            for name, module in model.named_modules()
            if isinstance(getattr(module, "attention_heads", None), AttentionHeads) and module.attention_heads.any_streaming}


def heads_of(model: nn.Module) -> list[tuple[str, AttentionHeads]]:
    return [(name, module.attention_heads) for name, module in model.named_modules()
            if isinstance(getattr(module, "attention_heads", None), AttentionHeads)]


def remove_heads(model: nn.Module) -> None:
    """Every attention module back to full attention, the model back to the attention implementation
    it had before heads were installed (in place)."""
    previous = _installed_previous(model) or "sdpa"
    for _, module in attention_modules(model):
        if hasattr(module, "attention_heads"):
            del module.attention_heads
    if model.config._attn_implementation == ATTENTION:
        model.set_attn_implementation(previous)


# --- the masks -----------------------------------------------------------------------------------

def allowed_keys(attention_mask: torch.Tensor | None, q_length: int, kv_length: int, device) -> torch.Tensor:
    """The keys each query may see, bool [batch or 1, 1, q_length, kv_length]: the given mask (bool,
    or additive float), or causal with the queries as the last `q_length` positions."""
    if attention_mask is None:
        query = torch.arange(kv_length - q_length, kv_length, device=device)
        return (torch.arange(kv_length, device=device)[None, :] <= query[:, None])[None, None]
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[..., -kv_length:]


def sink_and_window(allowed: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """`allowed` kept only at the first `sink` and the last `window` allowed keys of every query."""
    ranks = allowed.to(torch.int32)
    from_start = ranks.cumsum(-1)
    from_end = ranks.flip(-1).cumsum(-1).flip(-1)
    return allowed & ((from_start <= sink) | (from_end <= window))


def _per_query_head(per_kv_head: torch.Tensor, groups: int) -> torch.Tensor:
    return per_kv_head.repeat_interleave(groups)[None, :, None, None]


def _sdpa(query, key, value, mask, scaling, dropout):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout,
                                          enable_gqa=key.shape[1] != query.shape[1])


def _recorded_attention(record: HeadStatistics, query, key, value, seen, measured, scaling) -> torch.Tensor:
    """Attention with its probabilities in the open (each head over the keys it `seen`s: streaming
    heads over their sink + window), added to `record` per KV head, with the mass inside `measured`."""
    kv_heads, groups = key.shape[1], query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    shape = (probs.shape[0], kv_heads, groups, *probs.shape[2:])  # [B, KV, G, L, S]
    grouped, seen = probs.reshape(shape), seen.expand(probs.shape).reshape(shape)
    over = (0, 2, 3, 4)
    record.queries += float(shape[0] * groups * shape[3])
    record.local_mass += (grouped * measured.expand(probs.shape).reshape(shape)).sum(over).double().cpu()
    record.below_floor += ((grouped < PROBABILITY_FLOOR) & seen).sum(over).double().cpu()
    record.allowed += seen.sum(over).double().cpu()
    record.entropy += -(grouped * grouped.clamp(min=1e-30).log()).sum(over).double().cpu()
    return (probs @ value.float()).to(query.dtype)


def _seen_keys(heads: AttentionHeads | None, allowed: torch.Tensor, groups: int) -> torch.Tensor:
    """The keys each query head sees: its streaming KV head's sink + window, or every allowed key."""
    if heads is None or not heads.any_streaming:
        return allowed
    local = sink_and_window(allowed, heads.sink, heads.window)
    return torch.where(_per_query_head(heads.streaming, groups), local, allowed)


def _gated_attention(gates: HeadGates, layer_idx: int, query, key, value, allowed, scaling, dropout) -> torch.Tensor:
    """DuoAttention's mix per KV head: gate 1 is full attention, 0 streaming over the gates' sink + window."""
    full = _sdpa(query, key, value, allowed, scaling, dropout)
    stream = _sdpa(query, key, value, sink_and_window(allowed, gates.sink, gates.window), scaling, dropout)
    gate = _per_query_head(gates.of_layer(layer_idx), query.shape[1] // key.shape[1]).to(full.dtype)
    return stream + gate * (full - stream)


def heads_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask: torch.Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None, head_probe: HeadProbe | None = None,
                    head_gates: HeadGates | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The registered attention function: query [B, Hq, L, D], key/value [B, Hkv, S, D] (or BoundedKV);
    returns [B, L, Hq, D] as transformers' attention functions do. `head_probe` and `head_gates` come
    from the model's forward call (see the module docstring)."""
    heads: AttentionHeads | None = getattr(module, "attention_heads", None)
    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"{type(module).__name__} modifies its attention scores ({', '.join(unsupported)}), which "
                         "scaled-dot-product attention, and so streaming heads, do not support")
    if isinstance(key, BoundedKV):
        return _bounded_attention(heads, query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
    allowed = allowed_keys(attention_mask, query.shape[2], key.shape[2], query.device)
    groups = query.shape[1] // key.shape[1]
    if head_gates is not None:
        out = _gated_attention(head_gates, module.layer_idx, query, key, value, allowed, scaling, dropout)
    elif head_probe is not None:
        record = head_probe.statistics(module.layer_idx, key.shape[1])
        measured = sink_and_window(allowed, head_probe.sink, head_probe.window)
        out = _recorded_attention(record, query, key, value, _seen_keys(heads, allowed, groups), measured, scaling)
    else:
        out = _sdpa(query, key, value, _seen_keys(heads, allowed, groups), scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def _bounded_attention(heads: AttentionHeads, query, key: BoundedKV, value: BoundedKV, attention_mask, scaling):
    """Full heads over every position, streaming heads over the kept ones, back in head order."""
    batch, _, q_length, dim = query.shape
    kv_heads = key.full_heads.numel() + key.streaming_heads.numel()
    grouped = query.reshape(batch, kv_heads, -1, q_length, dim)
    out = torch.empty_like(grouped)
    allowed = allowed_keys(attention_mask, q_length, key.length, query.device)
    if attention_mask is not None and not bool((allowed == allowed_keys(None, q_length, key.length, query.device)).all()):
        raise ValueError("a bounded KV cache keeps absolute positions and runs causal, unpadded batches only; "
                         "generate one sequence at a time, or use the full cache")
    if key.full_heads.numel():
        part = grouped[:, key.full_heads].flatten(1, 2)
        out[:, key.full_heads] = _sdpa(part, key.full, value.full, allowed, scaling, 0.0).reshape(
            batch, -1, grouped.shape[2], q_length, dim)
    if key.streaming_heads.numel():
        kept = sink_and_window(allowed[..., key.positions], heads.sink, heads.window)
        part = grouped[:, key.streaming_heads].flatten(1, 2)
        out[:, key.streaming_heads] = _sdpa(part, key.streaming, value.streaming, kept, scaling, 0.0).reshape(
            batch, -1, grouped.shape[2], q_length, dim)
    return out.reshape(batch, -1, q_length, dim)
