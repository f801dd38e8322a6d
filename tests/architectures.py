"""Tiny random-weight models of the decoder-only families distill is tested on (2 layers, 64 wide),
built from transformers configs, with the projections each decoder layer holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

COMMON = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Architecture:
    config_class: str
    projections: tuple[str, ...]  # every linear projection of one decoder layer, by path in the layer
    settings: dict = field(default_factory=dict)


ARCHITECTURES = {
    "llama": Architecture("LlamaConfig", LLAMA_LIKE, {**COMMON, "num_key_value_heads": 2}),
    "qwen2": Architecture("Qwen2Config", LLAMA_LIKE, {**COMMON, "num_key_value_heads": 2}),
    "qwen3": Architecture("Qwen3Config", LLAMA_LIKE, {**COMMON, "num_key_value_heads": 2, "head_dim": 16}),
    "olmo2": Architecture("Olmo2Config", LLAMA_LIKE, {**COMMON, "num_key_value_heads": 2}),
    # soft-capped output head (final_logit_softcapping) and attention
    "gemma2": Architecture("Gemma2Config", LLAMA_LIKE, {**COMMON, "num_key_value_heads": 2, "head_dim": 16}),
    # fused q/k/v and gate/up projections
    "phi3": Architecture("Phi3Config", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
                         {**COMMON, "num_key_value_heads": 2}),
    "gpt_neox": Architecture("GPTNeoXConfig", ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                               "mlp.dense_4h_to_h"), COMMON),
    # output heads that scale their logits (used by the chunked-loss tests)
    "cohere": Architecture("CohereConfig", LLAMA_LIKE, {**COMMON, "num_key_value_heads": 2}),
    "granite": Architecture("GraniteConfig", LLAMA_LIKE, {**COMMON, "num_key_value_heads": 2}),
    # experts fused into 3-D weights and a router weight outside nn.Linear: not prunable yet, refused
    # unless kept dense on purpose
    "mixtral": Architecture("MixtralConfig", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj"),
                            {**COMMON, "num_key_value_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1}),
    # transformers' Conv1D projections (weights stored [in, out])
    "gpt2": Architecture("GPT2Config", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
                         dict(n_layer=2, n_embd=64, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2)),
}


def tiny_config(family: str, vocab_size: int = 256, **extra):
    import transformers

    architecture = ARCHITECTURES[family]
    return getattr(transformers, architecture.config_class)(vocab_size=vocab_size, **{**architecture.settings, **extra})


def tiny_model(family: str, vocab_size: int = 256, seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **extra))
