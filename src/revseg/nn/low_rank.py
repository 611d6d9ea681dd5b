"""Symmetric block-low-rank convolution layer whose block rank can grow and shrink in training.

The layer of Peters, Haber and Lensink ("Symmetric block-low-rank layers for fully reversible
multilevel neural networks", eq. 4.7-4.8) maps ``n`` channels to ``n`` channels with

    ``f(Y) = -K^T act(K Y + b)``

where ``K`` is a flat block matrix of ``m x n`` convolution kernels (``m`` = block rank <= ``n``),
``K Y`` is a 3D convolution to ``m`` channels and ``K^T`` is the transposed convolution with the
*same* weights, i.e. the exact adjoint of ``K``. For a pointwise activation with non-negative
slope (ReLU) the Jacobian ``-K^T D K`` is symmetric negative semi-definite, the layer uses
``mn`` kernels instead of ``n^2`` and computes ``2mn`` convolutions.

Rows of ``K`` (each a row of ``n`` kernels plus one bias entry) are stored as *blocks*: one
:class:`~torch.nn.Parameter` of shape ``(k, n, s, s, s)`` per block in ``weight`` and one of
shape ``(k,)`` in ``bias`` (both :class:`~torch.nn.ParameterList`). :meth:`grow` appends a new
block, so existing parameters keep their identity (and their optimizer state); :meth:`shrink`
removes rows from the end. ``load_state_dict`` restructures the blocks to those found in the
state dict, so a checkpoint saved at another rank loads into a freshly built layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "SymmetricBlockLowRankConv3d"]

# activations with non-negative slope keep K^T D K positive semi-definite
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
}
# the same, in place on the convolution's output where autograd allows it (their backward needs
# only their result), so the layer holds one activation of K y instead of two
_ACTIVATIONS_INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "softplus": F.softplus,
}

GROW_INITS = ("small", "zeros", "default")


class SymmetricBlockLowRankConv3d(nn.Module):
    """``f(Y) = -K^T act(K Y + b)`` with ``K`` a block of ``rank x channels`` 3D kernels.

    Shapes: ``(B, n, D, H, W) -> (B, n, D, H, W)`` with ``n = channels``.

    Args:
        channels: channels ``n`` of the input and the output.
        rank: block rank ``m`` (rows of kernels in ``K``), ``1 <= m <= n``; ``None`` = ``n``
            (a full ``n x n`` symmetric layer).
        kernel_size: odd spatial size of each kernel (``padding = kernel_size // 2``, so that
            the transposed convolution is the adjoint of the convolution).
        activation: ``"relu"`` (the paper), ``"tanh"`` or ``"softplus"``; all have non-negative
            slope, which keeps the Jacobian symmetric negative semi-definite.
        init_std: standard deviation of the normal kernel initialisation. ``None`` uses
            ``1 / sqrt(s^3 sqrt(m n))``, which gives ``K^T K`` a unit-order scale at any rank.

    Raises:
        ValueError: for a rank outside ``[1, channels]``, an even kernel size or an unknown
            activation.
    """

    def __init__(
        self,
        channels: int,
        rank: int | None = None,
        kernel_size: int = 3,
        activation: str = "relu",
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        m = channels if rank is None else rank
        self._check_rank(m)
        self.init_std = (
            init_std
            if init_std is not None
            else 1.0 / math.sqrt(kernel_size**3 * math.sqrt(m * channels))
        )
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        self._append_block(m, init="default")

    # ----------------------------------------------------------------------------------------
    # structure

    @property
    def rank(self) -> int:
        """Current block rank ``m``: the number of kernel rows of ``K``."""
        return sum(w.shape[0] for w in self.weight)

    @property
    def block_sizes(self) -> list[int]:
        """Rows per parameter block, in order."""
        return [w.shape[0] for w in self.weight]

    def _check_rank(self, m: int) -> None:
        if not 1 <= m <= self.channels:
            raise ValueError(f"block rank must be in [1, {self.channels}] (channels), got {m}")

    def _append_block(self, k: int, init: str, scale: float = 1e-2) -> tuple[nn.Parameter, ...]:
        if init not in GROW_INITS:
            raise ValueError(f"init must be one of {GROW_INITS}, got {init!r}")
        ref = self.weight[0] if len(self.weight) else None
        factory = {
            "dtype": ref.dtype if ref is not None else None,
            "device": ref.device if ref is not None else None,
        }
        s = self.kernel_size
        weight = torch.empty(k, self.channels, s, s, s, **factory)
        bias = torch.zeros(k, **factory)
        if init == "default":
            nn.init.normal_(weight, std=self.init_std)
        elif init == "small":
            nn.init.normal_(weight, std=self.init_std * scale)
        else:  # zeros: K_new = 0 leaves f unchanged; a positive bias makes dL/dK_new non-zero
            weight.zero_()
            bias.fill_(scale)
        params = (nn.Parameter(weight), nn.Parameter(bias))
        self.weight.append(params[0])
        self.bias.append(params[1])
        return params

    def grow(self, k: int, init: str = "small", scale: float = 1e-2) -> list[nn.Parameter]:
        """Add ``k`` kernel rows to ``K`` (and ``k`` bias entries); existing ones are unchanged.

        The new rows form a new parameter block, so every existing :class:`~torch.nn.Parameter`
        keeps its identity; the optimizer must then be told about the new ones (e.g.
        ``Trainer.sync_optimizer_params``).

        Args:
            k: rows to add (``rank + k <= channels``).
            init: ``"small"``: normal kernels of ``scale * init_std`` and zero bias, so the
                output changes by ``O(scale^2)`` (the layer is quadratic in the new rows) and
                training continues smoothly; ``"zeros"``: zero kernels and bias ``scale``, the
                output is exactly unchanged and the new kernels still receive gradients (a zero
                bias would make them a stationary point); ``"default"``: fresh initialisation.
            scale: see ``init``.

        Returns:
            The new parameters ``[weight_block, bias_block]``.
        """
        if k < 1:
            raise ValueError(f"grow needs k >= 1, got {k}")
        self._check_rank(self.rank + k)
        return list(self._append_block(k, init, scale))

    def shrink(self, k: int) -> None:
        """Remove the last ``k`` kernel rows of ``K`` (the most recently added first).

        Whole blocks are dropped; a block cut in part is replaced by a new parameter holding its
        remaining rows (its optimizer state restarts). Other parameters keep their identity.
        """
        if k < 1:
            raise ValueError(f"shrink needs k >= 1, got {k}")
        self._check_rank(self.rank - k)
        weights, biases = list(self.weight), list(self.bias)
        while k:
            last = weights[-1].shape[0]
            if last <= k:
                weights.pop(), biases.pop()
                k -= last
            else:
                weights[-1] = nn.Parameter(weights[-1].detach()[: last - k].clone())
                biases[-1] = nn.Parameter(biases[-1].detach()[: last - k].clone())
                k = 0
        # new lists holding the same Parameter objects (ParameterList has no deletion)
        self.weight = nn.ParameterList(weights)
        self.bias = nn.ParameterList(biases)

    def set_rank(self, rank: int | None, init: str = "small", scale: float = 1e-2) -> None:
        """Grow or shrink to block rank ``rank`` (``None`` = ``channels``); see :meth:`grow`."""
        rank = self.channels if rank is None else rank
        self._check_rank(rank)
        if rank > self.rank:
            self.grow(rank - self.rank, init=init, scale=scale)
        elif rank < self.rank:
            self.shrink(self.rank - rank)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Resize the blocks to those in ``state_dict`` before the values are copied."""
        sizes = []
        while f"{prefix}weight.{len(sizes)}" in state_dict:
            sizes.append(state_dict[f"{prefix}weight.{len(sizes)}"].shape[0])
        if sizes and sizes != self.block_sizes and sum(sizes) <= self.channels:
            ref = self.weight[0]
            s = self.kernel_size
            self.weight = nn.ParameterList(
                nn.Parameter(ref.new_empty(k, self.channels, s, s, s)) for k in sizes
            )
            self.bias = nn.ParameterList(nn.Parameter(ref.new_empty(k)) for k in sizes)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------------------------------
    # computation

    def kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``K`` as ``(m, n, s, s, s)`` and ``b`` as ``(m,)`` (blocks concatenated)."""
        if len(self.weight) == 1:
            return self.weight[0], self.bias[0]
        return torch.cat(tuple(self.weight)), torch.cat(tuple(self.bias))

    def unsigned(self, y: torch.Tensor) -> torch.Tensor:
        """``K^T act(K y + b)``, the layer without its sign (a memory-saving backward
        differentiates this, so autograd allocates no negated gradient)."""
        weight, bias = self.kernel()
        pad = self.kernel_size // 2
        z = _ACTIVATIONS_INPLACE[self.activation](F.conv3d(y, weight, bias, padding=pad))
        return F.conv_transpose3d(z, weight, padding=pad)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, n, D, H, W) -> (B, n, D, H, W)``: ``-K^T act(K y + b)``."""
        return self.unsigned(y).neg_()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, rank={self.rank}, kernel_size={self.kernel_size}, "
            f"activation={self.activation!r}, blocks={self.block_sizes}"
        )
