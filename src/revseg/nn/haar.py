"""Orthonormal 3D Haar transform: invertible coarsening that trades resolution for channels.

Each ``2 x 2 x 2`` cell of every channel is mapped to its eight Haar coefficients (the tensor
product of the 1D pair ``((a + b), (a - b)) / sqrt(2)`` along D, H and W), so

    ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``

with the same number of elements. The 8 x 8 coefficient matrix is orthogonal and symmetric, so the
transform preserves the Euclidean norm and its inverse is its transpose (the same butterflies,
regrouped). Output channels are ordered by sub-band: ``[:, :C]`` holds the low-pass (scaled
averages) of the input channels, ``[:, C:2C]`` the next sub-band, and so on.

Used as the coarsening (and, inverted, the refinement) operator of fully reversible hyperbolic
networks (Lensink et al.; Peters, Haber, Lensink: "Symmetric block-low-rank layers for fully
reversible multilevel neural networks").
"""

from __future__ import annotations

import math

import torch

__all__ = ["haar3d", "inverse_haar3d"]

_SCALE = 1.0 / math.sqrt(8.0)


def _butterfly(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum and difference of the two entries along the size-2 dimension ``dim``."""
    a, b = x.unbind(dim)
    return torch.stack((a + b, a - b), dim)


def _butterflies(x: torch.Tensor, dims: tuple[int, int, int]) -> torch.Tensor:
    for dim in dims:
        x = _butterfly(x, dim)
    return x * _SCALE


def haar3d(x: torch.Tensor) -> torch.Tensor:
    """Forward 3D Haar transform ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``.

    Args:
        x: input of shape ``(B, C, D, H, W)`` with even ``D``, ``H``, ``W``.

    Raises:
        ValueError: if ``x`` is not 5D or a spatial size is odd.
    """
    if x.ndim != 5:
        raise ValueError(f"haar3d expects (B, C, D, H, W), got shape {tuple(x.shape)}")
    b, c, d, h, w = x.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"haar3d needs even D, H, W, got {(d, h, w)}")
    x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
    # (B, C, D/2, 2, H/2, 2, W/2, 2) -> (B, 2, 2, 2, C, D/2, H/2, W/2): sub-band major
    x = x.permute(0, 3, 5, 7, 1, 2, 4, 6)
    x = _butterflies(x, (1, 2, 3))
    return x.reshape(b, 8 * c, d // 2, h // 2, w // 2)


def inverse_haar3d(y: torch.Tensor) -> torch.Tensor:
    """Inverse 3D Haar transform ``(B, 8C, D, H, W) -> (B, C, 2D, 2H, 2W)``.

    Args:
        y: coefficients of shape ``(B, 8C, D, H, W)`` as produced by :func:`haar3d`.

    Raises:
        ValueError: if ``y`` is not 5D or its channels are not a multiple of 8.
    """
    if y.ndim != 5:
        raise ValueError(f"inverse_haar3d expects (B, 8C, D, H, W), got shape {tuple(y.shape)}")
    b, c8, d, h, w = y.shape
    if c8 % 8:
        raise ValueError(f"inverse_haar3d needs channels divisible by 8, got {c8}")
    c = c8 // 8
    y = _butterflies(y.reshape(b, 2, 2, 2, c, d, h, w), (1, 2, 3))
    # (B, 2, 2, 2, C, D, H, W) -> (B, C, D, 2, H, 2, W, 2)
    y = y.permute(0, 4, 5, 1, 6, 2, 7, 3)
    return y.reshape(b, c, 2 * d, 2 * h, 2 * w)
