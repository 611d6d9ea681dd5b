"""Lipschitz-bounded convolutions, the fixed-point inverse of ``y = x + g(x)``, Fixup init.

Thangarasa, Tsai, Taylor, Köster, "Reversible Fixup Networks for Memory-Efficient Training"
(RevUp), building on i-ResNet (Behrmann et al. 2019) and Fixup (Zhang et al. 2019). A residual
block ``y = x + g(x)`` is invertible when ``Lip(g) < 1`` (eq. 3); its inverse is the fixed point of
``x = y - g(x)`` (eq. 2), reached by the iteration of Algorithm 1 from ``x_0 = y``, with the
a-priori error bound of eq. 4::

    x_{k+1} = y - g(x_k),     |x* - x_n| <= Lip(g)^n / (1 - Lip(g)) |x_1 - x_0|

``Lip(g) < 1`` holds when every convolution in ``g`` has operator norm below 1 (eq. 5, ReLU is
1-Lipschitz): :class:`SpectralNormConv3d` estimates the largest singular value ``sigma`` of its
convolution by power iteration (Algorithm 2, after Gouk et al.: one convolution and one transposed
convolution per iteration, one iteration per training step) and uses ``W / max(1, sigma / c)``,
as the paper and i-ResNet do: weights already below the bound ``c`` are left as they are, so
Fixup's zero and down-scaled initialisation survive the normalisation.

Which operator: the paper, like i-ResNet and Gouk et al., bounds the *convolution operator*, not
the kernel reshaped to a ``C_out x C_in k^3`` matrix (Miyato et al.'s spectral norm): the
operator's norm can be up to ``sqrt(k^3)`` (5.2 for 3x3x3) times the matrix's, so normalising the
matrix does not make ``g`` contractive. The paper iterates on the layer's own input size (32x32
CIFAR images); volumes change size (patches, whole volumes, one size per U-Net level) and a vector
of the input's size would cost as much memory as an activation per convolution. We iterate on the
*circular* convolution over a small periodic grid (``power_grid_size``, default 8^3): its norm is
the largest ``sigma_max`` of the kernel's Fourier transform over the grid's frequencies, a lower
bound of the norm on unbounded inputs (the supremum over all frequencies) that was within about 3%
of it at 8^3 for random kernels (0.5% at 16^3), and an upper bound of the zero-padded layer's norm
on any input of up to ``power_grid_size - 1`` voxels per side (no wrap-around). Power iteration
underestimates ``sigma`` besides (one iteration per step); the margin ``1 - c`` absorbs both, as in
the paper.

Fixup (rules of Zhang et al. as RevUp applies them, :func:`fixup_init_`): the last convolution of
each residual branch starts at zero, the others at He initialisation scaled by
``L^(-1/(2m-2))`` (``L`` residual branches, ``m`` layers per branch), scalar biases before each
convolution and activation and one scalar multiplier per branch (the block's own parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revseg.nn.reversible import is_recomputing

__all__ = ["SpectralNormConv3d", "fixed_point_inverse", "fixup_init_", "fixup_scale"]


def _full_precision(t: torch.Tensor) -> torch.autocast:
    """Autocast off: the power iteration and ``sigma`` run in the buffer's own precision."""
    return torch.autocast(t.device.type, enabled=False)


class SpectralNormConv3d(nn.Module):
    """3D convolution whose operator norm is bounded by ``coefficient`` (RevUp, Algorithm 2).

    The power-iteration vector ``power_vector`` ``(1, C_in, N, N, N)`` is a buffer (saved with the
    model). It advances by one iteration in each training-mode forward, before the weight is
    computed, and never in eval mode, in :meth:`normalized_weight` calls with ``update=False``
    (inverses) or during a memory-saving backward (:func:`~revseg.nn.reversible.is_recomputing`):
    the recomputed forward then uses exactly the forward's normalised weight.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (``padding = kernel_size // 2``, zero padding).
        coefficient: the bound ``c`` on the operator norm (the paper: 0.9).
        power_grid_size: side ``N`` of the periodic grid the power iteration runs on (see the
            module docstring); at least ``kernel_size``.
        bias: add a learnable per-channel bias (does not change the Lipschitz constant).

    Shapes: ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``.

    Raises:
        ValueError: for an even kernel size, ``coefficient`` outside ``(0, 1]``, or a grid smaller
            than the kernel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        coefficient: float = 0.9,
        power_grid_size: int = 8,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SpectralNormConv3d needs an odd kernel_size, got {kernel_size}")
        if not 0.0 < coefficient <= 1.0:
            raise ValueError(f"coefficient must be in (0, 1], got {coefficient}")
        if power_grid_size < kernel_size:
            raise ValueError(
                f"power_grid_size ({power_grid_size}) must be at least kernel_size ({kernel_size})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        self.coefficient = float(coefficient)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *(kernel_size,) * 3))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        v = torch.randn(1, in_channels, *(power_grid_size,) * 3)
        self.register_buffer("power_vector", v / v.norm())

    # the circular convolution on the power-iteration grid and its adjoint
    def _circular(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv3d(F.pad(v, (self.padding,) * 6, mode="circular"), weight)

    def _circular_adjoint(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # the adjoint of a circular cross-correlation: the transposed, flipped kernel
        flipped = weight.transpose(0, 1).flip(2, 3, 4)
        return F.conv3d(F.pad(u, (self.padding,) * 6, mode="circular"), flipped)

    @torch.no_grad()
    def power_iteration(self, iterations: int = 1) -> None:
        """Advance ``power_vector`` by ``iterations`` steps ``v <- C^T C v / |C^T C v|``.

        A step that would give a zero vector (a zero weight, Fixup's last layers at
        initialisation) leaves ``v`` as it is, so the iteration resumes once the weight moves.
        """
        v = self.power_vector
        weight = self.weight.detach().to(v.dtype)
        with _full_precision(v):
            for _ in range(iterations):
                w = self._circular_adjoint(self._circular(v, weight), weight)
                norm = w.norm()
                v = torch.where(norm > 0, w / norm.clamp_min(torch.finfo(w.dtype).tiny), v)
        self.power_vector.copy_(v)

    def sigma(self) -> torch.Tensor:
        """The estimate ``|C v| / |v|`` of the operator norm, differentiable in the weight."""
        v = self.power_vector
        with _full_precision(v):
            return self._circular(v, self.weight.to(v.dtype)).norm() / v.norm()

    def normalized_weight(
        self, gain: torch.Tensor | None = None, update: bool | None = None
    ) -> torch.Tensor:
        """The weight scaled to operator norm at most ``c``: ``W' / max(1, sigma(W') / c)``.

        Args:
            gain: an optional scalar (tensor) multiplying the weight *before* the bound,
                ``W' = gain * W`` (``sigma(W') = |gain| sigma(W)``): a learnable multiplier that
                cannot push the layer past ``c``.
            update: run one power iteration first; ``None`` = in training mode, outside a
                memory-saving recomputation.
        """
        if update is None:
            update = self.training and not is_recomputing()
        if update:
            self.power_iteration(1)
        sigma = self.sigma()
        weight = self.weight
        if gain is not None:
            weight = gain * weight
            sigma = sigma * gain.abs()
        factor = torch.clamp(sigma / self.coefficient, min=1.0)
        return weight / factor.to(weight.dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve with ``weight`` (a :meth:`normalized_weight`; computed now if ``None``)."""
        if weight is None:
            weight = self.normalized_weight()
        return F.conv3d(x, weight, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"coefficient={self.coefficient}, power_grid_size={self.power_vector.shape[-1]}, "
            f"bias={self.bias is not None}"
        )


def fixed_point_inverse(
    residual: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, iterations: int = 1
) -> torch.Tensor:
    """Invert ``y = x + g(x)`` by ``x_{k+1} = y - g(x_k)`` from ``x_0 = y`` (Algorithm 1).

    Converges to the exact inverse when ``g`` is a contraction; the paper trains with one
    iteration and needs about 40 for numerically exact reconstructions at ``c = 0.9``.

    Args:
        residual: the residual function ``g``.
        y: the block output ``(B, C, D, H, W)``.
        iterations: fixed-point iterations ``N >= 1`` (``N`` evaluations of ``g``).

    Raises:
        ValueError: for ``iterations < 1``.
    """
    if iterations < 1:
        raise ValueError(f"fixed-point inverse needs iterations >= 1, got {iterations}")
    x = y
    for _ in range(iterations):
        x = y - residual(x)
    return x


def fixup_scale(num_branches: int, layers_per_branch: int) -> float:
    """Fixup's down-scaling ``L^(-1/(2m-2))`` of the non-final layers of each residual branch.

    Raises:
        ValueError: for ``num_branches < 1`` or ``layers_per_branch < 2``.
    """
    if num_branches < 1 or layers_per_branch < 2:
        raise ValueError(
            "Fixup needs num_branches >= 1 and layers_per_branch >= 2, got "
            f"{num_branches} and {layers_per_branch}"
        )
    return num_branches ** (-1.0 / (2 * layers_per_branch - 2))


@torch.no_grad()
def fixup_init_(layers: Sequence[nn.Module], num_branches: int) -> None:
    """Fixup initialisation of one residual branch, in place (Zhang et al. 2019, rules 1-2).

    Every layer but the last gets He (Kaiming normal, fan-out) initialisation scaled by
    :func:`fixup_scale`; the last layer's weight is set to zero, so the branch starts as a
    constant and the block as the identity (plus Fixup's scalar bias). Layer biases, if any,
    are zeroed.

    Args:
        layers: the branch's weight layers in order (modules with ``weight`` and optional
            ``bias``, e.g. :class:`SpectralNormConv3d`).
        num_branches: ``L``, the number of residual branches in the whole network.
    """
    scale = fixup_scale(num_branches, len(layers))
    for index, layer in enumerate(layers):
        if index == len(layers) - 1:
            nn.init.zeros_(layer.weight)
        else:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            layer.weight.mul_(scale)
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)
