"""Fully reversible 3D segmentation network of hybrid reversible blocks.

Hascoet, Febvre, Ariki, Takiguchi: "Reversible designs for extreme memory reduction of deep
neural networks" (section 4.2, Figures 8-9), in 3D, built from the hybrid blocks of
:mod:`revseg.nn.hybrid`.

The network (:class:`HybridRevNet`): a 1x1x1 convolution opens the input to the state channels,
levels of hybrid blocks are separated by invertible pooling (batch pooling where the channel count
stays, channel pooling where it grows x8: the paper's alternation), the up path undoes the
poolings with their inverses (a V without stored skips), and a 1x1x1 head gives the logits. The
whole body between opening and head is one :class:`~revseg.nn.reversible.InvertibleSequence`:
with memory saving it keeps only its output, whatever the depth, and steps each hybrid block back
with the block's own two-phase :meth:`~revseg.nn.hybrid.HybridBlock.backward_step`. Every state
holds the same number of elements (pooling preserves volume), ``B * channels[0] * D * H * W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from revseg.nn.base import SegmentationModel
from revseg.nn.blocks import per_level
from revseg.nn.hybrid import HybridBlock, hybrid_block
from revseg.nn.invertible import (
    BatchPooling3d,
    ChannelPooling3d,
    InverseOf,
)
from revseg.nn.reversible import InvertibleSequence

__all__ = ["HybridRevNet", "pooling_plan"]


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


class HybridRevNet(SegmentationModel):
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
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
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
        # no random ops in the body: no RNG states to keep
        self.body = InvertibleSequence(body, memory_saving=memory_saving, preserve_rng_state=False)
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def hybrid_blocks(self) -> list[HybridBlock]:
        """The hybrid blocks of the body, in forward order (the SNR analysis walks these)."""
        return [b for b in self.body.blocks if isinstance(b, HybridBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        poolings = f"{len(self.pooling)} poolings"
        self.check_input(x, poolings)
        return self.head(self.body(self.opening(x)))
