"""Layer-wise invertible layers: pooling, batch norm, LeakyReLU, convolution, and their chains.

Hascoet, Febvre, Ariki, Takiguchi: "Reversible designs for extreme memory reduction of deep
neural networks" (section 4.1). Every layer here has ``forward`` and ``inverse``, so the input of
a layer can be recomputed from its output during backward instead of being kept:

* :class:`ChannelPooling3d` (i-RevNet's invertible pooling, ``P_c``, eq. 33a-b) stacks the
  eight voxels of each ``2 x 2 x 2`` cell along channels, :class:`BatchPooling3d` (``P_b``,
  eq. 33c-d) along the batch, keeping the channel count (and so the weight memory) constant.
  Both only move elements: their inverses are exact.
* :class:`InvertibleBatchNorm3d` (eq. 27) normalises with the batch statistics, which it keeps
  (``2C`` numbers) for the inverse of the same step; its scale is ``|gamma| + eps_i``.
* :class:`InvertibleLeakyReLU` (eq. 28) is bijective for a positive slope.
* :class:`InvertibleConv3d` (section 4.1.4) is the "minimal reversible block": an additive
  coupling whose two modules are single convolutions.
* :class:`LayerwiseInvertibleChain` composes such layers. With memory saving it runs them
  through :class:`~revseg.nn.reversible.InvertibleSequence`'s autograd Function, which keeps only
  the chain's output and, in backward, walks the layers from the end: a layer's inverse gives its
  input, one forward with grad the local graph that :func:`torch.autograd.grad` differentiates
  (:func:`~revseg.nn.reversible.block_backward_step`). Inside a hybrid block the chain is walked
  by :func:`walk_back` instead.

Reconstruction through BN and LeakyReLU amplifies noise. :func:`leaky_relu_alpha` (eq. 32c) and
:func:`batch_norm_alpha` (eq. 26d) are the paper's closed forms of the factor ``alpha =
snr_in / snr_out`` by which one inverse divides the signal-to-noise ratio (eq. 18).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revseg.nn.reversible import (
    AdditiveCoupling,
    apply_invertible_sequence,
    block_backward_step,
    coupling_backward_step,
)

__all__ = [
    "BatchPooling3d",
    "ChannelPooling3d",
    "InvertibleBatchNorm3d",
    "InvertibleConv3d",
    "InvertibleLeakyReLU",
    "InverseOf",
    "LayerwiseInvertibleChain",
    "batch_norm_alpha",
    "leaky_relu_alpha",
    "walk_back",
]


# --------------------------------------------------------------------------------------------
# invertible pooling (section 4.1.5)


def _check_poolable(x: torch.Tensor, name: str) -> tuple[int, int, int, int, int]:
    if x.ndim != 5:
        raise ValueError(f"{name} expects (B, C, D, H, W), got shape {tuple(x.shape)}")
    b, c, d, h, w = x.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"{name} needs D, H, W divisible by 2, got {(d, h, w)}")
    return b, c, d, h, w


def _check_unpoolable(y: torch.Tensor, dim: int, name: str) -> tuple[int, int, int, int, int]:
    if y.ndim != 5 or y.shape[dim] % 8:
        what = "channels" if dim == 1 else "a batch"
        raise ValueError(
            f"{name} needs a 5D input with {what} divisible by 8, got {tuple(y.shape)}"
        )
    return y.shape


class ChannelPooling3d(nn.Module):
    """Invertible channel pooling ``P_c`` (i-RevNet): ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``.

    A 3D pixel-unshuffle: output channel ``8 c + 4 i + 2 j + k`` holds ``x[:, c, i::2, j::2,
    k::2]`` (the order of :func:`torch.nn.functional.pixel_unshuffle`). Volume preserving;
    ``inverse`` is exact.

    Raises:
        ValueError: at call time, if ``D``, ``H`` or ``W`` is not divisible by 2 (for
            ``inverse``: if the channels are not divisible by 8).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = _check_poolable(x, "channel pooling")
        x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, 8 * c, d // 2, h // 2, w // 2)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, 8C, D, H, W) -> (B, C, 2D, 2H, 2W)``."""
        b, c8, d, h, w = _check_unpoolable(y, 1, "channel unpooling")
        y = y.reshape(b, c8 // 8, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, c8 // 8, 2 * d, 2 * h, 2 * w)


class BatchPooling3d(nn.Module):
    """Invertible batch pooling ``P_b`` (Hascoet et al.): ``(B, C, D, H, W) -> (8B, C, D/2, ...)``.

    Sample ``8 b + 4 i + 2 j + k`` of the output is ``x[b, :, i::2, j::2, k::2]``: the eight
    sub-grids of each sample are consecutive along the batch. Volume preserving with the channel
    count unchanged, so the convolutions after it keep their weight size; ``inverse`` is exact.

    Raises:
        ValueError: at call time, if ``D``, ``H`` or ``W`` is not divisible by 2 (for
            ``inverse``: if the batch is not divisible by 8).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = _check_poolable(x, "batch pooling")
        x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
        return x.reshape(8 * b, c, d // 2, h // 2, w // 2)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``(8B, C, D, H, W) -> (B, C, 2D, 2H, 2W)``."""
        b8, c, d, h, w = _check_unpoolable(y, 0, "batch unpooling")
        y = y.reshape(b8 // 8, 2, 2, 2, c, d, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        return y.reshape(b8 // 8, c, 2 * d, 2 * h, 2 * w)


class InverseOf(nn.Module):
    """The inverse of an invertible module as a module: ``forward`` is ``module.inverse``.

    Used for the up path of a V-shaped invertible network (``InverseOf(ChannelPooling3d())`` is
    channel unpooling). Holds ``module``, so parameters, if any, are shared.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.inverse(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.module(y)


# --------------------------------------------------------------------------------------------
# invertible batch norm and LeakyReLU (sections 4.1.2-4.1.3) and the closed forms of alpha


class InvertibleBatchNorm3d(nn.Module):
    """Batch norm with an inverse: ``y = s (x - mean) / sqrt(var + eps) + beta``, ``s = |gamma| +
    scale_eps`` (Hascoet et al., eq. 27).

    The paper writes ``|gamma + eps_i|``; its stated purpose, lower bounding the scale so the
    inverse never divides by (almost) zero, is what ``|gamma| + eps_i`` does (``|gamma + eps_i|``
    vanishes at ``gamma = -eps_i``). ``gamma`` starts at ``1 - scale_eps`` (``s = 1``). ``eps``
    sits inside the square root as in :class:`torch.nn.BatchNorm3d` (the paper: ``sqrt(var) +
    eps``), which keeps gradients finite on a constant channel.

    Training mode: batch statistics (over ``B, D, H, W``), kept (``2C`` numbers) for
    :meth:`inverse` in the same step; running statistics updated as torch does, except while
    ``stats_frozen`` is set (by the memory-saving backward while it recomputes).
    Eval mode: running statistics both ways.

    Args:
        num_features: channels ``C`` of the ``(B, C, D, H, W)`` input.
        eps: added to the variance.
        scale_eps: ``eps_i``, the lower bound of the scale (> 0).
        momentum: running statistics momentum.
        track_running_stats: ``False`` uses batch statistics in eval mode too.

    Raises:
        ValueError: if ``scale_eps <= 0``; at call time, for an input that is not
            ``(B, num_features, D, H, W)``.
        RuntimeError: from :meth:`inverse` in training mode before any forward.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        scale_eps: float = 0.1,
        momentum: float = 0.1,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if scale_eps <= 0:
            raise ValueError(f"scale_eps must be > 0 (it bounds the scale), got {scale_eps}")
        self.num_features = num_features
        self.eps = eps
        self.scale_eps = scale_eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.full((num_features,), abs(1.0 - scale_eps)))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var)
        self.stats_frozen = False

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, scale_eps={self.scale_eps}"

    def scale(self) -> torch.Tensor:
        """The effective per-channel scale ``|gamma| + scale_eps``, shape ``(C,)``."""
        return self.weight.abs() + self.scale_eps

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, var)`` the layer normalises with now: the last batch's in training mode."""
        if not self._uses_batch_stats():
            return self.running_mean, self.running_var
        if self.batch_stats is None:
            raise RuntimeError(
                "InvertibleBatchNorm3d.inverse in training mode needs the batch statistics of a "
                "forward pass first"
            )
        return self.batch_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C, D, H, W)``."""
        if x.ndim != 5 or x.shape[1] != self.num_features:
            raise ValueError(
                f"InvertibleBatchNorm3d expects (B, {self.num_features}, D, H, W), got shape "
                f"{tuple(x.shape)}"
            )
        if x.dtype in (torch.float16, torch.bfloat16):
            # mixed precision: normalise (and so invert) in float32; the next layers see float32
            x = x.float()
        batch = self._uses_batch_stats()
        if batch:
            with torch.no_grad():  # kept for the inverse; the forward below uses the same values
                var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), unbiased=False)
            self.batch_stats = (mean, var)
        update = self.training and self.track_running_stats and not self.stats_frozen
        if update:
            self.num_batches_tracked.add_(1)
        # torch's kernel: it keeps only the input and per-channel statistics for its backward
        return F.batch_norm(
            x,
            self.running_mean if update or not batch else None,
            self.running_var if update or not batch else None,
            self.scale(),
            self.bias,
            training=batch,
            momentum=self.momentum,
            eps=self.eps,
        )

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``x = (y - beta) sqrt(var + eps) / s + mean`` with the statistics of the forward.

        In training mode these are the batch statistics of the layer's *last* forward: invert
        (or run a memory-saving backward) before the layer's next training forward, as one
        training step does; two forwards followed by two backwards would invert the first with
        the second's statistics.
        """
        mean, var = self.statistics()
        shape = (1, -1, 1, 1, 1)
        factor = torch.sqrt(var + self.eps) / self.scale()
        return (y - self.bias.view(shape)) * factor.view(shape) + mean.view(shape)

    def snr_alpha(self) -> float:
        """:func:`batch_norm_alpha` for the statistics and parameters this layer uses now."""
        mean, var = self.statistics()
        return batch_norm_alpha(mean, var, self.scale().detach(), self.bias.detach(), self.eps)


class InvertibleLeakyReLU(nn.Module):
    """LeakyReLU ``y = x (x >= 0), n x (x < 0)`` with its inverse ``x = y (y >= 0), y / n``.

    Hascoet et al., eq. 28, write the negative branch ``x / n``; this is torch's convention
    (``n`` multiplies). The SNR factor :func:`leaky_relu_alpha` is the same for ``n`` and
    ``1 / n``.

    Args:
        negative_slope: ``n > 0`` (the paper's depth study, Figure 12, uses 0.2).

    Raises:
        ValueError: if ``negative_slope <= 0`` (not bijective).
    """

    def __init__(self, negative_slope: float = 0.2) -> None:
        super().__init__()
        if negative_slope <= 0:
            raise ValueError(
                f"an invertible LeakyReLU needs negative_slope > 0, got {negative_slope}"
            )
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y >= 0, y, y / self.negative_slope)

    def snr_alpha(self) -> float:
        return leaky_relu_alpha(self.negative_slope)


def leaky_relu_alpha(negative_slope: float) -> float:
    """SNR reduction ``alpha = snr_in / snr_out = 4 / ((1 + 1/n^2)(1 + n^2))`` of the LeakyReLU
    inverse (Hascoet et al., eq. 32c).

    For zero-mean inputs symmetric about 0 and noise on the output much smaller than the signal
    (no sign flips), half the signal and half the noise go through each branch. ``alpha <= 1``,
    with equality at ``n = 1``; symmetric under ``n -> 1/n``.

    Raises:
        ValueError: if ``negative_slope <= 0``.
    """
    n = float(negative_slope)
    if n <= 0:
        raise ValueError(f"negative_slope must be > 0, got {negative_slope}")
    return 4.0 / ((1.0 + 1.0 / n**2) * (1.0 + n**2))


def batch_norm_alpha(
    mean: torch.Tensor,
    var: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 0.0,
) -> float:
    """SNR reduction ``alpha = snr_in / snr_out`` of the batch-norm inverse (Hascoet et al., eq.
    26d) for per-channel input statistics and parameters, all of shape ``(C,)``::

        alpha = sum_i (mean_i^2 + var_i) / sum_i (s_i^2 var_i / (var_i + eps) + beta_i^2)
                * C / sum_i ((var_i + eps) / s_i^2)

    The first factor is ``|x|^2 / |y|^2`` (the output moments written exactly for ``eps`` in the
    square root; the paper's ``gamma_i^2 + beta_i^2`` is the ``eps -> 0`` limit), the second
    ``|eps_y|^2 / |eps_x|^2`` for output noise spread evenly over channels (eq. 25e-f: the inverse
    scales channel ``i``'s noise by ``sqrt(var_i + eps) / s_i``; the squares, lost in the text of
    eq. 25g, are needed to recover the two-channel example, eq. 23c). Channels are assumed to
    hold equally many elements.
    """
    mean, var, scale, bias = (
        torch.as_tensor(t, dtype=torch.float64) for t in (mean, var, scale, bias)
    )
    signal = (mean**2 + var).sum() / (scale**2 * var / (var + eps) + bias**2).sum()
    noise = mean.numel() / ((var + eps) / scale**2).sum()
    return float(signal * noise)


# --------------------------------------------------------------------------------------------
# invertible convolution (section 4.1.4)


class InvertibleConv3d(AdditiveCoupling):
    """Invertible convolution as a minimal reversible block (Hascoet et al., section 4.1.4).

    ``y1 = x1 + conv_f(x2)``, ``y2 = x2 + conv_g(y1)`` on the two channel halves, each module
    one ``k x k x k`` convolution (no bias: a batch norm follows). Its inverse is the additive
    one, exact up to rounding. The memory-saving backward evaluates each convolution once per
    step (:meth:`backward_step`): that evaluation reconstructs the half and builds the graph.

    Args:
        channels: channels ``C`` of the ``(B, C, D, H, W)`` input, even.
        kernel_size: odd kernel size (``padding = kernel_size // 2``).

    Raises:
        ValueError: if ``channels`` is odd or ``kernel_size`` even.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        if channels % 2 or channels < 2:
            raise ValueError(f"InvertibleConv3d needs an even channel count, got {channels}")
        if kernel_size % 2 == 0:
            raise ValueError(f"InvertibleConv3d needs an odd kernel size, got {kernel_size}")
        half = channels // 2

        def conv() -> nn.Conv3d:
            return nn.Conv3d(half, half, kernel_size, padding=kernel_size // 2, bias=False)

        super().__init__(conv(), conv())

    def backward_step(
        self, y: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """``(x, dL/dx, parameter grads)`` from the output ``y`` and ``dL/dy``, one evaluation of
        ``conv_g`` then of ``conv_f`` (:func:`~revseg.nn.reversible.coupling_backward_step`); a
        known input ``x`` replaces the reconstruction."""
        return coupling_backward_step(self, y, grad_y, x)


# --------------------------------------------------------------------------------------------
# the layer-wise invertible chain and its layer-by-layer backward


def walk_back(
    layers: Sequence[nn.Module],
    y: torch.Tensor,
    grad_y: torch.Tensor,
    x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Backward through ``layers`` from their composite output ``y``, one layer at a time.

    Each layer's input is reconstructed from its output (see
    :func:`~revseg.nn.reversible.block_backward_step`), so only one layer's local graph is alive
    at a time. ``x``, the composite input if known, is used for the first layer instead of its
    reconstruction. Returns the (reconstructed) input, ``dL/dx`` and the parameter gradients of
    all layers in forward order. The caller sets the recomputation's context (autocast, frozen
    running statistics): the memory-saving backward of the sequence holding the layers does.
    """
    per_layer: list[list[torch.Tensor | None]] = []
    for index in range(len(layers) - 1, -1, -1):
        known = x if index == 0 else None
        y, grad_y, grads = block_backward_step(layers[index], y, grad_y, known)
        per_layer.append(grads)
    return y, grad_y, [g for grads in reversed(per_layer) for g in grads]


class LayerwiseInvertibleChain(nn.Module):
    """A chain of layer-wise invertible layers (Hascoet et al., section 4.1.6).

    Args:
        layers: modules with ``forward`` and ``inverse`` (e.g. :class:`InvertibleConv3d`,
            :class:`InvertibleBatchNorm3d`, :class:`InvertibleLeakyReLU`, the poolings), applied
            in order. Invertible layers hold no random ops, so no RNG state is kept.
        memory_saving: ``True`` keeps only the chain's output for backward and recomputes each
            layer's input with its inverse on the way back (the Function of
            :class:`~revseg.nn.reversible.InvertibleSequence`); ``False`` is plain autograd on
            the same modules (same outputs and gradients, memory growing with the chain's
            length). Either way states are float32 under autocast.

    Raises:
        ValueError: for an empty chain. TypeError: for a layer without ``inverse``.
    """

    def __init__(self, layers: Sequence[nn.Module], memory_saving: bool = True) -> None:
        super().__init__()
        if len(layers) == 0:
            raise ValueError("LayerwiseInvertibleChain needs at least one layer")
        for layer in layers:
            if not callable(getattr(layer, "inverse", None)):
                raise TypeError(f"{type(layer).__name__} has no inverse")
        self.layers = nn.ModuleList(layers)
        self.memory_saving = memory_saving

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` through the layers, as an ``InvertibleSequence`` of them runs."""
        return apply_invertible_sequence(
            x, self.layers, self.memory_saving, preserve_rng_state=False
        )

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The chain's input from its output, layer by layer."""
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y

    def backward_step(
        self, y: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """``(x, dL/dx, parameter grads)`` by :func:`walk_back` over the layers."""
        return walk_back(self.layers, y, grad_y, x)
