"""Which projections are pruned, on tiny random models of several architectures built from
transformers configs: decoder layers found without names, every decoder linear selected by default,
globs and excludes, embeddings and heads never, and Conv1D (GPT-2) converted to nn.Linear and back
with the same logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from architectures import ARCHITECTURES, tiny_model
from distill.errors import DistillError
from distill.targets import decoder_layers, linearize, restore_conv1d, target_linears


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_every_decoder_linear_is_a_target_and_nothing_outside_the_layers(family):
    model = tiny_model(family)
    linearize(model)
    prefix, layers = decoder_layers(model)
    names = [name for name, _ in target_linears(model)]
    expected = ARCHITECTURES[family].projections
    assert len(names) == len(layers) * len(expected), (family, names)
    for index in range(len(layers)):
        assert {name.removeprefix(f"{prefix}.{index}.") for name in names if name.startswith(f"{prefix}.{index}.")} == set(expected)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert all(module is not head and module is not embedding for _, module in target_linears(model))


def test_targets_and_exclude_take_names_paths_and_globs():
    model = tiny_model("llama")
    select = lambda *args: sorted({name.rsplit(".", 1)[-1] for name, _ in target_linears(model, *args)})
    assert select(["q_proj", "down_proj"]) == ["down_proj", "q_proj"]
    assert select(["mlp.*"]) == ["down_proj", "gate_proj", "up_proj"]
    assert select(["*"], ["*_proj"]) == []
    assert select(["*"], ["self_attn.*", "model.layers.*.mlp.up_proj"]) == ["down_proj", "gate_proj"]
    only_first = [name for name, _ in target_linears(model, ["model.layers.0.*"])]
    assert only_first and all(name.startswith("model.layers.0.") for name in only_first)


def test_conv1d_models_compute_the_same_logits_as_linear_and_save_back_in_their_own_layout(tmp_path):
    model = tiny_model("gpt2").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.double()
    converted = linearize(model)
    assert converted and all(isinstance(model.get_submodule(name), nn.Linear) for name in converted)
    with torch.no_grad():
        actual = model(input_ids=ids).logits.double()
    assert float((actual - expected).norm() / expected.norm()) < 1e-6

    assert restore_conv1d(model) == converted
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits.double()
    assert float((again - expected).norm() / expected.norm()) < 1e-6


def test_a_language_model_without_a_layer_list_is_refused_by_name():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 16)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(DistillError, match="Flat: no list of decoder layers found"):
        list(target_linears(Flat()))


def test_layers_of_different_classes_are_found_and_an_inner_expert_list_is_not_mistaken_for_them():
    """A hybrid decoder: attention blocks and MoE blocks (whose experts are an inner list)."""
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.o_proj = nn.Linear(16, 16), nn.Linear(16, 16)

    class MixtureOfExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 16)) for _ in range(4))

    class Hybrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.layers = nn.ModuleList([Attention(), MixtureOfExperts(), Attention(), MixtureOfExperts()])
            self.head = nn.Linear(16, 32)

        def get_output_embeddings(self):
            return self.head

    model = Hybrid()
    assert decoder_layers(model)[0] == "layers"
    names = [name for name, _ in target_linears(model)]
    assert len(names) == 2 * 2 + 2 * 4 * 2 and "head" not in names
