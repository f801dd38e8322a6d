"""distill: turn a dense Hugging Face causal LM into an N:M-sparse student recovered by distillation."""

__version__ = "0.2.0"  # 0.2: the teacher writes its text with distill.sampling (every stage runs again)
