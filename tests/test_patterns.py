import pytest
import torch

from distill.sparsity.prune_config import ChannelAxis
from distill.sparsity.patterns import NM, Blocks, Channels, HeadGroups, MLPChannels, Pattern, Unstructured, \
    global_unstructured_masks

INPUT, OUTPUT = ChannelAxis.INPUT, ChannelAxis.OUTPUT


@pytest.mark.parametrize("pattern", [
    NM(2, 4), NM(1, 4), NM(4, 8),
    Blocks(block=4, sparsity=0.5), Blocks(block=8, sparsity=0.25),
    Channels(INPUT, sparsity=0.5), Channels(OUTPUT, sparsity=0.75),
    Unstructured(sparsity=0.6),
])
def test_masks_have_the_pattern_and_the_sparsity_and_keep_the_best_scores(pattern):
    torch.manual_seed(0)
    scores = torch.rand(32, 64)
    mask = pattern.mask(scores)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert pattern.violations(mask) == 0
    expected = 1 - pattern.n / pattern.m if isinstance(pattern, NM) else pattern.sparsity
    assert float((~mask).float().mean()) == pytest.approx(expected, abs=1 / mask.numel())
    # what was removed scored lower, group by group, than what was kept (checked on the unit it removes)
    if isinstance(pattern, Unstructured):
        assert float(scores[mask].min()) >= float(scores[~mask].max())
    if isinstance(pattern, Channels):
        dim = 0 if pattern.axis is INPUT else 1
        channel_scores, channel_kept = scores.sum(dim), mask.any(dim)
        assert float(channel_scores[channel_kept].min()) >= float(channel_scores[~channel_kept].max())


def test_violations_catch_broken_structures():
    broken = torch.ones(8, 16, dtype=torch.bool)
    broken[0, 0] = False
    assert NM(2, 4).violations(broken) == 32  # every group keeps more than 2
    assert Blocks(block=4).violations(broken) == 1
    assert Channels(INPUT).violations(broken) == 1
    assert Channels(OUTPUT).violations(broken) == 1


def test_incompatible_shapes_are_named():
    assert "not a multiple of 4" in NM().incompatible((8, 18))
    assert "8x8 block" in Blocks(block=8).incompatible((12, 16))
    assert Channels().incompatible((7, 9)) is None


@pytest.mark.parametrize("pattern", [NM(1, 4), Blocks(8, 0.25), Channels(OUTPUT, 0.75), Unstructured(0.6),
                                     MLPChannels(0.25), HeadGroups(0.5)])
def test_a_pattern_round_trips_through_its_spec_and_old_specs_still_read(pattern):
    assert Pattern.from_spec(pattern.to_spec()) == pattern
    # specs written before patterns were classes carried every field of every pattern
    old = {"kind": pattern.kind.value, "n": 2, "m": 4, "sparsity": 0.5, "block": 4, "axis": "input", "scope": "layer"}
    old.update({key: getattr(value, "value", value) for key, value in pattern.to_spec().items()})
    assert Pattern.from_spec(old) == pattern


def test_global_unstructured_removes_the_fraction_over_all_layers():
    torch.manual_seed(1)
    scores = {"a": torch.rand(16, 16), "b": torch.rand(8, 32) * 0.5}  # b scores lower overall
    masks = global_unstructured_masks(scores, 0.5)
    removed = sum(int((~mask).sum()) for mask in masks.values())
    assert removed == 256
    assert float((~masks["b"]).float().mean()) > float((~masks["a"]).float().mean())


@pytest.mark.parametrize("pattern", [NM(2, 4), Blocks(block=4), Channels(INPUT), Channels(OUTPUT), Unstructured()])
def test_group_norms_and_group_dropout_act_on_whole_groups(pattern):
    torch.manual_seed(5)
    weight = torch.randn(16, 32, dtype=torch.float64, requires_grad=True)
    norms = pattern.group_norms(weight)
    assert float(norms.square().sum()) == pytest.approx(float(weight.detach().square().sum()), rel=1e-12) \
        if not isinstance(pattern, Unstructured) else float(norms.sum()) == pytest.approx(float(weight.detach().abs().sum()))
    # a group that is entirely zero contributes zero and a zero (not NaN) gradient
    dropped = pattern.dropout_mask((16, 32), rate=0.5)
    if isinstance(pattern, NM):  # whole groups of m go together
        groups = dropped.reshape(16, -1, pattern.m)
        assert bool((groups.all(-1) | ~groups.any(-1)).all())
    elif not isinstance(pattern, Unstructured):
        assert pattern.violations(dropped) == 0
    assert 0.3 < float(dropped.float().mean()) < 0.7
    zeroed = weight * dropped
    pattern.group_norms(zeroed).sum().backward()
    assert not torch.isnan(weight.grad).any()
    assert bool((weight.grad[~dropped] == 0).all())


@pytest.mark.parametrize("kind", ["mlp_channels", "heads"])
def test_spanning_masks_remove_whole_channels_across_projections(tiny_teacher, kind):
    from transformers import AutoModelForCausalLM

    from distill.config import PROJECTIONS
    from distill.targets import target_linears
    from distill.sparsity.structured import structured_masks

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    torch.manual_seed(3)
    scores = {name: torch.rand_like(linear.weight) for name, linear in target_linears(model, PROJECTIONS)}
    masks = structured_masks(model, kind, scores, 0.5)
    pattern = MLPChannels(0.5) if kind == "mlp_channels" else HeadGroups(0.5)
    parts = ("gate_proj", "up_proj", "down_proj") if kind == "mlp_channels" else ("q_proj", "k_proj", "v_proj", "o_proj")
    assert sorted({name.rsplit(".", 1)[1] for name in masks}) == sorted(parts)
    for name, mask in masks.items():
        assert pattern.violations(mask) == 0, name
        assert float(mask.float().mean()) == pytest.approx(0.5), name
    broken = masks[next(iter(masks))].clone()
    broken[0, 0] = ~broken[0, 0]
    assert pattern.violations(broken) > 0
    layer = "model.layers.0.mlp" if kind == "mlp_channels" else "model.layers.0.self_attn"
    if kind == "mlp_channels":  # the same channels go in every projection of the MLP
        assert torch.equal(masks[f"{layer}.gate_proj"][:, 0], masks[f"{layer}.down_proj"][0])
        assert torch.equal(masks[f"{layer}.up_proj"][:, 0], masks[f"{layer}.down_proj"][0])
    else:  # a kv head goes with both query heads that share it (4 heads, 2 kv heads, head_dim 16)
        kv_kept = masks[f"{layer}.k_proj"][::16, 0]
        assert torch.equal(masks[f"{layer}.q_proj"][::32, 0], kv_kept)
        assert torch.equal(masks[f"{layer}.o_proj"][0, ::32], kv_kept)
        assert int(kv_kept.sum()) == 1
    with pytest.raises(ValueError, match="span several projections"):
        pattern.mask(scores[next(iter(scores))])
