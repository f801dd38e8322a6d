"""Channel permutation for N:M: the search never loses score, finds the best split of two groups,
keeps a real MLP's function exactly, and lowers the pruned MLP's output error on real text."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.sparsity.permutation import gated_mlps, kept_score, nm_channel_permutation, permute_mlp_channels
from distill.sparsity.masks import nm_mask


def test_two_groups_get_the_best_of_every_split():
    torch.manual_seed(0)
    scores = torch.rand(16, 8) ** 3
    perm = nm_channel_permutation(scores, 2, 4, sweeps=1)
    best = max(kept_score(scores[:, list(first) + [c for c in range(8) if c not in first]], 2, 4)
               for first in itertools.combinations(range(8), 4))
    assert kept_score(scores[:, perm], 2, 4) == pytest.approx(best, rel=1e-6)
    assert sorted(perm.tolist()) == list(range(8))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_search_never_loses_score_and_gains_on_structured_scores(n, m):
    torch.manual_seed(n * 10 + m)
    # columns of very different importance, the way activation norms are: a good order spreads the
    # important columns over different groups
    scores = torch.rand(64, 128) * torch.rand(128).pow(4) * 10
    perm = nm_channel_permutation(scores, n, m, sweeps=10, seed=1)
    assert sorted(perm.tolist()) == list(range(128))
    before, after = kept_score(scores, n, m), kept_score(scores[:, perm], n, m)
    assert after > before * 1.01


def test_a_permuted_mlp_computes_the_same_function(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float64).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    mlps = gated_mlps(model)
    assert len(mlps) == model.config.num_hidden_layers
    for _, mlp in mlps:
        permute_mlp_channels(mlp, torch.randperm(mlp.down_proj.in_features))
    with torch.no_grad():
        actual = model(input_ids=ids).logits
    # the same function up to float64 rounding, which a change of summation order may leave
    assert float((actual - expected).norm() / expected.norm()) < 1e-12
    # and the permutation really moved the channels: the weights are not the ones it started from
    reference = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float64)
    assert not torch.equal(mlps[0][1].down_proj.weight, reference.model.layers[0].mlp.down_proj.weight)


@pytest.mark.slow  # the real demo teacher
def test_permutation_lowers_the_pruned_mlp_output_error_on_real_text(demo_teacher_dir):
    """On the real demo teacher and real text: Wanda 2:4 of the first MLP's down_proj, with and
    without the permutation; the MLP output error against the dense MLP drops."""
    from transformers import AutoTokenizer

    from conftest import VALID_TEXT

    model = AutoModelForCausalLM.from_pretrained(demo_teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_teacher_dir)
    ids = tokenizer(VALID_TEXT.read_text()[:20000], return_tensors="pt").input_ids[:, :512]
    mlp = model.model.layers[3].mlp
    captured = {}
    hook = mlp.down_proj.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    x = captured["x"].reshape(-1, mlp.down_proj.in_features)
    weight = mlp.down_proj.weight.detach()
    dense_out = x @ weight.T
    score = weight.abs() * x.pow(2).sum(0).sqrt()

    def pruned_error(order):
        w, s = weight[:, order], score[:, order]
        return float(((x[:, order] @ (w * nm_mask(s, 2, 4)).T) - dense_out).norm() / dense_out.norm())

    identity = torch.arange(weight.shape[1])
    perm = nm_channel_permutation(score, 2, 4, sweeps=50)
    assert kept_score(score[:, perm], 2, 4) > kept_score(score, 2, 4)
    assert pruned_error(perm) < pruned_error(identity)
