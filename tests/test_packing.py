import pytest
import torch

from distill.errors import DistillError
from distill.sparsity.packing import pack_nm, unpack_nm
from distill.sparsity.masks import nm_mask


@pytest.mark.parametrize("n,m,rows,cols", [(2, 4, 7, 12), (1, 4, 3, 16), (4, 8, 5, 24), (2, 4, 1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_unpack_is_exact(n, m, rows, cols, dtype):
    weight = torch.randn(rows, cols).to(dtype)
    mask = nm_mask(torch.rand(rows, cols), n, m)
    values, indices = pack_nm(weight * mask, mask, n, m)
    assert values.shape == (rows, cols // m * n) and indices.dtype == torch.uint8
    assert int(indices.max()) < m
    assert torch.equal(unpack_nm(values, indices, n, m), weight * mask)


def test_pack_refuses_a_mask_that_is_not_n_of_m():
    weight = torch.randn(2, 8)
    with pytest.raises(DistillError, match="exactly 2 of every 4"):
        pack_nm(weight, torch.ones(2, 8, dtype=torch.bool), 2, 4)
