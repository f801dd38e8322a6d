"""distill: turn a dense Hugging Face causal LM into an N:M-sparse student recovered by distillation."""

__version__ = "0.3.1"  # 0.3: manifests and checkpoints carry the checksums of their files (every stage runs again)
# 0.3.1: stages hand typed records downstream and sparsity.json carries the activation allocation (schema 4)


# `import distill` loads neither torch nor transformers (they cost seconds, and the CLI reports a bad
# config before they load) and registers nothing with them: enable_transformers_loading() does that.


def enable_transformers_loading() -> None:
    """Register the packed export's quantization method with transformers, so that
    AutoModelForCausalLM.from_pretrained(<run>/export/packed) returns the sparse student
    (distill.export.registration); once per process, a second call does nothing."""
    from distill.export.registration import register

    register()


def __getattr__(name: str):
    if name == "PackedSparsityQuantizer":  # the class itself, for whoever asks for it by name
        from distill.export.hf_quantizer import PackedSparsityQuantizer

        return PackedSparsityQuantizer
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


__all__ = ["PackedSparsityQuantizer", "__version__", "enable_transformers_loading"]
