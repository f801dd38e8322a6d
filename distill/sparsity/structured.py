"""Structured patterns that span several projections, and shrinking them into smaller dense models.

  mlp_channels  whole intermediate channels of every gated MLP: a row of gate_proj and up_proj and
                the matching column of down_proj go together
  heads         whole attention head groups: one key/value head with every query head that shares
                it (a single head without grouped-query attention), i.e. rows of q/k/v_proj and the
                matching columns of o_proj
In every layer the lowest-scoring `sparsity` fraction of channels (or head groups) is removed, a
channel's score being the sum of its weights' scores in all projections it spans. The masks stay
per projection (whole rows or whole columns), so training, checkpoints and the structure check treat
them like any other mask, and `shrink` later cuts the removed rows and columns out for real: the
result is a plain, smaller Hugging Face model (fewer intermediate channels or heads in its config).
"""

from __future__ import annotations

import torch
from torch import nn

from distill.sparsity.prune_config import PatternKind
from distill.errors import DistillError
from distill.targets import decoder_layers

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _modules_with(model: nn.Module, parts: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if all(isinstance(getattr(module, part, None), nn.Linear) for part in parts)]


def _keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the highest-scoring (1 - sparsity) fraction of entries (at least one kept)."""
    removed = min(int(round(len(scores) * sparsity)), len(scores) - 1)
    keep = torch.ones(len(scores), dtype=torch.bool)
    if removed:
        keep[scores.topk(removed, largest=False).indices.cpu()] = False
    return keep


def _head_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(key/value heads, head dim, query heads per key/value head), the same in every layer."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim, heads // kv_heads


def structured_masks(model: nn.Module, kind: str, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """{projection name: bool mask} for pattern `kind` (mlp_channels or heads) from per-weight scores
    of every projection it spans."""
    parts = MLP_PARTS if PatternKind(kind) is PatternKind.MLP_CHANNELS else ATTENTION_PARTS
    groups = _modules_with(model, parts)
    if not groups:
        found = decoder_layers(model)
        layer = [path for path, module in found[1][0].named_modules() if isinstance(module, nn.Linear)] if found else []
        raise DistillError(f"pattern {kind} needs {', '.join(parts)} as separate projections; {type(model).__name__}'s "
                           f"decoder layers have {', '.join(layer) or 'none'} (fused or otherwise named): use pattern nm")
    kv_heads, head_dim, per_group = _head_geometry(model)
    masks = {}
    for name, _ in groups:
        names = {part: f"{name}.{part}" for part in parts}
        missing = [full for full in names.values() if full not in scores]
        if missing:
            raise DistillError(f"pattern {kind} needs scores for {', '.join(missing)}: add them to prune.targets")
        s = {part: scores[full].float() for part, full in names.items()}
        if PatternKind(kind) is PatternKind.MLP_CHANNELS:
            channel = s["gate_proj"].sum(1) + s["up_proj"].sum(1) + s["down_proj"].sum(0)
            keep = _keep(channel, sparsity).to(channel.device)
            rows = keep[:, None]
            masks[names["gate_proj"]] = rows.expand_as(s["gate_proj"]).clone()
            masks[names["up_proj"]] = rows.expand_as(s["up_proj"]).clone()
            masks[names["down_proj"]] = keep[None, :].expand_as(s["down_proj"]).clone()
        else:
            group_score = (s["q_proj"].sum(1).reshape(kv_heads, per_group * head_dim).sum(1)
                           + s["k_proj"].sum(1).reshape(kv_heads, head_dim).sum(1)
                           + s["v_proj"].sum(1).reshape(kv_heads, head_dim).sum(1)
                           + s["o_proj"].sum(0).reshape(kv_heads, per_group * head_dim).sum(1))
            keep = _keep(group_score, sparsity).to(group_score.device)
            q_rows = keep.repeat_interleave(per_group * head_dim)
            kv_rows = keep.repeat_interleave(head_dim)
            masks[names["q_proj"]] = q_rows[:, None].expand_as(s["q_proj"]).clone()
            masks[names["k_proj"]] = kv_rows[:, None].expand_as(s["k_proj"]).clone()
            masks[names["v_proj"]] = kv_rows[:, None].expand_as(s["v_proj"]).clone()
            masks[names["o_proj"]] = q_rows[None, :].expand_as(s["o_proj"]).clone()
    return masks


def structure_violations(mask: torch.Tensor) -> int:
    """Entries of `mask` that break a whole-rows-and-columns structure (0: it holds)."""
    rows, cols = mask.any(1), mask.any(0)
    return int((mask != (rows[:, None] & cols[None, :])).sum())


def _cut(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight, bias = weight[rows], (bias[rows] if bias is not None else None)
    if cols is not None:
        weight = weight[:, cols]
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        smaller.weight.copy_(weight)
        if bias is not None:
            smaller.bias.copy_(bias)
    return smaller


@torch.no_grad()
def shrink(model: nn.Module, kind: str) -> dict[str, int]:
    """Cut the zero rows and columns a structured pattern left out of a dense-with-zeros model, in
    place, and update its config; returns {config key: new value}. Every layer must keep the same
    number of channels or heads (true for a per-layer fraction of equal-sized layers)."""
    parts = MLP_PARTS if PatternKind(kind) is PatternKind.MLP_CHANNELS else ATTENTION_PARTS
    groups = _modules_with(model, parts)
    kv_heads, head_dim, per_group = _head_geometry(model)
    kept_counts = set()
    for name, module in groups:
        if PatternKind(kind) is PatternKind.MLP_CHANNELS:
            keep = (module.gate_proj.weight != 0).any(1) | (module.up_proj.weight != 0).any(1) | (module.down_proj.weight != 0).any(0)
            module.gate_proj, module.up_proj = _cut(module.gate_proj, rows=keep), _cut(module.up_proj, rows=keep)
            module.down_proj = _cut(module.down_proj, cols=keep)
            kept_counts.add(int(keep.sum()))
        else:
            alive = ((module.q_proj.weight != 0).any(1).reshape(kv_heads, -1).any(1)
                     | (module.k_proj.weight != 0).any(1).reshape(kv_heads, -1).any(1)
                     | (module.v_proj.weight != 0).any(1).reshape(kv_heads, -1).any(1)
                     | (module.o_proj.weight != 0).any(0).reshape(kv_heads, -1).any(1))
            q_keep, kv_keep = alive.repeat_interleave(per_group * head_dim), alive.repeat_interleave(head_dim)
            module.q_proj, module.o_proj = _cut(module.q_proj, rows=q_keep), _cut(module.o_proj, cols=q_keep)
            module.k_proj, module.v_proj = _cut(module.k_proj, rows=kv_keep), _cut(module.v_proj, rows=kv_keep)
            kept_counts.add(int(alive.sum()))
    if len(kept_counts) != 1:
        raise DistillError(f"cannot shrink {kind}: layers keep different counts {sorted(kept_counts)}")
    kept = kept_counts.pop()
    config = model.config
    if PatternKind(kind) is PatternKind.MLP_CHANNELS:
        changes = {"intermediate_size": kept}
    else:
        changes = {"num_attention_heads": kept * per_group, "num_key_value_heads": kept, "head_dim": head_dim}
        for _, module in groups:  # attention modules cache their geometry
            for attribute, value in (("num_heads", changes["num_attention_heads"]),
                                     ("num_key_value_heads", kept), ("head_dim", head_dim)):
                if hasattr(module, attribute):
                    setattr(module, attribute, value)
    for key, value in changes.items():
        setattr(config, key, value)
    return changes
