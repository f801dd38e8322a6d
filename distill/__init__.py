"""distill: turn a dense Hugging Face causal LM into an N:M-sparse student recovered by distillation."""

__version__ = "0.1.0"
