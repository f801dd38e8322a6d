import math

import pytest
import torch
from torch import nn

from distill.sparsity.masks import (GroupDropout, add_weight_rule, install_masks, mask_rule, masked_modules, nm_mask,
                                    nm_violations, pack_bits, remove_masks, stored_weight, unpack_bits)
from distill.sparsity.patterns import NM


def mask_of(layer: nn.Linear) -> torch.Tensor:
    return mask_rule(layer).mask


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (1, 2), (3, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m):
    scores = torch.randn(6, 8 * m).abs()
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(6, 8, m)
    assert bool((groups.sum(-1) == n).all())
    # every kept score is at least as large as every dropped score of its group
    grouped = scores.reshape(6, 8, m)
    kept_min = torch.where(groups, grouped, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, grouped).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_nm_mask_refuses_input_sizes_that_are_not_a_multiple_of_m():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        nm_mask(torch.randn(4, 10), 2, 4)


def test_nm_violations_counts_dense_groups():
    weight = torch.randn(3, 8)
    assert nm_violations(weight, 2, 4) == 6
    weight = weight * nm_mask(weight.abs(), 2, 4)
    assert nm_violations(weight, 2, 4) == 0


def test_masked_linear_matches_dense_product_with_zeros_and_masks_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(16, 5).double()
    dense = linear.weight.detach().clone()
    mask = nm_mask(torch.rand(5, 16), 2, 4)
    install_masks(nn.Sequential(linear), {"0": mask})
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    reference = x @ (dense * mask).T + linear.bias.detach()
    out = linear(x)
    assert torch.allclose(out, reference, rtol=1e-12, atol=0)
    out.pow(2).sum().backward()
    grad = stored_weight(linear).grad
    assert bool((grad[~mask] == 0).all())
    assert bool((grad[mask] != 0).all())
    plain = (dense * mask).requires_grad_()
    (x @ plain.T + linear.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(grad, plain.grad * mask, rtol=1e-12, atol=0), "the plain product's gradient, masked"
    # a plain nn.Linear underneath: the state dict names the stored weight and the mask of its rule
    assert isinstance(linear, nn.Linear)
    assert set(linear.state_dict()) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.bits"}


@pytest.mark.parametrize("shape", [(5, 16), (3, 5), (7,), (2, 3, 12)])
def test_masks_are_kept_as_bits_and_unpack_to_the_same_mask(shape):
    mask = torch.rand(shape) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_bits(bits, shape), mask)


def test_a_rule_changes_its_mask_only_through_set_mask_and_loads_an_unpacked_mask():
    linear = nn.Linear(16, 5)
    first, second = nm_mask(torch.rand(5, 16), 2, 4), nm_mask(torch.rand(5, 16), 2, 4)
    install_masks(nn.Sequential(linear), {"0": first})
    rule = mask_rule(linear)
    rule.set_mask(second)
    assert torch.equal(rule.mask, second)
    with pytest.raises(ValueError, match="shape"):
        rule.set_mask(second.T)
    # a checkpoint from before masks were packed names the bool mask `mask`
    state = {"mask": first}
    rule.load_state_dict(state)
    assert torch.equal(rule.mask, first)


def test_masked_weights_stay_exactly_zero_through_adamw_with_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    masks = {"0": nm_mask(torch.rand(32, 16), 2, 4), "2": nm_mask(torch.rand(8, 32), 2, 4)}
    install_masks(model, masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {name: stored_weight(module).detach().clone() for name, module in masked_modules(model)}
    for _ in range(20):  # nothing re-applies the masks: the parametrization's product alone keeps them
        loss = model(torch.randn(4, 16)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in masked_modules(model):
        mask, weight = mask_of(module), stored_weight(module)
        assert bool((weight[~mask] == 0).all()), name
        assert not torch.equal(weight[mask], before[name][mask]), "kept weights must train"


def test_remove_masks_gives_plain_linears_with_the_same_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    install_masks(model, {"0": nm_mask(torch.rand(8, 8), 2, 4), "1": nm_mask(torch.rand(4, 8), 1, 4)})
    x = torch.randn(5, 8)
    expected = model(x)
    remove_masks(model)
    assert not list(masked_modules(model))
    assert all(type(module) is nn.Linear for module in model)
    assert torch.equal(model(x), expected)


def test_sparse_refined_ste_passes_the_gradient_and_decays_pruned_weights():
    from distill.sparsity.masks import SparseRefinedSTE

    torch.manual_seed(3)
    weight = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    mask = nm_mask(torch.rand(4, 8), 2, 4)
    upstream = torch.randn(4, 8, dtype=torch.float64)
    out = SparseRefinedSTE.apply(weight, mask, 0.1)
    assert torch.equal(out, weight.detach() * mask)
    (grad,) = torch.autograd.grad(out, weight, upstream)
    assert torch.allclose(grad, upstream + 0.1 * weight.detach() * ~mask, rtol=1e-12, atol=0)


def test_dynamic_masks_follow_the_weights_and_keep_the_pattern():
    from distill.sparsity.modes import DynamicMasks

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 16))
    install_masks(model, {"0": nm_mask(torch.rand(16, 16), 2, 4)})
    layer = model[0]
    dynamic = DynamicMasks(model, NM(2, 4), every=2, decay=1e-3)
    before = mask_of(layer).clone()
    with torch.no_grad():
        stored_weight(layer).copy_(torch.randn(16, 16))  # as if training had moved the dense weights
    dynamic.after_step(1)
    assert torch.equal(mask_of(layer), before), "masks change only every `every` steps"
    dynamic.after_step(2)
    assert torch.equal(mask_of(layer), nm_mask(stored_weight(layer).abs(), 2, 4))
    assert not torch.equal(mask_of(layer), before)
    layer(torch.randn(3, 16)).sum().backward()
    assert bool((stored_weight(layer).grad[~mask_of(layer)] != 0).all()), "pruned weights get gradients while dynamic"
    dynamic.finish(model)
    assert type(mask_rule(layer)).__name__ == "FixedMask" and bool((stored_weight(layer)[~mask_of(layer)] == 0).all())
    assert nm_violations(layer.weight.detach(), 2, 4) == 0


def test_dynamic_masks_score_with_the_input_norms_when_given():
    from distill.sparsity.modes import DynamicMasks

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 8))
    install_masks(model, {"0": nm_mask(torch.rand(8, 16), 2, 4)})
    layer = model[0]
    with torch.no_grad():
        stored_weight(layer).copy_(torch.randn(8, 16))
    norms = torch.rand(16) * 10
    DynamicMasks(model, NM(2, 4), every=1, decay=0.0, square_sums={"0": norms**2}).after_step(1)
    weight = stored_weight(layer).detach()
    assert torch.equal(mask_of(layer), nm_mask(weight.abs() * norms, 2, 4))
    assert not torch.equal(mask_of(layer), nm_mask(weight.abs(), 2, 4))


def test_learnable_masks_sample_valid_patterns_and_train_their_logits():
    from distill.sparsity.modes import LearnableMasks

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 8))
    install_masks(model, {"0": nm_mask(torch.rand(8, 16), 2, 4)})
    layer = model[0]
    start = mask_of(layer).clone()
    learnable = LearnableMasks(model, NM(2, 4), init_logit=3.0, temperature=1.0)
    rule = mask_rule(layer)
    assert rule.choice_logits.shape == (8, 4, 6)
    assert learnable.parameters() == [rule.choice_logits]
    learnable.after_step(1)
    assert torch.equal(mask_of(layer), start), "initialised to the prune stage's choice"
    sampled = rule.sampled_mask().detach()  # hard values; the straight-through sum may be off by rounding
    assert torch.allclose(sampled, sampled.round(), atol=1e-6)
    assert bool((sampled.round().reshape(8, 4, 4).sum(-1) == 2).all())
    layer(torch.randn(5, 16)).pow(2).sum().backward()
    assert rule.choice_logits.grad is not None and float(rule.choice_logits.grad.abs().sum()) > 0
    with torch.no_grad():
        rule.choice_logits[0, 0] = torch.tensor([9.0, 0, 0, 0, 0, 0])  # candidate 0 keeps positions 0 and 1
    learnable.finish(model)
    assert mask_of(layer)[0, :4].tolist() == [True, True, False, False]
    assert nm_violations(layer.weight.detach(), 2, 4) == 0 and bool((stored_weight(layer)[~mask_of(layer)] == 0).all())
    assert not any("choice_logits" in key for key in model.state_dict())


def test_learnable_mask_noise_redraws_the_expected_share_of_groups_and_anneals_to_none():
    """At full noise a group whose chosen candidate leads by 3.0 is redrawn with probability
    5 / (e^3 + 5) (2:4 has 6 candidates); the noise falls linearly, and at the last step every
    group takes its most likely candidate, the mask that will be exported."""
    from distill.sparsity.modes import LearnableMasks

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(512, 64))
    install_masks(model, {"0": nm_mask(torch.rand(64, 512), 2, 4)})
    layer = model[0]
    learnable = LearnableMasks(model, NM(2, 4), init_logit=3.0, temperature=1.0, noise=1.0)
    rule = mask_rule(layer)
    groups = rule.mask.numel() // 4

    def redrawn_share() -> float:
        sampled = rule.sampled_mask().detach().round().bool()
        return float((sampled != rule.mask).reshape(groups, 4).any(-1).float().mean())

    expected = 5 / (math.exp(3.0) + 5)
    assert rule.noise == 1.0, "full noise from the start, before any anneal"
    learnable.before_step(0, 101)
    assert redrawn_share() == pytest.approx(expected, abs=0.02)  # 8192 groups: ~5 standard deviations
    learnable.before_step(50, 101)
    assert rule.noise == 0.5 and redrawn_share() < expected / 2
    learnable.before_step(100, 101)  # the last of 101 steps
    assert rule.noise == 0.0 and redrawn_share() == 0.0


def test_moving_masks_start_from_the_teachers_values_under_pruned_positions(tiny_teacher):
    from transformers import AutoModelForCausalLM

    from distill.config import PROJECTIONS
    from distill.sparsity.modes import revive_pruned_weights
    from distill.sparsity.masks import RefinedMask, install_masks, masked_modules, nm_mask, set_mask_rule
    from distill.targets import target_linears

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    install_masks(student, {name: nm_mask(linear.weight.abs(), 2, 4) for name, linear in target_linears(student, PROJECTIONS)})
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = student(input_ids=ids).logits
    kept = {name: stored_weight(module)[mask_of(module)].clone() for name, module in masked_modules(student)}
    with pytest.raises(ValueError, match="fixed mask"):
        revive_pruned_weights(student, teacher)  # a FixedMask reads its stored weights as they are
    for _, module in masked_modules(student):
        set_mask_rule(module, RefinedMask(mask_of(module), decay=2e-4))
    revived = revive_pruned_weights(student, teacher)
    assert revived == sum(int((~mask_of(module)).sum()) for _, module in masked_modules(student)) > 0
    for name, module in masked_modules(student):
        dense, weight, mask = teacher.get_submodule(name).weight, stored_weight(module), mask_of(module)
        assert torch.equal(weight[~mask], dense[~mask]), name
        assert torch.equal(weight[mask], kept[name]), name
        assert bool((weight[~mask] != 0).any()), name
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, before), "the masked function is unchanged"


def test_group_dropout_stacks_after_the_mask_and_is_off_in_eval():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(32, 16))
    mask = nm_mask(torch.rand(16, 32), 2, 4)
    install_masks(model, {"0": mask})
    layer = model[0]
    add_weight_rule(layer, GroupDropout(lambda shape, device: NM(2, 4).dropout_mask(shape, 0.5, device), 0.5))
    masked = stored_weight(layer).detach() * mask
    dropped = layer.weight.detach()  # training: whole groups of 4 zero, the rest scaled by 2
    nonzero, kept = (dropped != 0).reshape(16, 8, 4), mask.reshape(16, 8, 4)
    assert bool(((nonzero == kept).all(-1) | ~nonzero.any(-1)).all()), "groups are dropped whole"
    assert torch.allclose(dropped[dropped != 0], 2 * masked[dropped != 0])
    assert 0.3 < float((dropped != 0).sum() / (masked != 0).sum()) < 0.7
    model.eval()
    assert torch.equal(layer.weight.detach(), masked), "eval sees the mask alone"
    from distill.sparsity.modes import FixedMasks

    FixedMasks().finish(model)  # leaves the plain fixed mask
    assert len(layer.parametrizations.weight) == 1


def test_plain_parameters_list_each_weight_before_its_bias_as_the_unmasked_model_does():
    from distill.sparsity.masks import plain_parameters

    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    names = {id(p): name for name, p in model.named_parameters()}
    expected = [names[id(p)] for p in model.parameters()]
    install_masks(model, {"0": nm_mask(torch.rand(8, 8), 2, 4), "2": nm_mask(torch.rand(4, 8), 2, 4)})
    plain = {id(stored_weight(model[0])): "0.weight", id(stored_weight(model[2])): "2.weight"}
    plain.update({id(p): name for name, p in model.named_parameters() if "parametrizations" not in name})
    assert [plain[id(p)] for p in plain_parameters(model)] == expected
