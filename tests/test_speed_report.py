"""The speed measurement on two tiny real Llama models: the result's structure, its ratios as the
quotients of the medians, the models timed in turns, and tensor bytes that count a tied embedding once
and a compressed projection by its own resident_bytes()."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from distill.eval.speed import measure_speed, process_rss_bytes, tensor_bytes

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, KV_WIDTH = 64, 128, 2, 256, 32  # 4 heads of 16, 2 of them for keys and values
# per layer: q and o (64 x 64), k and v (32 x 64), gate, up and down (128 x 64), float32
PROJECTION_BYTES = LAYERS * 4 * (2 * HIDDEN * HIDDEN + 2 * KV_WIDTH * HIDDEN + 3 * INTERMEDIATE * HIDDEN)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on one thread: on a shared machine, threads that wait on each other turn a
    millisecond forward into a tenth of a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(seed: int, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


class HalfProjection(nn.Module):
    """A projection that keeps its weight in bfloat16 and says what it holds: those bytes and a
    64-byte header that is no tensor, so counting its tensors would give another number."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("values", linear.weight.detach().to(torch.bfloat16))

    def resident_bytes(self) -> int:
        return self.values.numel() * self.values.element_size() + 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.values.to(x.dtype))


def _compress_projections(model: LlamaForCausalLM) -> LlamaForCausalLM:
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, HalfProjection(child))
    return model


def test_measure_speed_times_the_models_in_turns_and_gives_ratios_of_the_medians():
    models = {"teacher": _llama(0), "student": _llama(1)}
    order: list[str] = []
    for name, model in models.items():
        model.register_forward_pre_hook(lambda module, args, name=name: order.append(name))
    prompt = torch.randint(3, VOCAB, (64,), generator=torch.Generator().manual_seed(0))
    result = measure_speed(models, prompt, new_tokens=4, prefill_tokens=32, repeats=2)

    turns = [name for index, name in enumerate(order) if index == 0 or order[index - 1] != name]
    assert turns == ["teacher", "student"] * 3  # a warm-up round, then 2 timed ones: never all of one first
    # per round and model: generate 4 tokens (4 forwards), one prefill forward
    assert order.count("teacher") == order.count("student") == 3 * (4 + 1)

    assert result["device"] == "cpu" and result["threads"] == torch.get_num_threads() and result["repeats"] == 2
    assert result["dtype"] == "float32" and isinstance(result["cpu"], str)
    assert (result["decode_prompt_tokens"], result["new_tokens"], result["prefill_tokens"]) == (16, 4, 32)
    assert set(result["models"]) == {"teacher", "student"} and set(result["ratios"]) == {"student"}
    for row in result["models"].values():
        assert set(row) == {"decode_tokens_per_s", "prefill_tokens_per_s", "bytes_total", "bytes_projections"}
        assert all(math.isfinite(value) and value > 0 for value in row.values())
        assert row["bytes_projections"] == PROJECTION_BYTES
    teacher, student = result["models"]["teacher"], result["models"]["student"]
    assert result["ratios"]["student"] == pytest.approx({
        "decode": student["decode_tokens_per_s"] / teacher["decode_tokens_per_s"],
        "prefill": student["prefill_tokens_per_s"] / teacher["prefill_tokens_per_s"],
        "bytes_total": 1.0, "bytes_projections": 1.0}, rel=1e-12)
    assert result["process_rss_bytes"] > result["models"]["teacher"]["bytes_total"]


def test_prefill_takes_at_most_the_prompt():
    result = measure_speed({"teacher": _llama(0)}, torch.arange(3, 23), new_tokens=2, prefill_tokens=512, repeats=1)
    assert (result["decode_prompt_tokens"], result["prefill_tokens"]) == (16, 20) and result["ratios"] == {}


def test_tensor_bytes_count_a_tied_embedding_once_and_leave_it_and_the_head_out_of_the_projections():
    tied, untied = tensor_bytes(_llama(0, tied=True)), tensor_bytes(_llama(0, tied=False))
    assert untied["total"] - tied["total"] == VOCAB * HIDDEN * 4  # the head's own matrix, when it has one
    assert tied["projections"] == untied["projections"] == PROJECTION_BYTES
    assert tied["total"] > tied["projections"] + VOCAB * HIDDEN * 4  # the embedding and the norms besides


def test_a_projection_with_resident_bytes_is_counted_by_its_method():
    dense = tensor_bytes(_llama(0))
    compressed = _compress_projections(_llama(0))
    held = tensor_bytes(compressed)
    count = LAYERS * 7
    # the layers hold no nn.Linear any more, and are still found by their compressed projections
    assert held["projections"] == PROJECTION_BYTES // 2 + 64 * count
    assert dense["total"] - held["total"] == PROJECTION_BYTES - held["projections"]
    result = measure_speed({"teacher": _llama(0), "student": compressed}, torch.arange(3, 40), new_tokens=2,
                           prefill_tokens=16, repeats=1)
    assert result["ratios"]["student"]["bytes_projections"] == pytest.approx(0.5 + 64 * count / PROJECTION_BYTES)


def test_process_rss_bytes_is_this_process_resident_size():
    rss = process_rss_bytes()
    assert rss is None or rss > 10 * 2**20  # torch alone is more than that
