"""Non-reversible baseline of the partially reversible U-Net.

Brügger et al. 2019, section 2.2: the No-New-Net U-Net (Isensee et al. 2018) with each reversible
block replaced by GN-LeakyReLU-Conv-GN-LeakyReLU-Conv, channels [30, 60, 120, 240, 480] (half of
the reversible net's, since the reversible blocks work on channel halves) and no 1x1x1 channel
convolutions: the first convolution of a block changes the channels. As in the authors' code the
bottom level is one block 240 -> 480 -> 240, the decoder blocks end in the next level's channels,
upsampling is trilinear and skips are added. About 12.4M parameters, the same as the reversible
net at depth 1/1.

``checkpointing=True`` is the standard alternative to reversibility (Chen et al. 2016, "Training
Deep Nets with Sublinear Memory Cost"): in training each block runs under
:func:`torch.utils.checkpoint.checkpoint` (non-reentrant), which keeps only the block's input and
recomputes the block's activations in backward. Same parameters, outputs and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revseg.nn.base import SegmentationModel
from revseg.nn.blocks import NormActConv, PointwiseConv3d, max_pool2x, per_level
from revseg.nn.reversible import fork

__all__ = ["UNetBaseline", "ConvBlock"]


class ConvBlock(nn.Sequential):
    """``[GN-LReLU-]Conv(in -> mid) -> GN-LReLU-Conv(mid -> out)`` on ``(B, C, D, H, W)``.

    Args:
        in_channels, mid_channels, out_channels: channels before, between and after the convs.
        norm_groups: GroupNorm groups (must divide every level's channels).
        negative_slope: LeakyReLU slope.
        first_norm: ``False`` starts with the bare convolution (used on the raw input).
        norm_dtype: the GroupNorms' dtype under autocast (see
            :class:`~revseg.nn.blocks.NormActConv`).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        norm_groups: int = 30,
        negative_slope: float = 0.01,
        first_norm: bool = True,
        norm_dtype: str = "float32",
    ) -> None:
        super().__init__(
            NormActConv(
                in_channels,
                mid_channels,
                norm_groups,
                negative_slope=negative_slope,
                norm=first_norm,
                norm_dtype=norm_dtype,
            ),
            NormActConv(
                mid_channels,
                out_channels,
                norm_groups,
                negative_slope=negative_slope,
                norm_dtype=norm_dtype,
            ),
        )


class UNetBaseline(SegmentationModel):
    """The non-reversible No-New-Net equivalent of :class:`PartiallyReversibleUNet`.

    Args:
        in_channels: input channels (4 MRI modalities).
        out_channels: output logits (3 regions WT, TC, ET).
        channels: channels per resolution level, top to bottom.
        norm_groups: GroupNorm groups (30 as in the authors' code).
        negative_slope: LeakyReLU slope.
        encoder_blocks: blocks per encoder level (the bottom included): an int for every level or
            a list with one entry per level. 1 is the paper's net; ``k`` adds ``k - 1`` blocks
            that keep the level's output channels (``C -> C -> C``; ``240`` at the bottom), for
            comparisons with ``prev_unet`` at ``encoder_depth=k`` (30.0M parameters at k = 4,
            this net 34.2M).
        checkpointing: in training with grad enabled, run every block through
            :func:`torch.utils.checkpoint.checkpoint` (``use_reentrant=False``): its activations
            are recomputed in backward instead of kept, at the cost of one extra forward.
        norm_dtype: the GroupNorms' dtype under autocast: ``"float32"`` (torch's GroupNorm, which
            CUDA's autocast runs in float32 and so keeps float32 activations) or ``"autocast"``
            (:class:`~revseg.nn.blocks.LowPrecisionGroupNorm`, as timm's ``fast_norm``).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``, D, H, W divisible by
    ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = (30, 60, 120, 240, 480),
        norm_groups: int = 30,
        negative_slope: float = 0.01,
        encoder_blocks: int | Sequence[int] = 1,
        checkpointing: bool = False,
        norm_dtype: str = "float32",
    ) -> None:
        super().__init__()
        c = [int(v) for v in channels]
        if len(c) < 2:
            raise ValueError(f"UNetBaseline needs at least 2 levels, got channels={c}")
        extra = [k - 1 for k in per_level(encoder_blocks, len(c), "encoder_blocks")]
        self.in_channels = in_channels
        self.channels = c
        self.divisor = 2 ** (len(c) - 1)
        self.checkpointing = checkpointing

        def block(cin: int, cmid: int, cout: int, first_norm: bool = True) -> ConvBlock:
            return ConvBlock(cin, cmid, cout, norm_groups, negative_slope, first_norm, norm_dtype)

        levels = len(c)
        self.encoders = nn.ModuleList(
            [block(in_channels, c[0], c[0], first_norm=False)]
            + [block(c[i - 1], c[i], c[i]) for i in range(1, levels - 1)]
        )
        self.bottom = block(c[-2], c[-1], c[-2])
        # decoders[i] works on level i and hands level i - 1 its channels (level 0 keeps c[0])
        self.decoders = nn.ModuleList(
            [block(c[0], c[0], c[0])] + [block(c[i], c[i], c[i - 1]) for i in range(1, levels - 1)]
        )
        self.head = PointwiseConv3d(c[0], out_channels)
        # the encoder_blocks - 1 further blocks per encoder level (none by default: no keys)
        outs = [*c[:-1], c[-2]]
        self.extra_encoders = nn.ModuleList(
            nn.ModuleList(block(out, out, out) for _ in range(n)) for out, n in zip(outs, extra)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = self.checkpoint(encoder, max_pool2x(x) if i > 0 else x)
            for extra in self.extra_encoders[i]:
                x = self.checkpoint(extra, x)
            skip, x = fork(x)
            skips.append(skip)
        x = self.checkpoint(self.bottom, max_pool2x(x))
        for extra in self.extra_encoders[-1]:
            x = self.checkpoint(extra, x)
        for i in range(len(self.decoders) - 1, -1, -1):
            x = (
                F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
                + skips.pop()
            )
            x = self.checkpoint(self.decoders[i], x)
        return self.head(x)
