import pytest
import torch
import torch.nn.functional as F

from distill.config import LossConfig
from distill.losses import distillation_loss, forward_kl, next_token_loss


def reference_kl(student, teacher, temperature):
    """Plain float64 KL(teacher || student) at temperature T, times T^2, averaged over positions."""
    s = F.log_softmax(student.double() / temperature, -1).reshape(-1, student.shape[-1])
    t = F.log_softmax(teacher.double() / temperature, -1).reshape(-1, teacher.shape[-1])
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_kl_matches_a_float64_reference(temperature, dtype):
    torch.manual_seed(int(temperature * 10))
    student = (torch.randn(3, 7, 101) * 3).to(dtype)
    teacher = (torch.randn(3, 7, 101) * 3).to(dtype)
    expected = reference_kl(student, teacher, temperature)
    actual = forward_kl(student, teacher, temperature)
    assert actual.dtype == torch.float32
    assert abs(float(actual) - float(expected)) / float(expected) < 1e-5


def test_forward_kl_gradient_matches_the_reference():
    torch.manual_seed(1)
    student = torch.randn(2, 5, 33, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 33, dtype=torch.float64)
    (grad,) = torch.autograd.grad(forward_kl(student, teacher, 2.0), student)
    (expected,) = torch.autograd.grad(reference_kl(student, teacher, 2.0), student)
    assert float((grad - expected).norm() / expected.norm()) < 1e-6


def test_forward_kl_is_zero_only_for_identical_distributions():
    logits = torch.randn(2, 4, 50)
    assert float(forward_kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(forward_kl(logits + torch.randn_like(logits), logits)) > 1e-3


def test_next_token_loss_matches_cross_entropy_of_shifted_targets():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 40)
    ids = torch.randint(0, 40, (2, 6))
    expected = sum(F.cross_entropy(logits[b, t].double()[None], ids[b, t + 1][None])
                   for b in range(2) for t in range(5)) / 10
    assert float(next_token_loss(logits, ids)) == pytest.approx(float(expected), rel=1e-5)


def test_distillation_loss_mixes_the_parts_by_their_weights():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 6, 40), torch.randn(2, 6, 40)
    ids = torch.randint(0, 40, (2, 6))
    total, parts = distillation_loss(student, teacher, ids, LossConfig(temperature=2.0, kd_weight=0.7, lm_weight=0.3))
    assert set(parts) == {"kd", "lm"}
    assert float(total) == pytest.approx(0.7 * float(forward_kl(student, teacher, 2.0)) + 0.3 * float(next_token_loss(student, ids)), rel=1e-6)
    total, parts = distillation_loss(student, None, ids, LossConfig(kd_weight=0.0, lm_weight=1.0))
    assert set(parts) == {"lm"}
