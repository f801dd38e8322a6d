"""Activation sparsity (distill.sparsity.activations): thresholds against plain-PyTorch references
on fresh random inputs, input groups found by running the model, and calibrated sparsity levels."""

import pytest
import torch

from distill.sparsity.activations_config import ActivationsConfig, Allocation
from distill.sparsity.activations import (InputThreshold, calibrate_thresholds, input_groups, input_statistics,
                                          install_thresholds, remove_thresholds, thresholded)


@pytest.mark.parametrize("straight_through", [False, True])
def test_a_threshold_zeroes_small_inputs_and_passes_the_chosen_gradient(straight_through):
    torch.manual_seed(0)
    x = torch.randn(5, 7, 32, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 7, 32, dtype=torch.float64)
    threshold = float(x.detach().abs().median().float())  # the buffer holds it in float32
    out = InputThreshold(threshold, straight_through)(x)
    kept = x.detach().abs() >= threshold
    assert torch.equal(out.detach(), x.detach() * kept)
    assert 0.45 < float(kept.double().mean()) < 0.55
    (grad,) = torch.autograd.grad(out, x, upstream)
    expected = upstream if straight_through else upstream * kept
    assert torch.allclose(grad, expected, rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def test_inputs_are_grouped_by_the_tensor_the_projections_read(tiny_model):
    probe = torch.randint(0, tiny_model.config.vocab_size, (1, 16))
    groups = input_groups(tiny_model, probe)
    assert [group.label for group in groups if group.layer == 0] == [
        "self_attn.q_proj+k_proj+v_proj", "self_attn.o_proj", "mlp.gate_proj+up_proj", "mlp.down_proj"]
    assert len(groups) == 4 * tiny_model.config.num_hidden_layers
    only_down = input_groups(tiny_model, probe, where=["mlp.down_proj"])
    assert [group.label for group in only_down] == ["mlp.down_proj"] * tiny_model.config.num_hidden_layers
    assert [group.label for group in input_groups(tiny_model, probe, where=["k_proj"])][0] == "self_attn.q_proj+k_proj+v_proj"


@pytest.mark.parametrize("greedy", [False, True])
def test_calibrated_thresholds_reach_the_target_and_come_off_cleanly(tiny_model, greedy):
    torch.manual_seed(1)
    blocks = torch.randint(0, tiny_model.config.vocab_size, (6, 32))
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 24))
    with torch.no_grad():
        dense = tiny_model(input_ids=ids).logits
    config = ActivationsConfig(target=0.5, allocation=Allocation.GREEDY if greedy else Allocation.UNIFORM, greedy_step=0.1)
    groups, sparsity, thresholds = calibrate_thresholds(tiny_model, blocks, config, batch_size=3)
    try:
        install_thresholds(tiny_model, groups, thresholds)
        assert set(thresholded(tiny_model)) == {name for group in groups for name in group.projections}
        measured = input_statistics(tiny_model, groups, blocks, batch_size=3)  # as the weights see them
        weights = {group.name: sum(tiny_model.get_submodule(n).weight.numel() for n in group.projections) for group in groups}
        overall = sum(weights[name] * stats.zero_fraction for name, stats in measured.items()) / sum(weights.values())
        assert overall == pytest.approx(0.5, abs=0.03)
        if not greedy:  # every input at the target
            assert all(stats.zero_fraction == pytest.approx(0.5, abs=0.05) for stats in measured.values())
        with torch.no_grad():
            sparse = tiny_model(input_ids=ids).logits
        assert not torch.equal(sparse, dense)
    finally:
        remove_thresholds(tiny_model)
    assert thresholded(tiny_model) == {}
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=ids).logits, dense)


def test_recalibration_keeps_the_allocation_on_a_moved_model(tiny_model):
    """Distill re-calibrates to the fractions the prune stage allocated: on the same model that gives
    the same thresholds; on a model whose weights moved, new thresholds that zero each input at its
    own allocated fraction again (not the target everywhere)."""
    from distill.sparsity.activations import recalibrate_thresholds

    torch.manual_seed(3)
    blocks = torch.randint(0, tiny_model.config.vocab_size, (6, 32))
    config = ActivationsConfig(target=0.5, allocation=Allocation.GREEDY, greedy_step=0.25)
    calibrated = calibrate_thresholds(tiny_model, blocks, config, batch_size=3)
    assert len(set(calibrated.sparsity.values())) > 1, "greedy should not land on uniform here"
    same = recalibrate_thresholds(tiny_model, blocks, config.where, calibrated.sparsity, batch_size=3)
    assert same.thresholds == calibrated.thresholds
    original = {name: parameter.clone() for name, parameter in tiny_model.named_parameters()}
    try:
        with torch.no_grad():
            for name, parameter in tiny_model.named_parameters():
                if "layernorm" in name:
                    parameter.mul_(1 + torch.rand_like(parameter))  # every input's scale moves
        moved = recalibrate_thresholds(tiny_model, blocks, config.where, calibrated.sparsity, batch_size=3)
        assert all(moved.thresholds[name] != calibrated.thresholds[name] for name in calibrated.thresholds)
        statistics = input_statistics(tiny_model, moved.groups, blocks, batch_size=3, thresholded=False)
        for group in moved.groups:
            zeroed = float((statistics[group.name].sample < moved.thresholds[group.name]).float().mean())
            assert zeroed == pytest.approx(calibrated.sparsity[group.name], abs=0.02), group.name
        with pytest.raises(ValueError, match="the allocation names 1 projection inputs"):
            recalibrate_thresholds(tiny_model, blocks, config.where, dict([next(iter(calibrated.sparsity.items()))]), 3)
    finally:
        with torch.no_grad():
            for name, parameter in tiny_model.named_parameters():
                parameter.copy_(original[name])


def test_the_ramp_scales_every_input_linearly_to_its_allocation():
    """Distill's ramp (activations.ramp_steps): nothing zeroed at step 0, the allocation's shares
    between inputs kept on the way, the whole allocation from the ramp's last step on; no ramp is
    the allocation throughout."""
    from distill.sparsity.activations import ramped

    allocation = {"layers.0.q_proj": 0.6, "layers.0.down_proj": 0.3}
    assert ramped(allocation, 0, 40) == {"layers.0.q_proj": 0.0, "layers.0.down_proj": 0.0}
    quarter = ramped(allocation, 10, 40)
    assert quarter["layers.0.q_proj"] == pytest.approx(0.15) and quarter["layers.0.down_proj"] == pytest.approx(0.075)
    assert ramped(allocation, 40, 40) == ramped(allocation, 90, 40) == ramped(allocation, 0, 0) == allocation


def test_the_layer_error_is_relative_per_token():
    """Against a float64 reference: each token's error relative to its own norm, so a token with
    massive activations (100x the others' norm) weighs as much as any other."""
    from distill.sparsity.activations import _token_errors

    torch.manual_seed(3)
    reference = torch.randn(2, 5, 16, dtype=torch.float64)
    reference[0, 0] *= 100
    output = reference + 0.1 * torch.randn_like(reference) * reference.norm(dim=-1, keepdim=True) / 4
    expected = ((output - reference).norm(dim=-1) / reference.norm(dim=-1)).square()
    errors = _token_errors(output.float(), reference.float()).double()
    assert float(((errors - expected).abs() / expected).max()) < 1e-4


def test_greedy_allocation_costs_the_layer_less_error_than_uniform(tiny_model):
    """What the greedy search optimizes: on its calibration data, each layer's output error against
    the layer with dense inputs (relative per token, averaged), summed over layers, is no worse than
    uniform thresholds'."""
    from distill.sparsity.activations import _layer_output
    from distill.targets import decoder_layers

    torch.manual_seed(2)
    blocks = torch.randint(0, tiny_model.config.vocab_size, (6, 32))
    layers = decoder_layers(tiny_model)[1]

    def layer_errors(groups, thresholds) -> float:
        captured = []
        hooks = [layer.register_forward_pre_hook(lambda m, a, k: captured.append((m, a, k)), with_kwargs=True)
                 for layer in layers]
        with torch.no_grad():
            tiny_model(input_ids=blocks, use_cache=False)
        for hook in hooks:
            hook.remove()
        total = 0.0
        with torch.no_grad():
            for module, args, kwargs in captured:
                dense = _layer_output(module(*args, **kwargs))
                install_thresholds(tiny_model, groups, thresholds)
                sparse = _layer_output(module(*args, **kwargs))
                remove_thresholds(tiny_model)
                total += float(((sparse - dense).square().sum(-1) / dense.square().sum(-1)).mean())
        return total

    uniform = calibrate_thresholds(tiny_model, blocks, ActivationsConfig(target=0.5), batch_size=6)
    greedy = calibrate_thresholds(
        tiny_model, blocks, ActivationsConfig(target=0.5, allocation=Allocation.GREEDY, greedy_step=0.1), batch_size=6)
    assert layer_errors(greedy.groups, greedy.thresholds) <= layer_errors(uniform.groups, uniform.thresholds)
