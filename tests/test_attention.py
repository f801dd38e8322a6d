"""Attention sparsity (distill.sparsity.attention, distill.sparsity.head_selection, distill.train.head_gates,
distill.runtime.kv_cache): streaming heads against a float64 reference written out loop by loop, the
statistics the report shows, gate training on a model whose answer is known, the bounded KV cache
against the full one, and the spec round trip."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from architectures import tiny_model
from distill.sparsity.spec import SparsitySpec, StreamingHeads, read_sparsity_spec, write_sparsity_spec
from distill.errors import DistillError
from distill.sparsity.attention_config import AttentionConfig, HeadSelection
from distill.sparsity.attention import (ATTENTION, AttentionHeads, HeadGates, HeadProbe, attention_modules, heads_attention,
                                        install_heads, remove_heads, streaming_heads)
from distill.sparsity.head_selection import choose_streaming, head_statistics, kv_cache_bytes
from distill.sparsity.patterns import NM
from distill.train.head_gates import train_gates


def reference_attention(query, key, value, visible, sink, window, streaming, gate=None):
    """Per query head and query: softmax over the keys it sees, a loop over keys. `visible[b][i][j]`
    says whether key j is allowed for query i; a streaming head keeps the first `sink` and the last
    `window` of those. With `gate`, every head mixes full and streaming attention by its KV head's gate."""
    batch, q_heads, q_length, _ = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    scale = 1 / math.sqrt(query.shape[-1])
    out = torch.zeros(batch, q_length, q_heads, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // groups
            for i in range(q_length):
                keys = [j for j in range(key.shape[2]) if visible[b][i][j]]
                if not keys:  # a padded query: nothing to attend to, compared nowhere
                    continue
                local = keys[:sink] + [j for j in keys[-window:] if j not in keys[:sink]]

                def attend(chosen):
                    scores = torch.stack([query[b, h, i] @ key[b, kv, j] * scale for j in chosen])
                    weights = scores.softmax(0)
                    return sum(weight * value[b, kv, j] for weight, j in zip(weights, chosen))

                if gate is not None:
                    g = float(gate[kv])
                    out[b, i, h] = g * attend(keys) + (1 - g) * attend(local)
                else:
                    out[b, i, h] = attend(local if kv in streaming else keys)
    return out


def module_with(kv_heads, sink, window, streaming):
    return SimpleNamespace(layer_idx=0, attention_heads=AttentionHeads(kv_heads, sink, window, streaming))


@pytest.mark.parametrize("q_length,kv_length,padded", [(37, 37, False), (5, 41, False), (23, 23, True)])
def test_streaming_heads_equal_a_masked_float64_reference(q_length, kv_length, padded):
    torch.manual_seed(q_length)
    batch, kv_heads, groups, dim, sink, window = 2, 3, 2, 8, 3, 7
    query = torch.randn(batch, kv_heads * groups, q_length, dim, dtype=torch.float64)
    key, value = (torch.randn(batch, kv_heads, kv_length, dim, dtype=torch.float64) for _ in range(2))
    offset = kv_length - q_length
    visible = [[[j <= i + offset for j in range(kv_length)] for i in range(q_length)] for _ in range(batch)]
    mask = None
    if padded:  # the second row's first 4 positions are padding: its sinks are the 4th to 6th tokens
        for i in range(q_length):
            visible[1][i][:4] = [False] * 4
        mask = torch.tensor(visible)[:, None]
    module = module_with(kv_heads, sink, window, [0, 2])
    out, weights = heads_attention(module, query, key, value, mask)
    full, _ = heads_attention(module_with(kv_heads, sink, window, []), query, key, value, mask)
    expected = reference_attention(query, key, value, visible, sink, window, streaming={0, 2})
    assert weights is None and out.shape == expected.shape
    rows = torch.tensor([[any(row) for row in sample] for sample in visible])  # queries that see a key
    assert float((out[rows] - expected[rows]).norm() / expected[rows].norm()) < 1e-12
    out, full = out[rows], full[rows]
    # a head that streams differs from full attention once the window is shorter than the context
    assert torch.allclose(full[:, 2:4], out[:, 2:4]) and not torch.allclose(full[:, :2], out[:, :2])


def test_gates_mix_full_and_streaming_attention_per_kv_head():
    torch.manual_seed(1)
    query = torch.randn(1, 4, 19, 8, dtype=torch.float64)
    key, value = (torch.randn(1, 2, 19, 8, dtype=torch.float64) for _ in range(2))
    module = SimpleNamespace(layer_idx=0)  # gates need no installed heads
    gates = HeadGates([0], kv_heads=2, sink=2, window=5)
    gates.values = torch.nn.Parameter(torch.tensor([[0.3, 1.7]], dtype=torch.float64))  # 1.7 clamps to 1
    out, _ = heads_attention(module, query, key, value, None, head_gates=gates)
    visible = [[[j <= i for j in range(19)] for i in range(19)]]
    expected = reference_attention(query, key, value, visible, 2, 5, set(), gate=[0.3, 1.0])
    assert float((out.detach() - expected).norm() / expected.norm()) < 1e-12
    out.sum().backward()
    assert gates.values.grad[0, 0] != 0 and gates.values.grad[0, 1] == 0  # clamped


def test_recorded_statistics_match_the_probabilities_and_the_output_is_unchanged():
    torch.manual_seed(2)
    query = torch.randn(1, 4, 30, 8)
    key, value = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    sink, window = 2, 6
    module = module_with(2, sink, window, [1])
    plain, _ = heads_attention(module, query, key, value, None)
    state = module.attention_heads.extra_repr()
    probe = HeadProbe(sink, window)
    recorded, _ = heads_attention(module, query, key, value, None, head_probe=probe)
    assert torch.allclose(recorded, plain, atol=1e-5)
    assert module.attention_heads.extra_repr() == state and set(probe.by_layer) == {0}  # the call changed no state
    summary = probe.by_layer[0].summary()
    # head 0 (full): probabilities over every earlier key, by hand
    scores = (query[0, :2] @ key[0, 0].T) / math.sqrt(8)
    causal = torch.ones(30, 30, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    local = causal & ((j < sink) | (i - j < window))
    assert summary["local_mass"][0] == pytest.approx(float((probs * local).sum() / 60), rel=1e-5)
    assert summary["below_floor"][0] == pytest.approx(float(((probs < 1e-3) & causal).sum() / (2 * causal.sum())), rel=1e-6)
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum() / 60
    assert summary["entropy"][0] == pytest.approx(float(entropy), rel=1e-5)
    assert summary["local_mass"][1] == pytest.approx(1.0)  # a streaming head attends inside its window only


def test_choose_streaming_takes_the_fraction_model_wide():
    scores = {"a": [0.9, 0.1, 0.5], "b": [0.8, 0.95, 0.2]}
    assert choose_streaming(scores, 0.5, stream_highest=True) == {"a": [0], "b": [0, 1]}
    assert choose_streaming(scores, 0.5, stream_highest=False) == {"a": [1, 2], "b": [2]}
    assert choose_streaming(scores, 0.0, stream_highest=True) == {}


def test_installed_heads_switch_the_model_and_remove_restores_it():
    model = tiny_model("llama", num_key_value_heads=2).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        names = [name for name, _ in attention_modules(model)]
        install_heads(model, {}, 2, 4)  # the registered function with no streaming head is plain attention
        assert model.config._attn_implementation == ATTENTION
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-5)
        install_heads(model, {names[1]: [1]}, 2, 4)
        assert streaming_heads(model) == {names[1]: [1]}
        assert not torch.allclose(model(input_ids=ids).logits, dense, atol=1e-3)
        remove_heads(model)
        assert model.config._attn_implementation == "sdpa" and torch.equal(model(input_ids=ids).logits, dense)
    with pytest.raises(ValueError, match="outside 0..1"):
        install_heads(model, {names[0]: [2]}, 2, 4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])
def test_generation_with_the_bounded_cache_equals_the_full_cache(family):
    from distill.runtime import StreamingCache
    from distill.runtime.kv_cache import use_streaming_cache

    model = tiny_model(family, num_key_value_heads=2, num_hidden_layers=3).double().eval()
    names = [name for name, _ in attention_modules(model)]
    sink, window = 3, 6
    install_heads(model, {names[0]: [0], names[2]: [0, 1]}, sink, window)
    prompt = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        full = model.generate(prompt, max_new_tokens=25, do_sample=False, min_new_tokens=25)
        cache = StreamingCache(model)
        bounded = model.generate(prompt, max_new_tokens=25, do_sample=False, min_new_tokens=25, cache=cache)
        assert torch.equal(full, bounded)
        # the streaming heads hold sink + window - 1 positions, the full heads all 35 so far
        head_dim = attention_modules(model)[0][1].head_dim
        per_position = 2 * head_dim * 8  # key and value, float64
        held = (2 * 35 + 1 * 35 + 1 * (sink + window - 1) + 2 * (sink + window - 1)) * per_position
        assert cache.nbytes() == held
        use_streaming_cache(model)  # generate's own cache becomes a StreamingCache
        out = model.generate(prompt, max_new_tokens=25, do_sample=False, min_new_tokens=25, return_dict_in_generate=True)
        assert type(out.cache).__name__ == "StreamingCache" and torch.equal(out.sequences, full)
        padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], 1)
        with pytest.raises(ValueError, match="unpadded"):
            model.generate(padded, attention_mask=(padded != 0).long(), max_new_tokens=2, cache=StreamingCache(model))


def test_a_model_that_modifies_attention_scores_is_refused():
    model = tiny_model("gemma2", num_key_value_heads=2).eval()
    before = model.config._attn_implementation
    install_heads(model, {}, 2, 4)
    with pytest.raises(ValueError, match="softcap"):
        model(input_ids=torch.randint(0, 256, (1, 8)))
    remove_heads(model)  # back to what it ran before, and it runs
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 256, (1, 8))).logits).all()


def test_gpt_neox_attention_is_found_by_its_head_size():
    model = tiny_model("gpt_neox").eval()
    assert [name for name, _ in attention_modules(model)] == ["gpt_neox.layers.0.attention", "gpt_neox.layers.1.attention"]
    ids = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        install_heads(model, {"gpt_neox.layers.1.attention": [0]}, 2, 6)
        assert not torch.allclose(model(input_ids=ids).logits, dense, atol=1e-4)


def test_gate_training_streams_the_heads_that_are_local_by_construction():
    """The teacher is the same random model with KV head 0 of every layer streaming; a full-attention
    student's gates must fall for head 0 and stay for head 1, and the cut streams exactly head 0."""
    student = tiny_model("llama", num_key_value_heads=2, num_attention_heads=4).float()
    teacher = tiny_model("llama", num_key_value_heads=2, num_attention_heads=4).float().eval()
    names = [name for name, _ in attention_modules(teacher)]
    install_heads(teacher, {name: [0] for name in names}, 1, 4)
    blocks = torch.randint(0, 256, (8, 48))
    attention = AttentionConfig(streaming_fraction=0.5, sink=1, window=4, select=HeadSelection.DISTILL, gate_steps=30,
                                gate_batch_size=4, gate_lr=0.05, gate_penalty=0.0)
    learned = train_gates(student, teacher, blocks, attention, Accelerator(cpu=True, mixed_precision="no"))
    for name in names:
        low, high = learned.gates[name]
        assert low < 0.6 < high, (name, learned.gates[name])
    assert learned.history[-1]["kl"] < learned.history[0]["kl"]
    assert choose_streaming(learned.gates, 0.5, stream_highest=False) == {name: [0] for name in names}
    assert student.config._attn_implementation == "sdpa" and all(p.requires_grad for p in student.parameters())


def test_mass_statistics_rank_heads_by_how_local_they_are():
    model = tiny_model("llama", num_key_value_heads=2).float().eval()
    names = [name for name, _ in attention_modules(model)]
    stats = head_statistics(model, torch.randint(0, 256, (2, 40)), sink=2, window=8)
    assert set(stats) == set(names)
    for values in stats.values():
        assert all(0 < mass < 1 for mass in values["local_mass"]) and all(h > 0 for h in values["entropy"])
    assert model.config._attn_implementation == "sdpa"  # measured without leaving heads behind


def test_measuring_installed_heads_leaves_them_as_they_are():
    """A streaming head keeps all its mass inside its own sink + window; measured against a wider one
    it still does, and the installed heads keep their sink, window and implementation."""
    model = tiny_model("llama", num_key_value_heads=2).float().eval()
    names = [name for name, _ in attention_modules(model)]
    install_heads(model, {names[0]: [1]}, 2, 8)
    blocks = torch.randint(0, 256, (2, 40))
    for sink, window in ((2, 8), (4, 12)):
        stats = head_statistics(model, blocks, sink, window)
        assert stats[names[0]]["local_mass"][1] == pytest.approx(1.0) and stats[names[0]]["local_mass"][0] < 1
    heads = model.get_submodule(names[0]).attention_heads
    assert (heads.sink, heads.window) == (2, 8) and model.config._attn_implementation == ATTENTION
    assert streaming_heads(model) == {names[0]: [1]}


def test_kv_cache_bytes_count_sink_and_window_for_streaming_heads():
    model = tiny_model("llama", num_key_value_heads=2, num_hidden_layers=2)
    names = [name for name, _ in attention_modules(model)]
    head_dim = attention_modules(model)[0][1].head_dim
    kv = kv_cache_bytes(model, {names[0]: [0, 1], names[1]: [1]}, context=2048, sink=4, window=256)
    per_position = 2 * head_dim * 2
    assert kv.dense == 2 * 2 * 2048 * per_position
    assert kv.sparse == (1 * 2048 + 3 * 260) * per_position and kv.ratio == pytest.approx((2048 + 3 * 260) / (4 * 2048))


def test_the_spec_carries_streaming_heads_and_older_specs_read_without(tmp_path):
    spec = SparsitySpec(NM(2, 4), ["a"], streaming=StreamingHeads(4, 256, {"model.layers.0.self_attn": [0, 2]}))
    write_sparsity_spec(tmp_path, spec)
    assert read_sparsity_spec(tmp_path) == spec
    write_sparsity_spec(tmp_path, SparsitySpec(NM(2, 4), ["a"]))
    assert read_sparsity_spec(tmp_path).streaming is None
    (tmp_path / "sparsity.json").write_text('{"version": 4, "masked": [], "layout": "masked", "pattern": '
                                            '{"kind": "nm", "n": 2, "m": 4}, "streaming": {"sink": 4}}')
    with pytest.raises(DistillError, match="corrupt file"):
        read_sparsity_spec(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"attention": {"streaming_fraction": 1.5}}, "attention.streaming_fraction"),
    ({"attention": {"streaming_fraction": 0.5, "window": 0}}, "attention.window"),
    ({"attention": {"streaming_fraction": 0.5, "select": "random"}}, "attention.select"),
    ({"attention": {"streaming_fraction": 0.5, "window": 300}}, "the whole of a 256-token training block"),
    ({"attention": {"streaming_fraction": 0.5, "window": 16}, "prune": {"pattern": "heads"}}, "use one of the two"),
])
def test_attention_config_is_checked(tmp_path, change, message):
    import yaml

    from distill.run.config_file import load_config

    base = {"teacher": {"source": "demo"},
            "data": {"block_size": 256, "sources": [{"name": "a", "kind": "files", "files": ["x.txt"]}]}}
    for section, values in change.items():
        base[section] = {**base.get(section, {}), **values}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(DistillError, match=message):
        load_config(path)
