"""The one loader of an exported student for inference, on any device.

    model = load_sparse_model("runs/demo/export/packed")              # CPU: blocked layouts, CPU kernels
    model = load_sparse_model("runs/demo/export/packed", device="cuda", table="crossover.json")
    model = load_sparse_model("runs/act/export/hf")                   # dense weights, thresholded inputs

A packed dir's 2:4 projections become Sparse24Linear straight from the packed tensors (the model's
skeleton is built without memory, so no dense copy of them is ever made); a dense dir (export/hf,
with the sparsity.json the export writes beside it) keeps its weights, its thresholded projections
become SparseInputLinear on CPU. Input thresholds and streaming heads (the spec's) are installed, and
streaming heads decode with a bounded KV cache (distill.runtime.kv_cache). The HF quantizer
(distill.export.hf_quantizer) builds its projections with the same `runtime_projection`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from distill.errors import DistillError
from distill.io import load_tensors
from distill.runtime.dispatch import CrossoverTable
from distill.runtime.kv_cache import use_streaming_cache
from distill.runtime.linear import Sparse24Linear, SparseInputLinear
from distill.sparsity.packing import unpack_nm
from distill.sparsity.spec import SparsitySpec, read_sparsity_spec
from distill.student import apply_runtime_sparsity
from distill.targets import linearize, replace_module

PACKED_WEIGHTS = "model.safetensors"
# a thresholded 2:4 projection takes the input-major layout (which skips zero inputs) from this share
# of zeroed inputs up; below it the grouped layout, which reads every group, is faster (measured on a
# 14336x4096 fp32 weight at M = 1: grouped 2.3x dense; input-major 2.0x at half the inputs zero, 8x at
# 90%; benchmarks/RESULTS.md)
INPUT_MAJOR_MIN_SPARSITY = 0.6


def crossover_table(table: str | Path | CrossoverTable | None) -> CrossoverTable:
    if isinstance(table, CrossoverTable):
        return table
    return CrossoverTable.load(Path(table)) if table else CrossoverTable()


def runtime_projection(name: str, values: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None,
                       spec: SparsitySpec, table: CrossoverTable, sparse: bool = True) -> nn.Module:
    """The module a packed projection runs as: Sparse24Linear for 2:4 (when `sparse`), else a dense
    nn.Linear (SparseInputLinear on CPU when its input is thresholded)."""
    if sparse and spec.pattern.accelerated:
        skipping = input_sparsity(spec, name) >= INPUT_MAJOR_MIN_SPARSITY
        return Sparse24Linear(values, positions, bias, name, table, sparse_inputs=skipping)
    weight = unpack_nm(values, positions, spec.pattern.n, spec.pattern.m)
    return dense_projection(name, weight, bias, spec, table, sparse)


def input_sparsity(spec: SparsitySpec, name: str) -> float:
    """The share of projection `name`'s inputs its threshold zeroes, as calibrated (0 without one).
    The spec keys it by the input's first projection: a projection sharing that input (k_proj beside
    q_proj) is found by its layer and its threshold, which the input's projections share."""
    if name not in spec.input_thresholds:
        return 0.0
    if name in spec.input_allocation:
        return spec.input_allocation[name]
    layer = name.rpartition(".")[0].rpartition(".")[0]
    threshold = spec.input_thresholds[name]
    shared = [fraction for key, fraction in spec.input_allocation.items()
              if key.rpartition(".")[0].rpartition(".")[0] == layer and spec.input_thresholds.get(key) == threshold]
    return shared[0] if shared else 0.0


def dense_projection(name: str, weight: torch.Tensor, bias: torch.Tensor | None, spec: SparsitySpec,
                     table: CrossoverTable, sparse: bool = True) -> nn.Module:
    """A dense projection as the runtime runs it: input-major on CPU when its input is thresholded."""
    if sparse and name in spec.input_thresholds and weight.device.type == "cpu":
        return SparseInputLinear(weight, bias, name, table)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def finish_runtime(model: nn.Module, spec: SparsitySpec) -> nn.Module:
    """What every loaded student gets: its input thresholds and streaming heads, and on GPU the kernels'
    operands built ahead of the first forward."""
    apply_runtime_sparsity(model, spec)  # small inputs become zero; streaming heads see sink + window
    if spec.streaming is not None:
        use_streaming_cache(model)
    for module in model.modules():
        if isinstance(module, Sparse24Linear):
            module.prepare_kernels()
    return model.eval()


def load_sparse_model(export_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      table: str | Path | CrossoverTable | None = None, sparse: bool = True,
                      runtime_sparsity: bool = True) -> nn.Module:
    """The exported student in `export_dir` (export/packed or export/hf) ready for inference on
    `device`, in `dtype` (default: as stored). `table`: a crossover table (distill.runtime.dispatch).
    `sparse=False` loads every projection dense with zeros, as the exact reference of the sparse one;
    `runtime_sparsity=False` leaves out the input thresholds and streaming heads (as export/hf runs)."""
    directory = Path(export_dir)
    spec = read_sparsity_spec(directory)
    table = crossover_table(table)
    device = torch.device(device)
    if spec.layout.packed:
        model = _from_packed(directory, spec, device, dtype, table, sparse)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto").to(device)
        linearize(model)
        thresholded_dense = [name for name in spec.input_thresholds if isinstance(model.get_submodule(name), nn.Linear)]
        for name in thresholded_dense:
            linear = model.get_submodule(name)
            replace_module(model, name, dense_projection(name, linear.weight.detach(), _detached(linear.bias), spec,
                                                         table, sparse))
    return finish_runtime(model, spec if runtime_sparsity else spec.replace(input_thresholds={}, streaming=None))


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.detach() if tensor is not None else None


def _from_packed(directory: Path, spec: SparsitySpec, device: torch.device, dtype: torch.dtype | None,
                 table: CrossoverTable, sparse: bool) -> nn.Module:
    tensors = load_tensors(directory / PACKED_WEIGHTS)
    stored = next((tensor.dtype for name, tensor in tensors.items() if name.endswith(".values")), torch.float32)
    dtype = dtype or stored
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):  # the HF-native loading's; this loader builds the model itself
        del config.quantization_config
    with init_empty_weights():  # parameters on the meta device: nothing allocated until assigned below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linearize(model)  # packed in nn.Linear layout (distill.targets), Conv1D models included
    for name in spec.masked:
        try:
            values, positions = tensors.pop(f"{name}.values"), tensors.pop(f"{name}.indices")
        except KeyError as error:
            raise DistillError(f"packed export {directory} lacks {error.args[0]} (its sparsity.json masks {name})") from None
        bias = tensors.pop(f"{name}.bias", None)
        module = runtime_projection(name, values.to(device, dtype), positions.to(device),
                                    bias.to(device, dtype) if bias is not None else None, spec, table, sparse)
        replace_module(model, name, module)
    state = {name: tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
             for name, tensor in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    on_meta = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if on_meta or unexpected:
        raise DistillError(f"packed export {directory} does not match its config: missing {on_meta[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model.to(device)  # the buffers made with the skeleton (rotary frequencies)
    thresholded_dense = [name for name in spec.input_thresholds if name not in set(spec.masked)]
    for name in thresholded_dense:
        linear = model.get_submodule(name)
        replace_module(model, name, dense_projection(name, linear.weight.detach(), _detached(linear.bias), spec, table, sparse))
    return model
