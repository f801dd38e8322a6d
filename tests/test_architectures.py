"""Every decoder-only family a user may bring, pruned completely or refused in one line: tiny random
models (2 layers, 64 wide) of Llama, Qwen2/3, OLMo2, Gemma-2 (soft-capped head), Phi-3 (fused q/k/v
and gate/up), GPT-NeoX and GPT-2 (Conv1D). The fast test runs the library path (linearize, targets,
masks, the Hugging Face export, packing); the slow one runs the whole pipeline through its CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from architectures import ARCHITECTURES, tiny_model
from conftest import run_pipeline, tiny_config, write_config
from distill.sections import LossConfig
from distill.sparsity.prune_config import PruneConfig
from distill.errors import DistillError
from distill.losses import IDENTITY, chunked_distillation_loss, distillation_loss, logit_transform
from distill.sparsity.spec import SparsitySpec
from distill.runtime import load_sparse_model
from distill.sparsity.packing import save_packed
from distill.sparsity.patterns import NM
from distill.sparsity.masks import install_masks, nm_mask, nm_violations, remove_masks
from distill.export.verify import save_in_hf_layout
from distill.sparsity.pruning import incompatible_projections, pruning_coverage
from distill.sparsity.structured import structured_masks
from distill.targets import decoder_linears, linearize, resolve_targets, target_linears


def _pruned_copy(model):
    linearize(model)
    masks = {name: nm_mask(linear.weight.abs(), 2, 4) for name, linear in target_linears(model)}
    install_masks(model, masks)
    return remove_masks(model), sorted(masks)


PRUNED_COMPLETELY = sorted(set(ARCHITECTURES) - {"mixtral"})


@pytest.mark.parametrize("family", PRUNED_COMPLETELY)
def test_each_family_exports_every_decoder_linear_2_4_loadable_by_plain_transformers(tmp_path, family):
    model, masked = _pruned_copy(tiny_model(family).eval())
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_in_hf_layout(model, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    linearize(reloaded)
    linears = list(decoder_linears(reloaded))
    assert len(linears) == len(masked) == 2 * len(ARCHITECTURES[family].projections)
    for name, _, linear in linears:
        assert nm_violations(linear.weight, 2, 4) == 0 and float((linear.weight == 0).float().mean()) >= 0.5, name

    save_packed(model, SparsitySpec(NM(2, 4), masked), tmp_path / "packed")
    unpacked = load_sparse_model(tmp_path / "packed", sparse=False, runtime_sparsity=False)
    expected_state, actual_state = model.state_dict(), unpacked.state_dict()
    assert expected_state.keys() == actual_state.keys()
    assert all(torch.equal(expected_state[key], actual_state[key]) for key in expected_state), family


def test_spanning_patterns_refuse_fused_projections_in_one_line():
    model = tiny_model("phi3")
    scores = {name: linear.weight.abs() for name, linear in target_linears(model)}
    with pytest.raises(DistillError) as refusal:
        structured_masks(model, "mlp_channels", scores, 0.5)
    message = str(refusal.value)
    assert "mlp.gate_up_proj" in message and "use pattern nm" in message and "\n" not in message


@pytest.mark.parametrize("family,key,value", [("gemma2", "final_logit_softcapping", 3.0), ("cohere", "logit_scale", 0.25),
                                              ("granite", "logits_scaling", 4.0)])
def test_the_chunked_loss_applies_the_heads_softcapping_or_scaling_like_the_model(family, key, value):
    """Equal to the full-logits loss (the model's own forward applies the head), with gradients."""
    extra = {key: value}
    student, teacher = tiny_model(family, seed=0, **extra).double(), tiny_model(family, seed=1, **extra).double()
    assert getattr(student.config, key) == value and logit_transform(student) != IDENTITY
    ids = torch.randint(3, student.config.vocab_size, (2, 24))
    loss = LossConfig(kd_weight=1.0, lm_weight=0.5, temperature=2.0, chunk_tokens=7)

    full, _ = distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits.detach(), ids, loss)
    expected = torch.autograd.grad(full, student.get_output_embeddings().weight)[0]
    hidden = student.get_decoder()(input_ids=ids).last_hidden_state
    with torch.no_grad():
        teacher_hidden = teacher.get_decoder()(input_ids=ids).last_hidden_state
    chunked, _ = chunked_distillation_loss(hidden, student.get_output_embeddings(), teacher_hidden,
                                           teacher.get_output_embeddings(), ids, loss,
                                           student_transform=logit_transform(student),
                                           teacher_transform=logit_transform(teacher))
    actual = torch.autograd.grad(chunked, student.get_output_embeddings().weight)[0]
    # the losses compute in float32 (distill.losses); the model applies its head in float64 here:
    # float32 rounding of each logit, summed over the positions
    tolerance = 16 * torch.finfo(torch.float32).eps * math.sqrt(ids.numel())
    assert abs(float(chunked.detach()) - float(full.detach())) <= tolerance * abs(float(full.detach()))
    assert float((actual - expected).norm() / expected.norm()) < tolerance


@pytest.mark.slow  # one pipeline run per family
@pytest.mark.parametrize("family", sorted(set(PRUNED_COMPLETELY) - {"llama", "cohere", "granite"}))  # llama: every other pipeline test
def test_each_family_runs_the_whole_pipeline_and_every_decoder_linear_ends_2_4(tmp_path, demo_teacher_dir, family):
    tokenizer = AutoTokenizer.from_pretrained(demo_teacher_dir)
    teacher_dir = tmp_path / family
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    tiny_model(family, vocab_size=len(tokenizer), **ids).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    train = {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "log_every": 2, "checkpoint_every": 2,
             "loss": {"chunk_tokens": 32}}
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, teacher_dir, name=family, train=train,
                                                           eval={"block_size": 32, "max_blocks": 2, "batch_size": 2}))
    result = run_pipeline(config)
    assert "stays dense" not in result.stdout and "warning" not in result.stdout
    run_dir = tmp_path / "runs" / family
    layers = 2 * len(ARCHITECTURES[family].projections)
    assert f"[prune] {layers} of {layers} decoder linear projections pruned, 100.0%" in result.stdout

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "hf", dtype=torch.float32)
    linearize(exported)
    for name, _, linear in decoder_linears(exported):
        assert nm_violations(linear.weight, 2, 4) == 0, name
    expected_state, packed_state = exported.state_dict(), load_sparse_model(run_dir / "export" / "packed", sparse=False, runtime_sparsity=False).state_dict()
    assert all(torch.equal(expected_state[key], packed_state[key]) for key in expected_state), family
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["coverage"]["pruned"] == layers and report["coverage"]["left_dense"] == {}


def test_a_scaling_key_the_models_forward_does_not_apply_is_not_applied():
    """A config may carry a key its model class ignores (Llama with logit_scale): the probe decides."""
    model = tiny_model("llama", logit_scale=0.25)
    assert model.config.logit_scale == 0.25 and logit_transform(model) == IDENTITY


def test_weights_no_linear_holds_are_refused_by_name_or_kept_dense_and_listed_on_request():
    """Mixtral's experts are 3-D parameters, not nn.Linear: never left dense in silence."""
    model = tiny_model("mixtral")
    with pytest.raises(DistillError) as refusal:
        incompatible_projections(model, PruneConfig(), resolve_targets(model))
    message = str(refusal.value)
    assert "cannot prune model.layers.0.mlp.gate.weight: a 2-D weight [2, 64] outside any linear" in message
    assert "prune.incompatible=dense" in message and "\n" not in message
    kept = PruneConfig(incompatible="dense")
    dense = incompatible_projections(model, kept, resolve_targets(model))
    masks = {name: nm_mask(linear.weight.abs(), 2, 4) for name, linear in target_linears(model)}
    coverage = pruning_coverage(model, kept, resolve_targets(model), masks, dense)
    assert coverage["pruned"] == coverage["decoder_linears"] == 8
    assert set(coverage["left_dense"]) == set(dense) == {f"model.layers.{i}.mlp.{name}" for i in range(2)
                                                         for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
    assert coverage["unasked_dense_fraction"] > 0.5  # the experts are most of the weights: the stage warns
