"""The packed export as a Hugging Face quantization method, so that

    import distill
    distill.enable_transformers_loading()
    model = AutoModelForCausalLM.from_pretrained("runs/demo/export/packed")

returns the student with its N:M projections as `Sparse24Linear` (2:4; other N:M patterns load as
dense-with-zeros nn.Linear), its input thresholds and streaming heads installed, as
`distill.runtime.load_sparse_model` does. transformers finds the method through the packed dir's
`config.json`: its `quantization_config` is `{"quant_method": QUANT_METHOD, "spec": <sparsity spec>}`
(distill.sparsity.packing.quantization_config), and `distill.enable_transformers_loading()`
(distill.export.registration) registers the config class and the quantizer with transformers'
public hooks (`register_quantization_config`, `register_quantizer`); importing this module does not.

Loading: before the weights, every masked nn.Linear of the (meta) model becomes a `PackedLinear`
whose tensors are the packed file's `<name>.values` and `<name>.indices`, so transformers' own loader
fills them; after, each becomes the runtime module `distill.runtime.runtime_projection` makes of them
(the loader's own function), with no dense copy on the way for 2:4. `save_pretrained` writes the
packed tensors again (`get_state_dict_and_metadata`), so a round trip reproduces the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from distill.runtime import CrossoverTable, Sparse24Linear, SparseInputLinear
from distill.runtime.loading import dense_projection, finish_runtime, runtime_projection
from distill.sparsity.packing import full_groups_mask, pack_nm
from distill.sparsity.spec import QUANT_METHOD, SparsitySpec
from distill.targets import linearize, replace_module

THRESHOLD_KEY = ".input_threshold.threshold"  # an InputThreshold's buffer: the spec holds thresholds


class PackedSparsityConfig(QuantizationConfigMixin):
    """config.json's quantization_config for a packed export: the dir's SparsitySpec as JSON."""

    def __init__(self, spec: dict | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.spec = dict(spec or {})

    def sparsity_spec(self) -> SparsitySpec:
        return SparsitySpec.from_json(self.spec, Path("config.json: quantization_config.spec"))


class PackedLinear(nn.Module):
    """A masked projection as the packed file stores it, for transformers' loader to fill."""

    def __init__(self, in_features: int, out_features: int, n: int, m: int, bias: bool, dtype: torch.dtype, device):
        super().__init__()
        kept = in_features // m * n
        self.n, self.m = n, m
        self.values = nn.Parameter(torch.empty(out_features, kept, dtype=dtype, device=device), requires_grad=False)
        self.indices = nn.Parameter(torch.empty(out_features, kept, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


class PackedSparsityQuantizer(HfQuantizer):
    """Loads (and saves) the packed N:M format; the checkpoint must already be packed."""

    requires_calibration = True

    def __init__(self, quantization_config: PackedSparsityConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.spec = quantization_config.sparsity_spec()

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.spec.layout.packed:
            raise ValueError(f"quantization_config {QUANT_METHOD}: layout {self.spec.layout} is not a packed one")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        linearize(model)  # the packed file holds every projection in nn.Linear layout (distill.targets)
        n, m = self.spec.pattern.n, self.spec.pattern.m
        for name in self.spec.masked:
            linear = model.get_submodule(name)
            packed = PackedLinear(linear.in_features, linear.out_features, n, m, linear.bias is not None,
                                  linear.weight.dtype, linear.weight.device)
            replace_module(model, name, packed)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        table = CrossoverTable()
        for name in self.spec.masked:
            packed = model.get_submodule(name)
            bias = packed.bias.data if packed.bias is not None else None
            replace_module(model, name, runtime_projection(name, packed.values.data, packed.indices.data, bias,
                                                           self.spec, table))
        for name in set(self.spec.input_thresholds) - set(self.spec.masked):
            linear = model.get_submodule(name)
            bias = linear.bias.data if linear.bias is not None else None
            replace_module(model, name, dense_projection(name, linear.weight.data, bias, self.spec, table))
        return finish_runtime(model, self.spec)

    def get_state_dict_and_metadata(self, model):
        """The packed tensors again: `<name>.values`/`.indices` for every masked projection, every
        other tensor as it is; thresholds and streaming heads stay in the config's spec."""
        masked = set(self.spec.masked)
        n, m = self.spec.pattern.n, self.spec.pattern.m
        state = {}
        for key, tensor in model.state_dict().items():
            owner = key.rpartition(".")[0]
            if owner not in masked and not key.endswith(THRESHOLD_KEY) and not isinstance(_module(model, owner), SparseInputLinear):
                state[key] = tensor
        for name, module in model.named_modules():
            if isinstance(module, SparseInputLinear):  # a thresholded dense projection, held input-major
                state[f"{name}.weight"] = module.weight_dense()
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias
        for name in masked:
            module = model.get_submodule(name)
            if isinstance(module, Sparse24Linear):
                state[f"{name}.values"], state[f"{name}.indices"] = module.packed()
            else:
                weight = module.weight.data
                state[f"{name}.values"], state[f"{name}.indices"] = pack_nm(weight, full_groups_mask(weight != 0, n, m, name), n, m)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias
        return state, {}

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
