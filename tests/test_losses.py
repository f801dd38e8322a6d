import pytest
import torch
import torch.nn.functional as F

from distill.sections import LossConfig
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


def reference_divergence(student, teacher, kind, temperature, beta=0.5):
    """Plain float64 per-position divergences, written from the definitions."""
    s = torch.softmax(student.double() / temperature, -1)
    t = torch.softmax(teacher.double() / temperature, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)
    if kind == "forward_kl":
        value = kl(t, s)
    elif kind == "reverse_kl":
        value = kl(s, t)
    else:
        mix = beta * t + (1 - beta) * s
        value = beta * kl(t, mix) + (1 - beta) * kl(s, mix)
    return value * temperature**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,beta", [(1.0, 0.5), (2.0, 0.1), (0.7, 0.9)])
def test_divergences_match_their_definitions(kind, temperature, beta):
    from distill.losses import divergence

    torch.manual_seed(11)
    student, teacher = torch.randn(9, 57) * 2, torch.randn(9, 57) * 2
    expected = reference_divergence(student, teacher, kind, temperature, beta)
    actual = divergence(student, teacher, kind, temperature, beta)
    assert float((actual.double() - expected).abs().max() / expected.abs().max()) < 1e-5
    assert bool((actual >= -1e-6).all())


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 1000])
@pytest.mark.parametrize("lm_weight", [0.0, 0.4])
def test_chunked_loss_equals_the_full_logits_loss_with_the_same_gradients(kind, chunk_tokens, lm_weight):
    from distill.losses import chunked_distillation_loss

    torch.manual_seed(chunk_tokens)
    batch, length, hidden, vocab = 2, 7, 16, 61
    student_head = torch.nn.Linear(hidden, vocab, bias=False).double()
    teacher_head = torch.nn.Linear(hidden, vocab, bias=True).double()
    student_hidden = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, hidden, dtype=torch.float64)
    ids = torch.randint(0, vocab, (batch, length))
    config = LossConfig(divergence=kind, temperature=1.5, kd_weight=1.0, lm_weight=lm_weight, chunk_tokens=chunk_tokens)

    plain, plain_parts = distillation_loss(student_head(student_hidden), teacher_head(teacher_hidden), ids, config)
    plain_grads = torch.autograd.grad(plain, [student_hidden, student_head.weight])
    chunked, chunked_parts = chunked_distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head, ids, config)
    chunked_grads = torch.autograd.grad(chunked, [student_hidden, student_head.weight])

    assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
    assert plain_parts.keys() == chunked_parts.keys()
    for expected, actual in zip(plain_grads, chunked_grads):
        assert float((actual - expected).norm() / expected.norm()) < 1e-6


def test_chunked_loss_never_holds_the_batch_logits():
    """The largest float32 tensor saved for backward is one chunk of logits, not the batch's."""
    from distill.losses import chunked_distillation_loss

    batch, length, hidden, vocab, chunk = 4, 64, 8, 512, 32
    head = torch.nn.Linear(hidden, vocab, bias=False)
    student_hidden = torch.randn(batch, length, hidden, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, _ = chunked_distillation_loss(student_hidden, head, torch.randn(batch, length, hidden), head,
                                            torch.randint(0, vocab, (batch, length)), LossConfig(chunk_tokens=chunk))
    assert max(saved) < batch * length * vocab / 4
    loss.backward()
    assert student_hidden.grad is not None and float(student_hidden.grad.norm()) > 0


def test_hidden_state_matching_is_the_mean_normalized_mse_over_layers():
    from distill.losses import hidden_state_matching

    torch.manual_seed(9)
    teacher = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3)]
    student = [t + 0.1 * (i + 1) * torch.randn_like(t) for i, t in enumerate(teacher)]
    expected = sum(float(((s - t) ** 2).sum() / (t**2).sum()) for s, t in zip(student, teacher)) / 3
    assert float(hidden_state_matching(student, teacher)) == pytest.approx(expected, rel=1e-6)
    assert float(hidden_state_matching(teacher, teacher)) == 0.0
    with pytest.raises(ValueError, match="equal depth"):
        hidden_state_matching(student[:2], teacher)


def reference_topk_divergence(student, teacher, k, kind, beta=0.5):
    """float64, from the definition: both distributions coarse-grained to the teacher's k most likely
    tokens plus one outcome holding all the other tokens' probability."""
    s = torch.softmax(student.double(), -1)
    t = torch.softmax(teacher.double(), -1)
    top = t.topk(k, dim=-1).indices
    coarse = lambda p: torch.cat([p.gather(-1, top), 1 - p.gather(-1, top).sum(-1, keepdim=True)], -1)
    return reference_divergence(coarse(s).log(), coarse(t).log(), kind, 1.0, beta)


def cached_topk(teacher_logits, k):
    from distill.losses import TopK

    top = F.log_softmax(teacher_logits.float(), -1).topk(k, dim=-1)
    return TopK(top.values, top.indices.int())


def float32_topk_tolerance(student, teacher, k):
    """The error float32 arithmetic allows the top-k divergence, relative to its largest value: the
    "other tokens" outcome is 1 minus a sum of k probabilities, so its absolute error grows like
    k * eps, and relative to the smallest such tail of teacher or student like k * eps / tail."""
    top = torch.softmax(teacher.double(), -1).topk(k, dim=-1).indices
    tails = [1 - torch.softmax(logits.double(), -1).gather(-1, top).sum(-1) for logits in (student, teacher)]
    condition = float(1 / torch.minimum(*tails).min())
    return 8 * k * torch.finfo(torch.float32).eps * max(1.0, condition)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 8, 60])
def test_topk_divergence_matches_its_definition_and_never_exceeds_the_full_one(kind, k):
    from distill.losses import divergence, topk_divergence

    torch.manual_seed(k)
    # 97 outcomes, so that even at k = 60 the tail keeps mass float32 can resolve
    student, teacher = torch.randn(12, 97) * 2, torch.randn(12, 97) * 2
    tolerance = float32_topk_tolerance(student, teacher, k)
    actual = topk_divergence(student, cached_topk(teacher, k), kind, beta=0.3)
    expected = reference_topk_divergence(student, teacher, k, kind, beta=0.3)
    assert float((actual.double() - expected).abs().max() / expected.abs().max()) < tolerance
    full = divergence(student, teacher, kind, 1.0, 0.3)
    assert bool((actual <= full + tolerance * full.abs().max()).all()), "coarse-graining cannot increase a divergence"


def test_topk_divergence_with_the_whole_vocabulary_is_the_full_divergence():
    from distill.losses import divergence, topk_divergence

    torch.manual_seed(4)
    student, teacher = torch.randn(6, 40), torch.randn(6, 40)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        actual = topk_divergence(student, cached_topk(teacher, 40), kind)
        expected = divergence(student, teacher, kind, 1.0)
        assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-4, kind


def test_a_given_residual_mass_is_the_other_tokens_outcome():
    """A cache that stores the mass of the other tokens (its log-probabilities quantized): topk_divergence
    uses it for the "other" outcome instead of 1 - the sum of the k, exactly as a reference built from it."""
    from distill.losses import TopK, topk_divergence

    torch.manual_seed(6)
    student, teacher, k = torch.randn(9, 50) * 2, torch.randn(9, 50) * 2, 6
    exact = cached_topk(teacher, k)
    perturbed = TopK(exact.logp + 0.05 * torch.randn(9, k), exact.index)  # as quantized codes would be
    rest = torch.log1p(-exact.logp.exp().sum(-1))
    with_rest = TopK(perturbed.logp, perturbed.index, rest)
    s = torch.softmax(student.double(), -1).gather(-1, exact.index.long())
    teacher_outcomes = torch.cat([perturbed.logp.double(), rest.double()[:, None]], -1)
    student_outcomes = torch.cat([s, 1 - s.sum(-1, keepdim=True)], -1).log()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        expected = reference_divergence(student_outcomes, teacher_outcomes, kind, 1.0, 0.5)
        actual = topk_divergence(student, with_rest, kind)
        assert float((actual.double() - expected).abs().max() / expected.abs().max()) < 1e-4, kind
        assert not torch.allclose(actual, topk_divergence(student, perturbed, kind)), "the rest was used"


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("chunk_tokens", [3, 1000])
@pytest.mark.parametrize("with_rest", [False, True])
def test_chunked_topk_loss_equals_the_plain_topk_loss_with_the_same_gradients(kind, chunk_tokens, with_rest):
    from distill.losses import TopK, chunked_distillation_loss

    torch.manual_seed(chunk_tokens)
    batch, length, hidden, vocab, k = 2, 7, 16, 61, 5
    head = torch.nn.Linear(hidden, vocab, bias=False).double()
    student_hidden = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    teacher_topk = cached_topk(torch.randn(batch, length, vocab) * 2, k)
    if with_rest:  # the residual mass a compact cache stores beside its quantized log-probabilities
        teacher_topk = TopK(teacher_topk.logp, teacher_topk.index, torch.log1p(-teacher_topk.logp.exp().sum(-1)) - 0.01)
    ids = torch.randint(0, vocab, (batch, length))
    config = LossConfig(divergence=kind, lm_weight=0.4, chunk_tokens=chunk_tokens, teacher_topk=k)

    plain, _ = distillation_loss(head(student_hidden), None, ids, config, teacher_topk=teacher_topk)
    plain_grads = torch.autograd.grad(plain, [student_hidden, head.weight])
    chunked, _ = chunked_distillation_loss(student_hidden, head, None, None, ids, config, teacher_topk=teacher_topk)
    chunked_grads = torch.autograd.grad(chunked, [student_hidden, head.weight])
    assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
    for expected, actual in zip(plain_grads, chunked_grads):
        assert float(expected.norm()) > 0
        assert float((actual - expected).norm() / expected.norm()) < 1e-6
