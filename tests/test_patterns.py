import pytest
import torch

from distill.patterns import Pattern, global_unstructured_masks


@pytest.mark.parametrize("pattern", [
    Pattern("nm", n=2, m=4), Pattern("nm", n=1, m=4), Pattern("nm", n=4, m=8),
    Pattern("block", block=4, sparsity=0.5), Pattern("block", block=8, sparsity=0.25),
    Pattern("channel", axis="input", sparsity=0.5), Pattern("channel", axis="output", sparsity=0.75),
    Pattern("unstructured", sparsity=0.6),
])
def test_masks_have_the_pattern_and_the_sparsity_and_keep_the_best_scores(pattern):
    torch.manual_seed(0)
    scores = torch.rand(32, 64)
    mask = pattern.mask(scores)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert pattern.violations(mask) == 0
    expected = 1 - pattern.n / pattern.m if pattern.kind == "nm" else pattern.sparsity
    assert float((~mask).float().mean()) == pytest.approx(expected, abs=1 / mask.numel())
    # what was removed scored lower, group by group, than what was kept (checked on the unit it removes)
    if pattern.kind == "unstructured":
        assert float(scores[mask].min()) >= float(scores[~mask].max())
    if pattern.kind == "channel":
        dim = 0 if pattern.axis == "input" else 1
        channel_scores, channel_kept = scores.sum(dim), mask.any(dim)
        assert float(channel_scores[channel_kept].min()) >= float(channel_scores[~channel_kept].max())


def test_violations_catch_broken_structures():
    broken = torch.ones(8, 16, dtype=torch.bool)
    broken[0, 0] = False
    assert Pattern("nm", n=2, m=4).violations(broken) == 32  # every group keeps more than 2
    assert Pattern("block", block=4).violations(broken) == 1
    assert Pattern("channel", axis="input").violations(broken) == 1
    assert Pattern("channel", axis="output").violations(broken) == 1


def test_incompatible_shapes_are_named():
    assert "not a multiple of 4" in Pattern("nm").incompatible((8, 18))
    assert "8x8 block" in Pattern("block", block=8).incompatible((12, 16))
    assert Pattern("channel").incompatible((7, 9)) is None


def test_global_unstructured_removes_the_fraction_over_all_layers():
    torch.manual_seed(1)
    scores = {"a": torch.rand(16, 16), "b": torch.rand(8, 32) * 0.5}  # b scores lower overall
    masks = global_unstructured_masks(scores, 0.5)
    removed = sum(int((~mask).sum()) for mask in masks.values())
    assert removed == 256
    assert float((~masks["b"]).float().mean()) > float((~masks["a"]).float().mean())
