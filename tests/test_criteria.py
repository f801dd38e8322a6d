"""Pruning criteria on a tiny Llama and on one layer with real-looking correlated inputs."""

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import VALID_TEXT
from distill.config import PROJECTIONS
from distill.sparsity.prune_config import Criterion, PatternKind, PruneConfig, Scope
from distill.sparsity.criteria import gradient_saliency, sparsegpt_masks, sparsegpt_nm
from distill.data.corpus import pack, tokenize_files
from distill.sparsity.masks import nm_mask, nm_violations
from distill.targets import resolve_targets, target_linears
from distill.sparsity.pruning import masks_from_scores


@pytest.fixture(scope="module")
def calibration(tiny_teacher):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    return pack(tokenize_files([str(VALID_TEXT)], tokenizer), 32)[:8]


def load(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["taylor", "fisher"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_gradient_criteria_give_valid_nm_masks(tiny_teacher, calibration, kind, n, m):
    model = load(tiny_teacher)
    scores = gradient_saliency(model, calibration, PROJECTIONS, Accelerator(cpu=True), kind)
    assert set(scores) == {name for name, _ in target_linears(model, PROJECTIONS)}
    assert all(float(score.sum()) > 0 for score in scores.values())
    masks = masks_from_scores(model, PruneConfig(criterion=kind, n=n, m=m), resolve_targets(model, PROJECTIONS), scores,
                              dense={})
    for name, mask in masks.items():
        rows, cols = mask.shape
        assert bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all()), name


def test_sparsegpt_prunes_every_layer_to_2_4_and_keeps_the_model_close(tiny_teacher, calibration):
    model, dense = load(tiny_teacher), load(tiny_teacher)
    masks = sparsegpt_masks(model, calibration, PROJECTIONS, 2, 4)
    assert len(masks) == 14
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert nm_violations(weight, 2, 4) == 0, name
        assert bool((weight[~mask] == 0).all()), name
    with torch.no_grad():
        logits, reference = model(input_ids=calibration).logits, dense(input_ids=calibration).logits
    assert float((logits - reference).norm() / reference.norm()) < 0.5


def test_sparsegpt_reconstructs_a_layer_better_than_magnitude_and_wanda():
    torch.manual_seed(0)
    rows, cols, tokens = 64, 128, 2048
    # inputs with correlated features and uneven scales, as real activations have
    mixing = torch.randn(cols, cols) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols) @ mixing) * torch.linspace(0.2, 3.0, cols)
    weight = torch.randn(rows, cols)
    target = x @ weight.T
    hessian = x.double().T @ x.double()

    def error(pruned):
        return float((x @ pruned.T - target).norm() / target.norm())

    magnitude = weight * nm_mask(weight.abs(), 2, 4)
    wanda = weight * nm_mask(weight.abs() * x.norm(dim=0), 2, 4)
    sparsegpt, mask = sparsegpt_nm(weight, hessian, 2, 4)
    assert nm_violations(sparsegpt.float(), 2, 4) == 0 and bool((mask.reshape(rows, -1, 4).sum(-1) == 2).all())
    assert error(sparsegpt.float()) < 0.95 * error(wanda) < error(magnitude)


@pytest.mark.parametrize("n,m", [(2, 6), (1, 3), (4, 8)])
def test_sparsegpt_handles_group_sizes_that_do_not_divide_its_column_block(n, m):
    torch.manual_seed(n * 10 + m)
    cols = 132 * m // 6 * 2 if m == 6 else 132 if m == 3 else 256
    x = torch.randn(512, cols)
    weight = torch.randn(8, cols)
    pruned, mask = sparsegpt_nm(weight, x.double().T @ x.double(), n, m)
    assert bool((mask.reshape(8, cols // m, m).sum(-1) == n).all())
    assert bool((pruned[~mask] == 0).all())


def test_projections_that_share_an_input_are_pruned_in_one_sweep_with_the_same_result(tiny_teacher, calibration):
    from distill.sparsity.criteria import _decoder_layers, _first_layer_inputs, sparsegpt_nm
    from distill.targets import shared_input_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    layer = _decoder_layers(model)[0]
    linears = dict(target_linears(layer, PROJECTIONS))
    with torch.no_grad():
        groups = shared_input_groups(layer, linears, _first_layer_inputs(model, calibration[:2], 2)[0])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    torch.manual_seed(0)
    x = torch.randn(200, 16, dtype=torch.float64)
    hessian = x.T @ x
    first, second = torch.randn(5, 16), torch.randn(3, 16)
    stacked, stacked_mask = sparsegpt_nm(torch.cat([first, second]), hessian, 2, 4, block_size=8)
    alone = [sparsegpt_nm(weight, hessian, 2, 4, block_size=8) for weight in (first, second)]
    assert torch.equal(stacked_mask, torch.cat([mask for _, mask in alone]))
    expected = torch.cat([weight for weight, _ in alone])
    assert float((stacked - expected).abs().max() / expected.abs().max()) < 1e-12


@pytest.mark.parametrize("pattern", [{"n": 2, "m": 4},
                                     {"pattern": PatternKind.UNSTRUCTURED, "sparsity": 0.5, "scope": Scope.GLOBAL}])
def test_weight_scores_read_one_projection_at_a_time_give_the_masks_of_all_scores_at_once(tiny_teacher, pattern):
    """The prune stage's scores are computed as each projection's mask is taken (never all held for a
    per-projection pattern); a pattern across projections gets them all. Both give the masks of a plain
    dict of every score."""
    from distill.sparsity.calibration import wanda_score
    from distill.sparsity.pruning import WeightScores

    model = load(tiny_teacher)
    targets = resolve_targets(model, PROJECTIONS)
    statistics = {name: torch.rand(linear.in_features) + 0.1 for name, linear in target_linears(model, PROJECTIONS)}
    prune = PruneConfig(criterion=Criterion.WANDA, **pattern)
    lazy = WeightScores(model, prune, targets, statistics)
    every = {name: wanda_score(model.get_submodule(name).weight, statistics[name]) for name in statistics}
    assert sorted(lazy) == sorted(every) and len(lazy) == 14
    expected = masks_from_scores(model, prune, targets, every, dense={})
    masks = masks_from_scores(model, prune, targets, lazy, dense={})
    assert sorted(masks) == sorted(expected)
    assert all(torch.equal(masks[name], expected[name]) for name in masks)
    assert 0.3 < sum(float(mask.float().mean()) for mask in masks.values()) / len(masks) < 0.7
