"""RevNet blocks: additive couplings whose F and G are residual-style two-convolution branches.

Gomez, Ren, Urtasun, Grosse, "The Reversible Residual Network: Backpropagation Without Storing
Activations", NeurIPS 2017. A RevNet block is an :class:`~revseg.nn.reversible.AdditiveCoupling`
(``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``) in which F and G are the residual functions of a ResNet
basic block on half the channels. Here they are pre-activation and 3D with GroupNorm:
``GroupNorm -> LeakyReLU -> Conv3d -> GroupNorm -> LeakyReLU -> Conv3d``, shape-preserving on
``(B, C/2, D, H, W)``. Compared with the partially reversible U-Net's single-convolution F and G
(:func:`revseg.models.prev_unet.reversible_level`) each block holds twice the convolutions.

The memory-saving autograd is :class:`~revseg.nn.reversible.ReversibleSequence`'s; this file only
builds the blocks.
"""

from __future__ import annotations

from torch import nn

from revseg.nn.blocks import NormActConv
from revseg.nn.reversible import AdditiveCoupling, ReversibleSequence

__all__ = ["ResidualFunction", "revnet_coupling", "revnet_sequence"]


class ResidualFunction(nn.Sequential):
    """RevNet's F or G: ``GN -> LReLU -> Conv3d -> GN -> LReLU -> Conv3d`` on ``(B, C, D, H, W)``.

    The basic residual block of a (pre-activation) ResNet without its identity shortcut: the
    coupling's addition plays the shortcut's part. Shape-preserving.

    Args:
        channels: channels of the input and the output (half of the coupling's channels).
        norm_groups: GroupNorm groups (must divide ``channels``).
        negative_slope: LeakyReLU slope.
        kernel_size: convolution kernel size (odd; ``padding = kernel_size // 2``).

    Raises:
        ValueError: if ``kernel_size`` is even (the output would not keep the input's shape).
    """

    def __init__(
        self,
        channels: int,
        norm_groups: int = 30,
        negative_slope: float = 0.01,
        kernel_size: int = 3,
    ) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"ResidualFunction needs an odd kernel_size, got {kernel_size}")
        super().__init__(
            NormActConv(channels, channels, norm_groups, kernel_size, negative_slope),
            NormActConv(channels, channels, norm_groups, kernel_size, negative_slope),
        )
        self.channels = channels


def revnet_coupling(
    channels: int, norm_groups: int = 30, negative_slope: float = 0.01, kernel_size: int = 3
) -> AdditiveCoupling:
    """One RevNet block on ``(B, channels, D, H, W)``: F and G are :class:`ResidualFunction`\\ s
    on ``channels / 2``.

    Raises:
        ValueError: if ``channels`` is odd.
    """
    if channels % 2:
        raise ValueError(f"RevNet blocks need an even channel count, got {channels}")
    half = channels // 2
    return AdditiveCoupling(
        ResidualFunction(half, norm_groups, negative_slope, kernel_size),
        ResidualFunction(half, norm_groups, negative_slope, kernel_size),
    )


def revnet_sequence(
    channels: int,
    depth: int,
    norm_groups: int = 30,
    negative_slope: float = 0.01,
    memory_saving: bool = True,
    preserve_rng_state: bool = False,
    kernel_size: int = 3,
) -> ReversibleSequence:
    """A :class:`~revseg.nn.reversible.ReversibleSequence` of ``depth`` RevNet blocks.

    Args:
        channels: channels of the sequence's input and output (even).
        depth: number of blocks (at least 1).
        norm_groups: GroupNorm groups inside F and G.
        negative_slope: LeakyReLU slope.
        memory_saving: ``True`` keeps only the sequence output for backward; ``False`` is plain
            autograd on the same modules.
        preserve_rng_state: restore the RNG for recomputation (F and G hold no random ops).
        kernel_size: convolution kernel size inside F and G.

    Shapes: ``(B, channels, D, H, W) -> (B, channels, D, H, W)``.

    Raises:
        ValueError: if ``channels`` is odd or ``depth`` < 1.
    """
    if depth < 1:
        raise ValueError(f"revnet_sequence needs depth >= 1, got {depth}")
    blocks = [
        revnet_coupling(channels, norm_groups, negative_slope, kernel_size) for _ in range(depth)
    ]
    return ReversibleSequence(
        blocks, memory_saving=memory_saving, preserve_rng_state=preserve_rng_state
    )
