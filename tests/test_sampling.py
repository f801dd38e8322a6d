"""The teacher's sampler: the distribution it draws from, its determinism, and its KV-cache loop
against a plain loop that runs the whole prefix through the model at every step."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.sampling import draw_tokens, sample_sequences


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


def test_cached_sampling_equals_plain_sampling_and_depends_on_the_seed_alone(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float64).eval()
    eos, start = model.config.eos_token_id, model.config.bos_token_id
    with torch.no_grad():  # point EOS's output row along the typical final hidden state: ~1/8 chance a step
        hidden = model.model(input_ids=torch.randint(0, model.config.vocab_size, (4, 16))).last_hidden_state
        direction = hidden.mean((0, 1))
        model.lm_head.weight[eos] = direction * math.log(model.config.vocab_size / 7) / direction.square().sum()
    rows = sample_sequences(model, start, eos, 6, 24, 1.0, 0, torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = _plain_sampling(model, start, eos, 6, 24, torch.Generator().manual_seed(7))
    assert rows == reference
    assert all(row[-1] == eos and eos not in row[:-1] and len(row) <= 25 for row in rows)
    assert len({len(row) for row in rows}) > 1, "the test wants sequences that end at different steps"
    assert rows == sample_sequences(model, start, eos, 6, 24, 1.0, 0, torch.Generator().manual_seed(7))
    assert rows != sample_sequences(model, start, eos, 6, 24, 1.0, 0, torch.Generator().manual_seed(8))
