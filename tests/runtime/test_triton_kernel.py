"""The Triton 2:4 kernel against a float64 reference on fresh random inputs. Without a GPU it runs in
Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), which checks indexing and masking."""

import pytest
import torch

from distill.runtime.layout import compress_2_4
from distill.runtime.triton_kernels import sparse24_matmul
from conftest import random_2_4_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (3, 70, 128), (16, 64, 96), (17, 130, 256), (40, 96, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_float64_reference_and_writes_every_element(m, n, k, dtype, with_bias):
    torch.manual_seed(m * 1000 + n + k)
    weight = random_2_4_weight(n, k, dtype).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    values, meta = compress_2_4(weight)
    poisoned = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse24_matmul(x, values, meta, bias, out=poisoned)
    expected = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    assert not torch.isnan(out).any(), "every output element must be written"
    assert relative_error(out, expected) < TOLERANCE[dtype]


# the last four split K: evenly, unevenly (8 K tiles in slices of 3, 3, 2), and more ways than
# there are K tiles (clamped to one slice per tile)
@pytest.mark.parametrize("tiles", [(16, 64, 32), (16, 32, 64), (32, 64, 128), (16, 128, 64, 8, 4),
                                   (16, 32, 64, 4, 4, 2), (16, 64, 32, 4, 3, 3), (16, 32, 128, 4, 4, 8),
                                   (32, 32, 64, 4, 3, 4)])
def test_every_tile_shape_gives_the_same_product(tiles):
    torch.manual_seed(7)
    weight = random_2_4_weight(100, 256, torch.float32).to(DEVICE)
    x = torch.randn(2, 5, 256, device=DEVICE)  # leading dims fold into M
    values, meta = compress_2_4(weight)
    out = sparse24_matmul(x, values, meta, tiles=tiles)
    assert out.shape == (2, 5, 100)
    assert relative_error(out, x.double() @ weight.double().T) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_adds_the_bias_once_and_writes_every_element(dtype):
    torch.manual_seed(11)
    weight = random_2_4_weight(96, 512, dtype).to(DEVICE)
    x = torch.randn(3, 512, device=DEVICE).to(dtype)
    bias = (10 * torch.randn(96, device=DEVICE)).to(dtype)  # large, so a bias added twice would show
    values, meta = compress_2_4(weight)
    poisoned = torch.full((3, 96), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse24_matmul(x, values, meta, bias, tiles=(16, 32, 64, 4, 3, 4), out=poisoned)
    expected = x.double() @ weight.double().T + bias.double()
    assert not torch.isnan(out).any(), "every output element must be written"
    assert relative_error(out, expected) < TOLERANCE[dtype]


def test_every_candidate_tile_is_valid_for_its_shape():
    """The benchmark's sweep must only try tiles the kernel accepts: K tiles dividing K, splits
    no larger than the number of K tiles; decode-sized M gets split-K candidates, large M none."""
    from distill.runtime.triton_kernels import candidate_tiles

    for m in (1, 4, 16, 64, 2048):
        for k in (576, 1536, 4096, 14336):
            tiles = candidate_tiles(m, k)
            assert tiles and all(len(t) == 6 and k % t[2] == 0 and k // t[2] >= t[5] for t in tiles)
            splits = {t[5] for t in tiles}
            assert (splits > {1}) == (m <= 16), (m, k, splits)


def test_input_size_mismatch_is_refused():
    values, meta = compress_2_4(random_2_4_weight(8, 64, torch.float32))
    with pytest.raises(ValueError, match="does not match the 2:4 weight"):
        sparse24_matmul(torch.randn(2, 32), values, meta)
