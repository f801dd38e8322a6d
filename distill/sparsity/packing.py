"""The packed N:M format: only the kept weights and their positions inside each group.

For a masked weight W of shape [out, in] with N:M sparsity (G = in / M groups per row):
  <name>.values   [out, G * N], W's dtype: the kept weights of each group, in ascending position
  <name>.indices  [out, G * N], uint8: the position (0 .. M-1) of each kept weight inside its group
so that W[r, g*M + indices[r, g*N + k]] = values[r, g*N + k] and every other entry of W is zero.
Indices take one byte each here, for a format any reader can follow; the sparse runtime repacks them
into the layouts its kernels read (distill.runtime.cpu_layout on CPU, distill.runtime.layout on GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill.sparsity.spec import QUANT_METHOD, Layout, SparsitySpec, write_sparsity_spec
from distill.errors import DistillError
from distill.io import save_tensors, write_json
from distill.sparsity.patterns import NM

FORMAT = f"distill.{Layout.PACKED.value}"  # the tensors file's metadata


def quantization_config(spec: SparsitySpec) -> dict:
    """What a packed dir's config.json says of its format: the method and the whole spec."""
    return {"quant_method": QUANT_METHOD, "spec": spec.to_json()}


def pack_nm(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    groups = mask.reshape(rows, cols // m, m)
    if not bool((groups.sum(-1) == n).all()):
        raise DistillError(f"mask does not keep exactly {n} of every {m} weights")
    # a stable sort of "not kept" puts the n kept positions first, in ascending order
    positions = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    values = weight.reshape(rows, cols // m, m).gather(-1, positions)
    return values.reshape(rows, -1).contiguous(), positions.to(torch.uint8).reshape(rows, -1).contiguous()


def unpack_nm(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, kept = values.shape
    groups = kept // n
    dense = torch.zeros(rows, groups, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, indices.reshape(rows, groups, n).long(), values.reshape(rows, groups, n))
    return dense.reshape(rows, groups * m)


def save_packed(model: nn.Module, spec: SparsitySpec, directory: Path) -> None:
    """Write `model` (dense weights with zeros where pruned) in packed form: config, tensors, spec.
    `spec.pattern` must be N:M; `spec.masked` names the projections to pack."""
    if not isinstance(spec.pattern, NM):
        raise DistillError(f"the packed format holds N:M patterns, not {spec.pattern.describe()}")
    n, m, masked = spec.pattern.n, spec.pattern.m, spec.masked
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {f"{name}.weight" for name in masked}
    tensors = {}
    for name, tensor in model.named_parameters():  # shared (tied) parameters appear once
        if name in weights:
            mask = tensor != 0
            values, indices = pack_nm(tensor.detach(), full_groups_mask(mask, n, m, name), n, m)
            tensors[f"{name[:-len('.weight')]}.values"] = values
            tensors[f"{name[:-len('.weight')]}.indices"] = indices
        else:
            tensors[name] = tensor.detach()
    spec = spec.replace(masked=list(masked), layout=Layout.PACKED)
    config = model.config.to_diff_dict()
    config["quantization_config"] = quantization_config(spec)
    write_json(directory / "config.json", config)
    save_tensors(directory / "model.safetensors", tensors, metadata={"format": FORMAT})
    write_sparsity_spec(directory, spec)


def full_groups_mask(nonzero: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """A mask with exactly n kept per group that covers every non-zero: groups that lost a weight to
    an exact zero keep explicit zeros in their lowest free positions. Raises when a group holds more
    than n non-zeros."""
    rows, cols = nonzero.shape
    groups = nonzero.reshape(rows, cols // m, m)
    counts = groups.sum(-1, keepdim=True)
    crowded = int((counts > n).sum())
    if crowded:
        raise DistillError(f"{name}: not {n}:{m} sparse ({crowded} groups of {m} hold more than {n} non-zeros)")
    free_rank = (~groups).cumsum(-1)  # 1, 2, ... over the zero positions of each group
    pad = (~groups) & (free_rank <= (n - counts))
    return (groups | pad).reshape(rows, cols)
