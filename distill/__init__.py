"""distill: turn a dense Hugging Face causal LM into an N:M-sparse student recovered by distillation."""

__version__ = "0.2.0"  # 0.2: the teacher writes its text with distill.sampling (every stage runs again)

# importing the quantizer registers the packed export's method with transformers, so that after
# `import distill` AutoModelForCausalLM.from_pretrained(<run>/export/packed) loads the sparse student
from distill.runtime.hf_quantizer import PackedSparsityQuantizer  # noqa: E402

__all__ = ["PackedSparsityQuantizer", "__version__"]
