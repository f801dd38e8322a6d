"""Attention sparsity: some KV heads attend only to the first `sink` tokens and the last `window` ones
(StreamingLLM's attention sinks plus a recent window; DuoAttention chooses such heads per KV head).

The one mechanism is a registered transformers attention function, `ATTENTION`. A model switched to
it (`set_attn_implementation`) runs its own modelling code unchanged, and every attention module
that carries an `AttentionHeads` child (`<attention>.attention_heads`) is read by the function:

  streaming  a bool per KV head: those heads (and every query head of their GQA group) see only the
             sink and the window
  gate       while heads are being chosen (select=distill): a value in [0, 1] per KV head mixing
             full (1) and streaming (0) attention, trained against the teacher
  recorder   while measuring: per KV head, the attention mass inside sink + window, the fraction of
             probabilities below PROBABILITY_FLOOR, and the entropy (HeadStatistics)

"Sink" and "window" count the keys a query is allowed to see, so the rule is the same for a training
block, a padded batch and a decode step: a key is kept when it is among the first `sink` allowed keys
or among the last `window` (the query itself included). A module without `AttentionHeads` runs plain
scaled-dot-product attention. Decode with a bounded KV cache (distill.runtime.kv_cache) hands the
function `BoundedKV` halves instead of key and value tensors: the full heads' whole history and the
streaming heads' sink and window only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from distill.config import AttentionConfig
from distill.losses import forward_kl

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


class AttentionHeads(nn.Module):
    """The sparse-attention state of one attention module (see the module docstring). `streaming` is
    not a persistent buffer: the sparsity spec is its one home on disk."""

    def __init__(self, kv_heads: int, sink: int, window: int, streaming=(), previous_attention: str = "sdpa"):
        super().__init__()
        self.sink, self.window = int(sink), int(window)
        self.previous_attention = previous_attention  # what remove_heads switches the model back to
        mask = torch.zeros(kv_heads, dtype=torch.bool)
        mask[list(streaming)] = True
        self.register_buffer("streaming", mask, persistent=False)
        self.any_streaming = bool(mask.any())  # on the host: the forward never reads the buffer to decide
        self.gate: nn.Parameter | None = None
        self.recorder: HeadStatistics | None = None

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


def _use_registered_attention(model: nn.Module) -> None:
    if model.config._attn_implementation == ATTENTION:
        return
    if not model._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not run attention through transformers' AttentionInterface, "
                         "so its heads cannot stream")
    model.set_attn_implementation(ATTENTION)


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


def _recorded_attention(heads: AttentionHeads, query, key, value, allowed, local, scaling) -> torch.Tensor:
    """Attention with its probabilities in the open (each head over the keys it sees: streaming heads
    over sink + window), added to `heads.recorder` per KV head."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    seen = torch.where(_per_query_head(heads.streaming, groups), local, allowed)
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    shape = (probs.shape[0], heads.kv_heads, groups, *probs.shape[2:])  # [B, KV, G, L, S]
    grouped, seen = probs.reshape(shape), seen.expand(probs.shape).reshape(shape)
    over = (0, 2, 3, 4)
    record = heads.recorder
    record.queries += float(shape[0] * groups * shape[3])
    record.local_mass += (grouped * local.expand(probs.shape).reshape(shape)).sum(over).double().cpu()
    record.below_floor += ((grouped < PROBABILITY_FLOOR) & seen).sum(over).double().cpu()
    record.allowed += seen.sum(over).double().cpu()
    record.entropy += -(grouped * grouped.clamp(min=1e-30).log()).sum(over).double().cpu()
    return (probs @ value.float()).to(query.dtype)


def heads_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask: torch.Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The registered attention function: query [B, Hq, L, D], key/value [B, Hkv, S, D] (or BoundedKV);
    returns [B, L, Hq, D] as transformers' attention functions do."""
    heads: AttentionHeads | None = getattr(module, "attention_heads", None)
    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"{type(module).__name__} modifies its attention scores ({', '.join(unsupported)}), which "
                         "scaled-dot-product attention, and so streaming heads, do not support")
    if isinstance(key, BoundedKV):
        return _bounded_attention(heads, query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
    allowed = allowed_keys(attention_mask, query.shape[2], key.shape[2], query.device)
    if heads is None or (heads.gate is None and heads.recorder is None and not heads.any_streaming):
        return _sdpa(query, key, value, allowed, scaling, dropout).transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]
    local = sink_and_window(allowed, heads.sink, heads.window)
    if heads.recorder is not None:
        out = _recorded_attention(heads, query, key, value, allowed, local, scaling)
    elif heads.gate is not None:  # DuoAttention's mix: gate 1 is full attention, 0 streaming
        full = _sdpa(query, key, value, allowed, scaling, dropout)
        stream = _sdpa(query, key, value, local, scaling, dropout)
        gate = _per_query_head(heads.gate.clamp(0, 1), groups).to(full.dtype)
        out = stream + gate * (full - stream)
    else:
        out = _sdpa(query, key, value, torch.where(_per_query_head(heads.streaming, groups), local, allowed),
                    scaling, dropout)
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


AttentionInterface.register(ATTENTION, heads_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same boolean masks sdpa gets


# --- measuring and choosing heads ------------------------------------------------------------------

@torch.no_grad()
def head_statistics(model: nn.Module, blocks: torch.Tensor, sink: int, window: int) -> dict[str, dict[str, list[float]]]:
    """{attention module name: HeadStatistics.summary()} of `model` on `blocks`, one block per forward
    (the probabilities of a long block are large), measured as the model runs: a streaming head's
    probabilities are over its sink and window (mass 1 inside them), a full head's over every key
    (its mass inside sink + window is what streaming it would keep)."""
    installed = {name: heads for name, heads in heads_of(model)}
    if not installed:
        install_heads(model, {}, sink, window)
    recorders = {}
    for name, heads in heads_of(model):
        heads.recorder = recorders[name] = HeadStatistics(heads.kv_heads)
        heads.sink, heads.window = sink, window
    device = next(model.parameters()).device
    try:
        for block in blocks:
            model(input_ids=block[None].to(device), use_cache=False)
    finally:
        for name, heads in heads_of(model):
            heads.recorder = None
            if name in installed:
                heads.sink, heads.window = installed[name].sink, installed[name].window
        if not installed:
            remove_heads(model)
    return {name: recorder.summary() for name, recorder in recorders.items()}


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


@dataclass
class GateTraining:
    """What select=distill learned: the gate of every KV head per module, and a row per step."""

    gates: dict[str, list[float]]
    history: list[dict] = field(default_factory=list)


def train_gates(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, attention: AttentionConfig,
                seed: int = 0) -> GateTraining:
    """DuoAttention's head selection against the teacher: every KV head of `student` mixes full and
    streaming attention by a gate (starting at 1, full), and only the gates train, on
    KL(teacher || student) + gate_penalty * mean(gate), the L1 push towards streaming; gates are
    clamped to [0, 1] after each step. The student is left as it came (no heads installed)."""
    install_heads(student, {}, attention.sink, attention.window)
    modules = heads_of(student)
    device = next(student.parameters()).device
    trainable = [parameter for parameter in student.parameters() if parameter.requires_grad]
    student.requires_grad_(False)
    for _, heads in modules:
        heads.gate = nn.Parameter(torch.ones(heads.kv_heads, device=device))
    gates = [heads.gate for _, heads in modules]
    optimizer = torch.optim.AdamW(gates, lr=attention.gate_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    history = []
    try:
        for step in range(attention.gate_steps):
            input_ids = blocks[torch.randint(len(blocks), (attention.gate_batch_size,), generator=generator)].to(device)
            with torch.no_grad():
                target = teacher(input_ids=input_ids, use_cache=False).logits.float()
            kl = forward_kl(student(input_ids=input_ids, use_cache=False).logits.float(), target)
            mean_gate = torch.cat(gates).mean()
            optimizer.zero_grad(set_to_none=True)
            (kl + attention.gate_penalty * mean_gate).backward()
            optimizer.step()
            with torch.no_grad():
                for gate in gates:
                    gate.clamp_(0, 1)
            history.append({"step": step + 1, "kl": float(kl.detach()), "mean_gate": float(torch.cat(gates).detach().mean())})
        learned = {name: heads.gate.detach().cpu().tolist() for name, heads in modules}
    finally:
        for _, heads in modules:
            heads.gate = None
        remove_heads(student)
        for parameter in trainable:
            parameter.requires_grad_(True)
    return GateTraining(learned, history)
