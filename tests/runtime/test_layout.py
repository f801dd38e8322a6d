import pytest
import torch

from distill.errors import DistillError
from distill.runtime.layout import compress_2_4, decompress_2_4
from conftest import random_2_4_weight as random_2_4


@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (130, 96), (64, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_decompress_is_exact(n, k, dtype):
    weight = random_2_4(n, k, dtype)
    values, meta = compress_2_4(weight)
    assert values.shape == (n, k // 2) and values.dtype == dtype
    assert meta.shape == (n, k // 32) and meta.dtype == torch.int32
    assert torch.equal(decompress_2_4(values, meta), weight)


def test_meta_bits_hold_the_positions_of_the_kept_values():
    weight = torch.zeros(1, 32)
    weight[0, 1], weight[0, 3] = 1.0, 2.0  # group 0 keeps positions 1 and 3
    weight[0, 4], weight[0, 6] = 3.0, 4.0  # group 1 keeps positions 0 and 2
    weight[0, 28 + 2], weight[0, 28 + 3] = 5.0, 6.0  # last group keeps 2 and 3 (bits 30..31: sign bit)
    values, meta = compress_2_4(weight)
    word = int(meta[0, 0]) & 0xFFFFFFFF
    positions = [(word >> (2 * j)) & 3 for j in range(16)]
    assert positions[:4] == [1, 3, 0, 2] and positions[-2:] == [2, 3]
    assert values[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_group_with_fewer_than_two_non_zeros_keeps_explicit_zeros():
    weight = random_2_4(4, 32)
    weight[2, 8:12] = 0
    weight[3, 0:4] = torch.tensor([0.0, 0.0, 0.0, 7.0])
    values, meta = compress_2_4(weight)
    assert torch.equal(decompress_2_4(values, meta), weight)


def test_bad_weights_are_named_errors():
    with pytest.raises(DistillError, match="layers.3.q_proj: not 2:4 sparse"):
        compress_2_4(torch.randn(8, 32), "layers.3.q_proj")
    with pytest.raises(DistillError, match="o_proj: input size 48 is not a multiple of 32"):
        compress_2_4(random_2_4(8, 48), "o_proj")
    with pytest.raises(DistillError, match="dtype torch.int32 is not supported"):
        compress_2_4(torch.zeros(8, 32, dtype=torch.int32), "up_proj")
