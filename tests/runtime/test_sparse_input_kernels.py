"""The sparse-input decode kernels in Triton's interpreter against a float64 reference, on fresh
random inputs: sparsities 0, 0.5 and 0.9, odd shapes, a poisoned output buffer, all-zero inputs, and
weights of skipped inputs poisoned with NaN (which only a kernel that skips them survives)."""

import pytest
import torch

from conftest import random_2_4_weight
from distill.runtime.sparse_input_kernels import (k_major, k_major_24, sparse_input_matmul,
                                                  sparse_input_matmul_24)
from distill.sparsity.packing import pack_nm


def sparse_input(m: int, k: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=generator)
    if sparsity:  # whole inputs zero in every row, as a threshold leaves a decode step's input
        x[:, torch.rand(k, generator=generator) < sparsity] = 0
    return x


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("m,n,k", [(1, 37, 72), (3, 64, 128), (16, 50, 100)])
def test_dense_k_major_kernel_matches_float64_and_never_reads_skipped_rows(sparsity, m, n, k):
    generator = torch.Generator().manual_seed(m * 1000 + n + int(sparsity * 10))
    x = sparse_input(m, k, sparsity, generator)
    weight, bias = torch.randn(n, k, generator=generator), torch.randn(n, generator=generator)
    expected = x.double() @ weight.double().T + bias.double()
    wt = k_major(weight)
    zero_inputs = (x == 0).all(0)
    wt[zero_inputs] = float("nan")  # what a zero input multiplies must not even be read
    out = torch.full((m, n), float("nan"))
    actual = sparse_input_matmul(x, wt, bias, out=out)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("m,n,k", [(1, 37, 72), (4, 64, 128), (16, 33, 256)])
def test_2_4_k_major_kernel_matches_float64_and_skips_all_zero_groups(sparsity, m, n, k):
    generator = torch.Generator().manual_seed(7 * m + n + int(sparsity * 10))
    torch.manual_seed(m + n)
    weight = random_2_4_weight(n, k)
    x = sparse_input(m, k, sparsity, generator)
    bias = torch.randn(n, generator=generator)
    expected = x.double() @ weight.double().T + bias.double()
    values, positions = pack_nm(weight, weight != 0, 2, 4)
    vt, pt = k_major_24(values, positions)
    zero_groups = (x == 0).all(0).reshape(-1, 4).all(-1)
    vt.reshape(-1, 2, n)[zero_groups] = float("nan")  # both slots of a skipped group
    out = torch.full((m, n), float("nan"))
    actual = sparse_input_matmul_24(x, vt, pt, bias, out=out)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("two_four", [False, True])
def test_all_zero_inputs_give_the_bias_and_large_m_is_refused(two_four):
    torch.manual_seed(3)
    weight, bias = random_2_4_weight(40, 64), torch.randn(40)
    x = torch.zeros(2, 64)
    if two_four:
        values, positions = pack_nm(weight, weight != 0, 2, 4)
        vt, pt = k_major_24(values, positions)
        run = lambda inputs, b: sparse_input_matmul_24(inputs, vt, pt, b)  # noqa: E731
    else:
        wt = k_major(weight)
        run = lambda inputs, b: sparse_input_matmul(inputs, wt, b)  # noqa: E731
    assert torch.equal(run(x, bias), bias.expand(2, 40))
    assert torch.equal(run(x, None), torch.zeros(2, 40))
    with pytest.raises(ValueError, match="decode"):
        run(torch.randn(17, 64), bias)
