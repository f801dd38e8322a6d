"""AdamW with bf16 moments against a float64 AdamW that rounds its stored moments to bf16 the same
way, and against torch's fp32 AdamW, on fresh random weights and gradients."""

from __future__ import annotations

import torch

from distill.config import OptimizerState
from distill.train.optimizer import AdamWBf16Moments, build_adamw

LR, BETAS, WEIGHT_DECAY, EPS = 1e-2, (0.9, 0.95), 0.1, 1e-8


def reference_steps(weight: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """AdamW in float64 whose stored moments are rounded to bf16; each step's update uses the
    moments before their rounding, as the optimizer does."""
    weight = weight.double()
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    for step, grad in enumerate(grads, start=1):
        grad = grad.double()
        average = BETAS[0] * exp_avg + (1 - BETAS[0]) * grad
        square_average = BETAS[1] * exp_avg_sq + (1 - BETAS[1]) * grad * grad
        exp_avg, exp_avg_sq = (tensor.to(torch.bfloat16).double() for tensor in (average, square_average))
        weight = weight * (1 - LR * WEIGHT_DECAY)
        corrected = (average / (1 - BETAS[0] ** step)) / ((square_average / (1 - BETAS[1] ** step)).sqrt() + EPS)
        weight = weight - LR * corrected
    return weight


def run(optimizer_class, weight: torch.Tensor, grads: list[torch.Tensor], **options) -> torch.Tensor:
    param = torch.nn.Parameter(weight.clone())
    optimizer = optimizer_class([{"params": [param]}], lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **options)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach()


def relative_error(actual: torch.Tensor, expected: torch.Tensor, start: torch.Tensor) -> float:
    """Of the change the steps made, not of the weights (which barely move)."""
    return ((actual.double() - expected).norm() / (expected - start.double()).norm()).item()


def test_bf16_moments_follow_a_float64_adamw_that_stores_bf16_moments():
    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    grads = [torch.randn(64, 96) * (0.5 + step) for step in range(6)]
    actual = run(AdamWBf16Moments, weight, grads)
    assert relative_error(actual, reference_steps(weight, grads), weight) < 1e-5
    # and torch's fp32 AdamW to within bf16's rounding of the moments
    fp32 = run(torch.optim.AdamW, weight, grads, eps=EPS)
    assert relative_error(actual, fp32.double(), weight) < 1e-2
    assert not torch.equal(actual, fp32), "the moments are stored in bf16, so the paths differ"


def test_the_stored_moments_are_bf16_and_the_gradient_is_left_alone():
    torch.manual_seed(1)
    param = torch.nn.Parameter(torch.randn(32, 32))
    optimizer = build_adamw(OptimizerState.BF16, [{"params": [param]}], lr=LR, betas=BETAS, weight_decay=0.0,
                            device=torch.device("cpu"))
    param.grad = torch.randn(32, 32)
    grad = param.grad.clone()
    optimizer.step()
    state = optimizer.state[param]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(param.grad, grad)
    assert isinstance(build_adamw(OptimizerState.FP32, [{"params": [param]}], lr=LR, betas=BETAS, weight_decay=0.0,
                                  device=torch.device("cpu")), torch.optim.AdamW)


def test_a_reloaded_optimizer_keeps_bf16_moments_and_continues_bit_for_bit():
    """torch's Optimizer.load_state_dict casts floating-point state to the parameter's dtype; the
    moments must come back as they were saved, so a resumed run repeats an uninterrupted one."""
    torch.manual_seed(2)
    weight = torch.randn(48, 64)
    grads = [torch.randn(48, 64) for _ in range(4)]
    uninterrupted = run(AdamWBf16Moments, weight, grads)

    param = torch.nn.Parameter(weight.clone())
    first = AdamWBf16Moments([{"params": [param]}], lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    for grad in grads[:2]:
        param.grad = grad.clone()
        first.step()
    saved = first.state_dict()
    resumed_param = torch.nn.Parameter(param.detach().clone())
    resumed = AdamWBf16Moments([{"params": [resumed_param]}], lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    resumed.load_state_dict(saved)
    assert resumed.state[resumed_param]["exp_avg"].dtype == torch.bfloat16
    for grad in grads[2:]:
        resumed_param.grad = grad.clone()
        resumed.step()
    assert torch.equal(resumed_param.detach(), uninterrupted)


def test_updating_in_slices_gives_the_same_weights_as_one_pass(monkeypatch):
    """The update runs slice by slice to bound its fp32 temporaries; a tensor that spans several
    slices (and ends in a partial one) must come out bit for bit as from one pass."""
    torch.manual_seed(3)
    weight = torch.randn(37, 29)
    grads = [torch.randn(37, 29) for _ in range(3)]
    whole = run(AdamWBf16Moments, weight, grads)
    monkeypatch.setattr(AdamWBf16Moments, "SLICE", 100)
    sliced = run(AdamWBf16Moments, weight, grads)
    assert torch.equal(sliced, whole)
    assert relative_error(sliced, reference_steps(weight, grads), weight) < 1e-5
