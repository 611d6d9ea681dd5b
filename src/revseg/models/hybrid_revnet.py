"""Fully reversible 3D segmentation network of hybrid reversible blocks.

Hascoet, Febvre, Ariki, Takiguchi: "Reversible designs for extreme memory reduction of deep
neural networks" (section 4.2, Figures 8-9), in 3D. A hybrid block is an additive coupling
(Gomez et al.)::

    y1 = x1 + F(x2),   y2 = x2 + G(y1)

whose modules F and G are chains of layer-wise invertible layers
(:class:`~revseg.nn.invertible.LayerwiseInvertibleChain`: invertible convolution, invertible
batch norm, invertible LeakyReLU, repeated). Its backward (:meth:`HybridBlock.backward_step`)
has two phases (Figure 9):

1. the block input is reconstructed from the output with the coupling's analytical inverse,
   ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``, without keeping hidden activations: block-level
   inverses carry the activations between blocks with minimal error;
2. the gradient goes back through G, then F, layer by layer: each layer's input is rebuilt from
   its output with the layer's own inverse, the layer is recomputed with grad and differentiated.
   The hidden activations of a block are never all alive at once (no local bottleneck); layer-wise
   inverses only run inside a short chain, so their SNR loss does not accumulate across blocks.

That is two extra forwards per block instead of RevNet's one (the paper's cost).

The network (:class:`HybridRevNet`): a 1x1x1 convolution opens the input to the state channels,
levels of hybrid blocks are separated by invertible pooling (batch pooling where the channel count
stays, channel pooling where it grows x8: the paper's alternation), the up path undoes the
poolings with their inverses (a V without stored skips), and a 1x1x1 head gives the logits. The
whole body between opening and head is one :class:`~revseg.nn.reversible.InvertibleSequence`:
with memory saving it keeps only its output, whatever the depth, and steps each hybrid block back
with the block's own two-phase :meth:`HybridBlock.backward_step`. Every state holds the same
number of elements (pooling preserves volume), ``B * channels[0] * D * H * W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from revseg.nn.blocks import per_level
from revseg.nn.invertible import (
    BatchPooling3d,
    ChannelPooling3d,
    InverseOf,
    InvertibleBatchNorm3d,
    InvertibleConv3d,
    InvertibleLeakyReLU,
    LayerwiseInvertibleChain,
)
from revseg.nn.reversible import AdditiveCoupling, InvertibleSequence

__all__ = ["HybridBlock", "HybridRevNet", "hybrid_block", "pooling_plan"]


class HybridBlock(AdditiveCoupling):
    """Hascoet et al.'s hybrid reversible block: an additive coupling of layer-wise invertible
    chains ``F`` and ``G`` on the channel halves, ``(B, C, D, H, W) -> (B, C, D, H, W)``.

    ``F`` and ``G`` run as plain chains inside the block (their own ``memory_saving`` is turned
    off): the block's :meth:`backward_step` walks them layer by layer.

    Args:
        f: chain applied to the second half ``x2``.
        g: chain applied to the first output half ``y1``.
    """

    def __init__(self, f: LayerwiseInvertibleChain, g: LayerwiseInvertibleChain) -> None:
        if not (
            isinstance(f, LayerwiseInvertibleChain) and isinstance(g, LayerwiseInvertibleChain)
        ):
            raise TypeError("HybridBlock needs LayerwiseInvertibleChain modules as F and G")
        f.memory_saving = g.memory_saving = False
        super().__init__(f, g)

    def backward_step(
        self, y: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """``(x, dL/dx, grads of F's then G's parameters)`` from the block output ``y``.

        Phase 1 reconstructs ``x`` (or takes the known ``x``) and the outputs of G and F without
        grad; phase 2 differentiates ``y2 = x2 + G(y1)`` then ``y1 = x1 + F(x2)`` by walking G and
        F backwards from those outputs with their layer-wise inverses, down to the exact module
        inputs ``y1`` and ``x2`` (:meth:`LayerwiseInvertibleChain.backward_step`). F's phase-1
        forward (for ``x1``) runs after G's walk: the same work, one half-state less alive.
        """
        y1, y2 = self.split(y)
        dy1, dy2 = self.split(grad_y)
        # the input and its gradient are written into one buffer each (no concatenation)
        rebuilt = torch.empty_like(y) if x is None else x
        grad_x = torch.empty_like(grad_y)
        x1, x2 = self.split(rebuilt)
        dx1, dx2 = self.split(grad_x)
        # each module's output is handed to its walk without another reference, so the walk
        # frees it after the first layer
        out = {}
        with torch.no_grad():
            out["g"] = self.g(y1)
            if x is None:
                torch.sub(y2, out["g"], out=x2)
        _, g_in_grad, g_grads = self.g.backward_step(out.pop("g"), dy2, y1)
        torch.add(dy1, g_in_grad, out=dx1)
        del g_in_grad
        with torch.no_grad():
            out["f"] = self.f(x2)
            if x is None:
                torch.sub(y1, out["f"], out=x1)
        _, f_in_grad, f_grads = self.f.backward_step(out.pop("f"), dx1, x2)
        torch.add(dy2, f_in_grad, out=dx2)
        return rebuilt, grad_x, [*f_grads, *g_grads]


def hybrid_block(
    channels: int,
    units: int = 2,
    kernel_size: int = 3,
    negative_slope: float = 0.2,
    scale_eps: float = 0.1,
) -> HybridBlock:
    """A :class:`HybridBlock` whose F and G are ``units`` x (invertible conv -> invertible batch
    norm -> invertible LeakyReLU) on ``channels / 2`` channels (the paper's convolutional blocks).

    Raises:
        ValueError: unless ``channels`` is divisible by 4 (halves for the block, quarters for the
            invertible convolution) and ``units >= 1``.
    """
    if channels % 4 or channels < 4:
        raise ValueError(f"hybrid blocks need channels divisible by 4, got {channels}")
    if units < 1:
        raise ValueError(f"units must be >= 1, got {units}")
    half = channels // 2

    def chain() -> LayerwiseInvertibleChain:
        layers: list[nn.Module] = []
        for _ in range(units):
            layers += [
                InvertibleConv3d(half, kernel_size),
                InvertibleBatchNorm3d(half, scale_eps=scale_eps),
                InvertibleLeakyReLU(negative_slope),
            ]
        return LayerwiseInvertibleChain(layers, memory_saving=False)

    return HybridBlock(chain(), chain())


def pooling_plan(channels: Sequence[int]) -> list[str]:
    """The pooling between consecutive levels: ``"batch"`` where the channels stay, ``"channel"``
    where they grow x8 (the only two volume-preserving steps).

    Raises:
        ValueError: for any other ratio, or channels not divisible by 4.
    """
    plan = []
    for c in channels:
        if int(c) % 4 or int(c) < 4:
            raise ValueError(f"channels must be multiples of 4, got {list(channels)}")
    for a, b in zip(channels[:-1], channels[1:]):
        if b == a:
            plan.append("batch")
        elif b == 8 * a:
            plan.append("channel")
        else:
            raise ValueError(
                f"channels per level must stay (batch pooling) or grow x8 (channel pooling) "
                f"between levels, got {list(channels)}"
            )
    return plan


class HybridRevNet(nn.Module):
    """Fully reversible V-shaped 3D segmentation network of hybrid blocks (Hascoet et al.).

    ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` logits, with ``D, H, W``
    divisible by ``2 ** (len(channels) - 1)``.

    Args:
        in_channels: input channels (4 MRI modalities).
        out_channels: output logits (3 regions WT, TC, ET; sigmoid).
        channels: state channels per level, top to bottom, multiples of 4; between levels they
            stay (batch pooling) or grow x8 (channel pooling), see :func:`pooling_plan`.
        encoder_depth: hybrid blocks per level on the way down: an int, or one per level.
        decoder_depth: hybrid blocks per level on the way up (the bottom level runs its encoder
            and decoder blocks in a row).
        units: conv -> BN -> LeakyReLU units in each of F and G.
        kernel_size: kernel size of the invertible convolutions.
        negative_slope: slope ``n`` of the invertible LeakyReLU (SNR factor
            :func:`~revseg.nn.invertible.leaky_relu_alpha`).
        scale_eps: lower bound ``eps_i`` of the invertible batch norm scale.
        norm_groups: accepted for config compatibility with the GroupNorm U-Nets; unused
            (normalisation is the invertible batch norm).
        memory_saving: ``True`` keeps only the body's output for backward; ``False`` is plain
            autograd (same parameters, outputs, gradients; memory growing with depth).

    Raises:
        ValueError: for an inconsistent configuration; at call time for an input that is not
            ``(B, in_channels, D, H, W)`` or with sizes not divisible by the downsampling.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = (16, 16, 128, 128),
        encoder_depth: int | Sequence[int] = 1,
        decoder_depth: int | Sequence[int] = 1,
        units: int = 2,
        kernel_size: int = 3,
        negative_slope: float = 0.2,
        scale_eps: float = 0.1,
        norm_groups: int | None = None,
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        del norm_groups  # unused, see the docstring
        channels = [int(c) for c in channels]
        levels = len(channels)
        self.in_channels = in_channels
        self.channels = channels
        self.pooling = pooling_plan(channels)
        self.divisor = 2 ** (levels - 1)
        enc = per_level(encoder_depth, levels, "encoder_depth")
        dec = per_level(decoder_depth, levels, "decoder_depth")

        def blocks(c: int, depth: int) -> list[nn.Module]:
            return [
                hybrid_block(c, units, kernel_size, negative_slope, scale_eps) for _ in range(depth)
            ]

        def pool(kind: str) -> nn.Module:
            return ChannelPooling3d() if kind == "channel" else BatchPooling3d()

        body: list[nn.Module] = []
        for i in range(levels):
            body += blocks(channels[i], enc[i])
            if i < levels - 1:
                body.append(pool(self.pooling[i]))
        for i in range(levels - 1, -1, -1):
            body += blocks(channels[i], dec[i])
            if i > 0:
                body.append(InverseOf(pool(self.pooling[i - 1])))
        self.opening = nn.Conv3d(in_channels, channels[0], 1)
        self.body = InvertibleSequence(body, memory_saving=memory_saving)
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    @property
    def memory_saving(self) -> bool:
        return self.body.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.body.memory_saving = bool(value)

    def hybrid_blocks(self) -> list[HybridBlock]:
        """The hybrid blocks of the body, in forward order (the SNR analysis walks these)."""
        return [b for b in self.body.blocks if isinstance(b, HybridBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"HybridRevNet expects (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"HybridRevNet needs D, H, W divisible by {self.divisor} "
                f"({len(self.pooling)} poolings), got {tuple(x.shape[2:])}"
            )
        return self.head(self.body(self.opening(x)))
