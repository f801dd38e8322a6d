"""Register the packed export's quantization method with transformers, in one explicit call:

    import distill
    distill.enable_transformers_loading()
    model = AutoModelForCausalLM.from_pretrained("runs/demo/export/packed")

`import distill` does not do it: the import stays light (no torch, no transformers) and changes no
import machinery. transformers keeps quantization methods in process-wide registries (dicts keyed by
the method's name) and refuses a name twice, so `register` checks for its own entries first and a
second call does nothing.
"""

from __future__ import annotations


def register() -> None:
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)

    from distill.export.hf_quantizer import PackedSparsityConfig, PackedSparsityQuantizer
    from distill.sparsity.spec import QUANT_METHOD

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not PackedSparsityConfig:
        register_quantization_config(QUANT_METHOD)(PackedSparsityConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not PackedSparsityQuantizer:
        register_quantizer(QUANT_METHOD)(PackedSparsityQuantizer)
