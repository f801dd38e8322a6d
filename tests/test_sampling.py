"""The teacher's sampler: the distribution it draws from, its determinism, and its KV-cache loop
against a plain loop that runs the whole prefix through the model at every step."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.data.sampling import draw_tokens, sample_sequences


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.3, 5)])
def test_draws_follow_the_tempered_and_truncated_softmax(temperature, top_k):
    torch.manual_seed(0)
    vocab, draws = 12, 40_000
    logits = torch.randn(vocab) * 2
    expected = torch.softmax(logits.double() / temperature, -1)
    if top_k:
        cut = expected.topk(top_k).values[-1]
        expected = torch.where(expected >= cut, expected, 0.0)
        expected /= expected.sum()
    picks = draw_tokens(logits.expand(draws, vocab), temperature, top_k, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(picks, minlength=vocab).double() / draws
    # a multinomial frequency has standard deviation sqrt(p (1 - p) / draws); allow 5 of them
    bound = 5 * (expected * (1 - expected) / draws).sqrt() + 1e-12
    assert bool(((frequencies - expected).abs() <= bound).all()), (frequencies, expected)
    if top_k:
        assert bool((frequencies[expected == 0] == 0).all()), "a token outside the top k was drawn"


def test_a_token_of_probability_zero_is_never_drawn():
    logits = torch.randn(64, 50)
    logits[:, ::3] = float("-inf")
    picks = draw_tokens(logits, 1.0, 0, torch.Generator().manual_seed(3))
    assert bool((picks % 3 != 0).all())


def _plain_sampling(model, start, eos, count, max_new_tokens, generator):
    """The same draws, with the whole prefix through the model at every step (no cache)."""
    tokens = torch.full((count, 1), start)
    finished = torch.zeros(count, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=tokens, use_cache=False).logits[:, -1]
        step = draw_tokens(logits, 1.0, 0, generator).masked_fill(finished, eos)
        finished |= step == eos
        tokens = torch.cat([tokens, step[:, None]], 1)
        if bool(finished.all()):
            break
    rows = tokens[:, 1:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row + [eos] for row in rows]


def test_cached_sampling_equals_plain_sampling_and_depends_on_the_seed_alone():
    # a small vocabulary, so that EOS (about 1 in 16 per step) ends sequences at different steps
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).double().eval()
    eos, start = config.eos_token_id, config.bos_token_id
    rows = sample_sequences(model, start, eos, 6, 24, 1.0, 0, torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = _plain_sampling(model, start, eos, 6, 24, torch.Generator().manual_seed(7))
    assert rows == reference
    assert all(row[-1] == eos and eos not in row[:-1] and len(row) <= 25 for row in rows)
    assert len({len(row) for row in rows}) > 1, "the test wants sequences that end at different steps"
    assert rows == sample_sequences(model, start, eos, 6, 24, 1.0, 0, torch.Generator().manual_seed(7))
    assert rows != sample_sequences(model, start, eos, 6, 24, 1.0, 0, torch.Generator().manual_seed(8))
