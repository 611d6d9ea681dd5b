"""Partially reversible U-Net.

Brügger, Baumgartner, Konukoglu, "A Partially Reversible U-Net for Memory-Efficient Volumetric
Image Segmentation", MICCAI 2019. The No-New-Net U-Net with one reversible sequence per
resolution level in the encoder and in the decoder; down- and upsampling, channel changes and the
additive skips stay non-reversible. Only the sequence outputs are kept for backward, so the number
of blocks per sequence (``encoder_depth``, ``decoder_depth``) costs parameters, not activations.

Layout follows the authors' public code: input conv 4 -> 60 (3x3x3, no bias); levels with
channels [60, 120, 240, 360, 480]; each reversible block is an additive coupling with
F = G = GroupNorm -> LeakyReLU -> Conv3d(C/2, C/2, 3); down = maxpool(2) + 1x1x1 conv;
up = 1x1x1 conv + trilinear x2; skips are added; head 1x1x1 conv 60 -> 3 region logits.
About 12.37M parameters at depth 1/1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revseg.nn.blocks import NormActConv, per_level
from revseg.nn.reversible import AdditiveCoupling, ReversibleSequence

__all__ = ["PartiallyReversibleUNet", "reversible_level"]


def reversible_level(
    channels: int,
    depth: int,
    norm_groups: int,
    negative_slope: float,
    memory_saving: bool,
    preserve_rng_state: bool = True,
) -> ReversibleSequence:
    """A reversible sequence of ``depth`` couplings with F = G = GN-LReLU-Conv on C/2 channels."""
    if channels % 2:
        raise ValueError(f"reversible levels need an even channel count, got {channels}")
    half = channels // 2
    blocks = [
        AdditiveCoupling(
            NormActConv(half, half, norm_groups, negative_slope=negative_slope),
            NormActConv(half, half, norm_groups, negative_slope=negative_slope),
        )
        for _ in range(depth)
    ]
    return ReversibleSequence(
        blocks, memory_saving=memory_saving, preserve_rng_state=preserve_rng_state
    )


class PartiallyReversibleUNet(nn.Module):
    """Partially reversible U-Net for 3D segmentation.

    Args:
        in_channels: input channels (4 MRI modalities).
        out_channels: output logits (3 regions WT, TC, ET; apply a sigmoid for probabilities).
        channels: channels per resolution level, top to bottom; each must be even.
        encoder_depth: reversible blocks per encoder sequence: one int for all levels, or a list
            with one entry per level.
        decoder_depth: the same for the decoder sequences.
        norm_groups: GroupNorm groups inside F and G (the authors use 30).
        negative_slope: LeakyReLU slope.
        memory_saving: ``True`` frees activations inside reversible sequences and reconstructs them
            in backward; ``False`` is plain autograd (same parameters, outputs, gradients).
        preserve_rng_state: restore the RNG for recomputation (only needed with random ops).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``, D, H, W divisible by
    ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = (60, 120, 240, 360, 480),
        encoder_depth: int | Sequence[int] = 1,
        decoder_depth: int | Sequence[int] = 1,
        norm_groups: int = 30,
        negative_slope: float = 0.01,
        memory_saving: bool = True,
        preserve_rng_state: bool = False,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        levels = len(channels)
        enc = per_level(encoder_depth, levels, "encoder_depth")
        dec = per_level(decoder_depth, levels, "decoder_depth")
        self.channels = channels
        self.divisor = 2 ** (levels - 1)

        def level(c: int, depth: int) -> ReversibleSequence:
            return reversible_level(
                c, depth, norm_groups, negative_slope, memory_saving, preserve_rng_state
            )

        self.stem = nn.Conv3d(in_channels, channels[0], 3, padding=1, bias=False)
        self.encoders = nn.ModuleList(level(c, d) for c, d in zip(channels, enc))
        self.down = nn.ModuleList(
            nn.Conv3d(channels[i], channels[i + 1], 1) for i in range(levels - 1)
        )
        # decoders[i] works on level i; up[i] takes level i + 1 to level i
        self.decoders = nn.ModuleList(level(c, d) for c, d in zip(channels, dec))
        self.up = nn.ModuleList(
            nn.Conv3d(channels[i + 1], channels[i], 1) for i in range(levels - 1)
        )
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    @property
    def memory_saving(self) -> bool:
        return all(seq.memory_saving for seq in self.reversible_sequences())

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        for seq in self.reversible_sequences():
            seq.memory_saving = bool(value)

    def reversible_sequences(self) -> list[ReversibleSequence]:
        return [*self.encoders, *self.decoders]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"PartiallyReversibleUNet expects (B, C, D, H, W) with D, H, W divisible by "
                f"{self.divisor}, got {tuple(x.shape)}"
            )
        x = self.stem(x)
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = self.down[i - 1](F.max_pool3d(x, 2))
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the bottom level has no skip
        for i in range(len(self.decoders) - 1, -1, -1):
            x = self.decoders[i](x)
            if i > 0:
                x = F.interpolate(
                    self.up[i - 1](x), scale_factor=2, mode="trilinear", align_corners=False
                )
                x = x + skips.pop()
        return self.head(x)
