"""The orthonormal 3D Haar transform: exact inverse, norm preservation, the Haar coefficients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from revseg.nn.haar import haar3d, inverse_haar3d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_is_exact_and_norm_is_preserved(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 10, dtype=dtype)
    y = haar3d(x)
    assert y.shape == (2, 24, 2, 3, 5)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert rel_err(inverse_haar3d(y), x) < tol
    assert rel_err(haar3d(inverse_haar3d(y)), y) < tol
    assert abs(float(y.norm() / x.norm()) - 1) < tol
    assert abs(float(inverse_haar3d(x.repeat(1, 8, 1, 1, 1)).norm() / x.norm()) ** 2 - 8) < tol * 8


def test_coefficients_are_the_tensor_product_haar_basis():
    """On one 2x2x2 cell the transform is kron(H, H, H) with H = [[1, 1], [1, -1]] / sqrt(2)."""
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / 2**0.5
    basis = torch.kron(torch.kron(h, h), h)  # row k: sub-band k over cells (d, h, w) row-major
    cells = torch.eye(8, dtype=torch.float64).reshape(8, 1, 2, 2, 2)  # batch of unit impulses
    coeffs = haar3d(cells).reshape(8, 8)  # [impulse, sub-band]
    assert torch.allclose(coeffs.T, basis, atol=1e-15)
    assert torch.allclose(basis @ basis.T, torch.eye(8, dtype=torch.float64), atol=1e-15)


def test_low_pass_band_holds_scaled_averages_in_the_first_channels():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 4, 4, 8, dtype=torch.float64)
    y = haar3d(x)
    assert torch.allclose(y[:, :5], F.avg_pool3d(x, 2) * 8**0.5, atol=1e-14)
    constant = torch.full((1, 2, 4, 4, 4), 3.0, dtype=torch.float64)
    assert torch.count_nonzero(haar3d(constant)[:, 2:]) == 0  # details of a constant vanish


def test_transform_is_orthogonal_adjoint_equals_inverse():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 2, 6, dtype=torch.float64)
    z = torch.randn(1, 16, 2, 1, 3, dtype=torch.float64)
    # <W x, z> == <x, W^T z> with W^T = W^-1
    assert abs(float((haar3d(x) * z).sum() - (x * inverse_haar3d(z)).sum())) < 1e-12
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(haar3d(x), x, z)
    assert torch.allclose(grad, inverse_haar3d(z), atol=1e-14)


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="even D, H, W"):
        haar3d(torch.randn(1, 1, 4, 5, 4))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        haar3d(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="divisible by 8"):
        inverse_haar3d(torch.randn(1, 12, 2, 2, 2))
