"""distill: turn a dense Hugging Face causal LM into an N:M-sparse student recovered by distillation."""

__version__ = "0.3.0"  # 0.3: manifests and checkpoints carry the checksums of their files (every stage runs again)

# `import distill` registers the packed export's quantization method with transformers, so that
# AutoModelForCausalLM.from_pretrained(<run>/export/packed) loads the sparse student. The
# registration waits until transformers loads its model code (distill.export.registration): importing torch
# and transformers here would cost every `import distill` seconds, and the CLI reports a bad config
# before they load.
from distill.export.registration import register_when_transformers_loads  # noqa: E402

register_when_transformers_loads()


def __getattr__(name: str):
    if name == "PackedSparsityQuantizer":  # the class itself, for whoever asks for it by name
        from distill.export.hf_quantizer import PackedSparsityQuantizer

        return PackedSparsityQuantizer
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


__all__ = ["PackedSparsityQuantizer", "__version__"]
