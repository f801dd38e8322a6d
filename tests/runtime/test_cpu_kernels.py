"""The CPU kernels and layouts against a float64 product, on fresh random inputs (never zeros only):
M from 1 to 16, input sparsity 0, 0.5 and 0.9, rows that are all zero, bias and none, shapes whose
outputs are not a multiple of the block (padding) and, for the dense-weight kernel, odd K. Each ISA
the machine can run is built and checked (AVX512, AVX2, the portable loop)."""

import os

import pytest
import torch

from conftest import random_2_4_weight
from distill.runtime import cpu_kernels, cpu_layout
from distill.runtime.dispatch import CrossoverTable
from distill.runtime.linear import SCRATCH, Sparse24Linear, SparseInputLinear
from distill.sparsity.packing import pack_nm

# N not a multiple of 16 (100), K = 36 (9 groups), and 1072 outputs (16 x 67): blocks of 544 and 224, the
# last one padded
SHAPES_24 = [(48, 64), (100, 36), (192, 576), (1536, 576), (1072, 36)]
M_VALUES = [1, 2, 7, 16]
SPARSITY = [0.0, 0.5, 0.9]


def isas():
    """The machine's widest ISA, and the narrower ones as slow tests (each is one more ~20 s build)."""
    widest = cpu_kernels.target_isa()
    order = list(cpu_kernels.ISA_FLAGS)
    narrower = order[order.index(widest) + 1:]
    return [widest] + [pytest.param(isa, marks=pytest.mark.slow) for isa in narrower]


@pytest.fixture(params=isas())
def isa(request, monkeypatch):
    monkeypatch.setenv("DISTILL_CPU_ISA", request.param)
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels could not be built here (no compiler): the PyTorch products stand in")
    assert cpu_kernels.loaded_isa() == request.param
    return request.param


def inputs(m: int, k: int, sparsity: float, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(m, k)
    x[torch.rand(m, k) < sparsity] = 0
    if m > 1:
        x[m // 2] = 0  # a row whose inputs are all zero
    return x.to(dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def packed_form(weight):
    return pack_nm(weight, weight != 0, 2, 4) if bool(((weight != 0).view(weight.shape[0], -1, 4).sum(-1) == 2).all()) \
        else pytest.fail("test weight is not exactly 2:4")


@pytest.mark.parametrize("n,k", SHAPES_24)
def test_the_2_4_kernels_of_both_layouts_match_float64(isa, n, k):
    torch.manual_seed(n + k)
    weight, bias = random_2_4_weight(n, k), torch.randn(n)
    values, positions = packed_form(weight)
    codes, grouped, block = cpu_layout.pack_grouped_24(values, positions)
    masks, by_input, block_inputs = cpu_layout.pack_24(values, positions)
    for m in M_VALUES:
        for sparsity in SPARSITY:
            x = inputs(m, k, sparsity)
            for with_bias in (bias, None):
                expected = x.double() @ weight.double().T + (with_bias.double() if with_bias is not None else 0)
                for actual in (cpu_kernels.grouped24_matmul(x, codes, grouped, with_bias, n, block),
                               cpu_kernels.sparse24_matmul(x, masks, by_input, with_bias, n, block_inputs)):
                    assert actual.shape == (m, n) and actual.dtype == torch.float32
                    assert relative_error(actual, expected) < 1e-6, (isa, m, sparsity)


@pytest.mark.parametrize("n,k", [(48, 64), (100, 37), (576, 1536), (1100, 37)])
def test_the_dense_weight_sparse_input_kernel_matches_float64_also_for_odd_k(isa, n, k):
    torch.manual_seed(n * k)
    weight, bias = torch.randn(n, k), torch.randn(n)
    values, block = cpu_layout.pack_dense(weight)
    for m in M_VALUES:
        for sparsity in SPARSITY:
            x = inputs(m, k, sparsity)
            expected = x.double() @ weight.double().T + bias.double()
            assert relative_error(cpu_kernels.dense_matmul(x, values, bias, n, block), expected) < 1e-6


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_weights_and_inputs_accumulate_in_fp32(isa, dtype, tolerance):
    torch.manual_seed(5)
    n, k = 192, 576
    weight, bias = random_2_4_weight(n, k).to(dtype), torch.randn(n).to(dtype)
    values, positions = packed_form(weight)
    codes, grouped, block = cpu_layout.pack_grouped_24(values, positions)
    masks, by_input, block_inputs = cpu_layout.pack_24(values, positions)
    x = inputs(4, k, 0.5, dtype)
    expected = x.double() @ weight.double().T + bias.double()
    for actual in (cpu_kernels.grouped24_matmul(x, codes, grouped, bias, n, block),
                   cpu_kernels.sparse24_matmul(x, masks, by_input, bias, n, block_inputs)):
        assert actual.dtype == dtype
        assert relative_error(actual, expected) < tolerance


@pytest.mark.parametrize("n,k", SHAPES_24)
def test_layouts_round_trip_to_the_packed_form_and_unpack_k_major(isa, n, k):
    torch.manual_seed(3)
    weight = random_2_4_weight(n, k)
    values, positions = packed_form(weight)
    codes, grouped, block = cpu_layout.pack_grouped_24(values, positions)
    masks, by_input, block_inputs = cpu_layout.pack_24(values, positions)
    for back in (cpu_layout.grouped_slots(codes, grouped, n), cpu_layout.positions_24(masks, by_input, n)):
        assert torch.equal(back[0], values) and torch.equal(back[1], positions)
    assert torch.equal(cpu_kernels.unpack_grouped24_kmajor(codes, grouped, n, block, k), weight.t())
    assert torch.equal(cpu_kernels.unpack_24_kmajor(masks, by_input, n, block_inputs, k), weight.t())
    # bytes: 1 bit per weight plus the kept half, as values + 2-bit positions (17/32 of fp32)
    assert (codes.numel() + grouped.numel() * 4) <= cpu_layout.blocked_outputs(n, block) * k * 17 / 8
    assert masks.numel() * 2 + by_input.numel() * 4 <= cpu_layout.blocked_outputs(n, block_inputs) * k * 17 / 8 + 64


def test_a_kernel_refuses_too_many_rows_and_mismatched_layouts_in_one_line(isa):
    n, k = 48, 64
    values, positions = packed_form(random_2_4_weight(n, k))
    codes, grouped, block = cpu_layout.pack_grouped_24(values, positions)
    with pytest.raises(RuntimeError, match="serves M from 1 to 16"):
        cpu_kernels.grouped24_matmul(torch.randn(17, k), codes, grouped, None, n, block)
    with pytest.raises(RuntimeError, match="values hold"):
        cpu_kernels.grouped24_matmul(torch.randn(1, 2 * k), codes, grouped, None, n, block)


def test_modules_take_the_table_path_per_m_and_hold_no_dense_copy(isa):
    torch.manual_seed(9)
    n, k = 192, 576
    weight, bias = random_2_4_weight(n, k), torch.randn(n)
    for sparse_inputs, layout_buffers in ((False, {"codes", "values", "bias"}), (True, {"masks", "values", "bias"})):
        module = Sparse24Linear.from_dense(weight, bias, "probe", CrossoverTable(), sparse_inputs=sparse_inputs)
        assert {name for name, _ in module.named_buffers()} == layout_buffers
        assert module.resident_bytes() < n * k * 4 * 0.6
        for m, path in ((1, "cpu_kernel"), (16, "cpu_kernel"), (17, "cpu_unpack"), (300, "cpu_unpack")):
            x = inputs(m, k, 0.5)
            assert module.kernel_path(x) == path
            assert relative_error(module(x), x.double() @ weight.double().T + bias.double()) < 1e-5
        assert torch.equal(module.weight_dense(), weight)
    dense = torch.randn(n, k)
    module = SparseInputLinear(dense, None, "probe", CrossoverTable())
    for m in (1, 40):
        x = inputs(m, k, 0.5)
        assert relative_error(module(x), x.double() @ dense.double().T) < 1e-5
    assert SCRATCH.nbytes() >= n * k * 4  # prefill unpacked into the shared buffer, one layer's worth


def test_the_kernels_apply_an_input_threshold_as_they_read_and_the_runtime_needs_no_hook(isa):
    """threshold=t gives (x * (|x| >= t)) @ W.T, in every kernel; a CPU runtime projection applies its
    installed threshold in the kernel (no pre-hook), matching nn.Linear behind InputThreshold."""
    from torch import nn

    from distill.sparsity.activations import set_thresholds

    torch.manual_seed(11)
    n, k = 1072, 36
    weight, bias = random_2_4_weight(n, k), torch.randn(n)
    values, positions = packed_form(weight)
    codes, grouped, block = cpu_layout.pack_grouped_24(values, positions)
    masks, by_input, block_inputs = cpu_layout.pack_24(values, positions)
    dense_values, dense_block = cpu_layout.pack_dense(weight)
    threshold = 0.7  # about half of standard normal inputs
    for m in M_VALUES:
        x = inputs(m, k, 0.0)
        kept = x * (x.abs() >= threshold)
        expected = kept.double() @ weight.double().T + bias.double()
        assert 0.25 < float(((x != 0) & (kept == 0)).sum() / (x != 0).sum()) < 0.75  # the threshold zeroed some
        for actual in (cpu_kernels.grouped24_matmul(x, codes, grouped, bias, n, block, threshold),
                       cpu_kernels.sparse24_matmul(x, masks, by_input, bias, n, block_inputs, threshold),
                       cpu_kernels.dense_matmul(x, dense_values, bias, n, dense_block, threshold)):
            assert relative_error(actual, expected) < 1e-6, m
    for module in (Sparse24Linear.from_dense(weight, bias, "probe"),
                   Sparse24Linear.from_dense(weight, bias, "probe", sparse_inputs=True),
                   SparseInputLinear(weight, bias, "probe", CrossoverTable())):
        reference = nn.Linear(k, n)
        with torch.no_grad():
            reference.weight.copy_(weight), reference.bias.copy_(bias)
        for model in (module, reference):
            set_thresholds(nn.ModuleDict({"probe": model}), {"probe": threshold})
        assert not module._forward_pre_hooks and reference._forward_pre_hooks
        for m in (1, 16, 40):  # decode kernels, then the unpacked prefill
            x = inputs(m, k, 0.0)
            assert relative_error(module(x), reference(x).detach().double()) < 1e-5, (type(module).__name__, m)


@pytest.mark.slow
def test_without_a_compiler_the_plain_pytorch_products_stand_in(tmp_path):
    """A machine without a C++ toolchain: the build fails with one printed line and the runtime computes
    the same products in PyTorch (exact, not faster). Run in a process of its own with no compiler."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from distill.runtime import cpu_kernels, cpu_layout\n"
            "from distill.sparsity.packing import pack_nm\n"
            "from distill.sparsity.masks import nm_mask\n"
            "w = torch.randn(48, 64) * nm_mask(torch.rand(48, 64), 2, 4)\n"
            "codes, values, block = cpu_layout.pack_grouped_24(*pack_nm(w, w != 0, 2, 4))\n"
            "x = torch.randn(3, 64)\n"
            "y = cpu_kernels.grouped24_matmul(x, codes, values, None, 48, block)\n"
            "print(cpu_kernels.available(), float((y.double() - x.double() @ w.double().T).norm()))\n")
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path), "DISTILL_CPU_ISA": "portable"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    available, error = result.stdout.split()
    assert available == "False" and float(error) < 1e-4
    notes = [line for line in result.stderr.splitlines() if "CPU sparse kernels unavailable" in line]
    assert len(notes) == 1
