"""The U-Net skeleton shared by the (partially) reversible U-Nets.

Brügger, Baumgartner, Konukoglu, "A Partially Reversible U-Net for Memory-Efficient Volumetric
Image Segmentation", MICCAI 2019, gives the layout: an input conv ``in -> C_0`` (3x3x3, no bias);
per resolution level one sequence of (reversible or invertible) blocks in the encoder and one in
the decoder; between levels a down module (level ``i`` to ``i + 1``) and an up module (back to
``i``); skips from the encoder added to the decoder's upsampled state; a 1x1x1 head
``C_0 -> out``. Only the sequences are memory-saving; everything between them is plain autograd.

:class:`ReversibleUNet` holds the skeleton and takes the per-level sequences and the down / up
modules from factories, so a model file only says what its blocks and its resampling are
(:mod:`revseg.models.prev_unet`, :mod:`revseg.models.revnet_unet`,
:mod:`revseg.models.revup_unet`). Hydra-free: explicit arguments only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revseg.nn.base import SegmentationModel
from revseg.nn.blocks import PointwiseConv3d, max_pool2x, per_level
from revseg.nn.reversible import fork, reversible_parts

__all__ = [
    "ConvTrilinearUp3d",
    "MaxPoolConv3d",
    "ReversibleUNet",
    "head_in_state_dtype",
    "level_sequence",
    "upsample2x",
]


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Trilinear x2 upsampling (``align_corners=False``): ``(B, C, D, H, W) -> (B, C, 2D, ...)``."""
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class MaxPoolConv3d(PointwiseConv3d):
    """Down between levels: ``maxpool(2)`` then a 1x1x1 conv (with bias).

    A 1x1x1 convolution (:class:`~revseg.nn.blocks.PointwiseConv3d`: the parameters ``weight``
    and ``bias`` of a :class:`torch.nn.Conv3d`) whose forward pools first.

    Args:
        in_channels: channels of the finer level.
        out_channels: channels of the coarser level.

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D/2, H/2, W/2)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(max_pool2x(x))


class ConvTrilinearUp3d(PointwiseConv3d):
    """Up between levels: a 1x1x1 conv (with bias) then trilinear x2 (:func:`upsample2x`).

    Under autocast the convolution runs in low precision and its output returns to the input's
    dtype (the float32 states) *before* the upsampling: the full-resolution output and its
    gradient are then never copied between dtypes (a half-state copy at the top level).

    Args:
        in_channels: channels of the coarser level.
        out_channels: channels of the finer level.

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, 2D, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2x(super().forward(x).to(x.dtype))


def head_in_state_dtype(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` in ``x``'s dtype, autocast off: the 1x1x1 head reads the last (float32)
    state, which is kept anyway, so under autocast it neither keeps a low-precision copy of it
    nor returns a low-precision gradient that the state's backward copies back to float32 (one
    and a half states at the top level; the head is a negligible share of the work)."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
        with torch.autocast(x.device.type, enabled=False):
            return head(x)
    return head(x)


def level_sequence(
    block: Callable[[], nn.Module],
    depth: int,
    sequence: Callable[..., nn.Module],
    memory_saving: bool,
    preserve_rng_state: bool,
    **options: object,
) -> nn.Module:
    """``sequence([block() for _ in range(depth)], memory_saving=..., preserve_rng_state=...)``.

    Args:
        block: builds one block (called ``depth`` times, so the blocks share no parameters).
        depth: number of blocks.
        sequence: the memory-saving container, e.g.
            :class:`~revseg.nn.reversible.ReversibleSequence` or
            :class:`~revseg.nn.reversible.InvertibleSequence`.
        memory_saving: passed to ``sequence``.
        preserve_rng_state: passed to ``sequence``.
        options: further keyword arguments of ``sequence`` (e.g. ``chunks``).
    """
    blocks = [block() for _ in range(depth)]
    return sequence(
        blocks, memory_saving=memory_saving, preserve_rng_state=preserve_rng_state, **options
    )


class ReversibleUNet(SegmentationModel):
    """U-Net skeleton with one memory-saving sequence per level in the encoder and the decoder.

    Submodules, in this order (the order the factories are called in, so parameter
    initialisation and ``state_dict`` keys follow it): ``stem``, ``encoders`` (one per level),
    ``down`` (``down[i]`` takes level ``i`` to ``i + 1``), ``decoders`` (``decoders[i]`` works on
    level ``i``), ``up`` (``up[i]`` brings level ``i + 1`` back to level ``i``), ``head``.

    Forward: ``stem``; per level (top to bottom) ``down`` (not at the top) then the encoder, whose
    output is the level's skip; per level (bottom to top) the decoder then, above the bottom,
    ``up`` plus the skip of the level it reaches; ``head``. A skip leaves level ``i`` and comes
    back to it, so it has the layout ``up[i]`` restores (batch pooling changes the batch size).

    Args:
        in_channels: input channels.
        out_channels: output logits.
        channels: channels per resolution level, top to bottom.
        encoder_depth: blocks per encoder sequence: one int for all levels, or one per level.
        decoder_depth: the same for the decoder sequences.
        level: ``level(channels, depth)`` builds one sequence; it must have a settable
            ``memory_saving`` attribute.
        down: ``down(i, channels[i], channels[i + 1])`` builds the module from level ``i`` to
            level ``i + 1`` (half the resolution).
        up: ``up(i, channels[i + 1], channels[i])`` builds the module from level ``i + 1`` back
            to level ``i`` (twice the resolution).
        checkpointing: in training with grad enabled, run the down and up modules (the
            non-reversible resampling between the sequences) under
            :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): they keep only their input,
            a sequence output that is kept anyway, instead of e.g. max-pooling's indices (int64)
            and the pooled tensor, and are recomputed in backward. The stem and the head are not
            wrapped: they keep only the batch and the last decoder output, which are alive anyway.

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``, D, H, W divisible by
    ``divisor = 2 ** (len(channels) - 1)``.

    Raises:
        ValueError: for depths that are not positive or do not match the levels, and in
            ``forward`` for an input that is not 5D or whose sizes are not divisible.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        encoder_depth: int | Sequence[int],
        decoder_depth: int | Sequence[int],
        level: Callable[[int, int], nn.Module],
        down: Callable[[int, int, int], nn.Module],
        up: Callable[[int, int, int], nn.Module],
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        channels = [int(c) for c in channels]
        levels = len(channels)
        enc = per_level(encoder_depth, levels, "encoder_depth")
        dec = per_level(decoder_depth, levels, "decoder_depth")
        self.in_channels = in_channels
        self.channels = channels
        self.divisor = 2 ** (levels - 1)
        pairs = list(enumerate(zip(channels, channels[1:])))
        self.stem = nn.Conv3d(in_channels, channels[0], 3, padding=1, bias=False)
        self.encoders = nn.ModuleList(level(c, d) for c, d in zip(channels, enc))
        self.down = nn.ModuleList(down(i, fine, coarse) for i, (fine, coarse) in pairs)
        self.decoders = nn.ModuleList(level(c, d) for c, d in zip(channels, dec))
        self.up = nn.ModuleList(up(i, coarse, fine) for i, (fine, coarse) in pairs)
        self.head = PointwiseConv3d(channels[0], out_channels)

    def reversible_sequences(self) -> list[nn.Module]:
        """The memory-saving sequences: the encoders top to bottom, then the decoders
        (:func:`~revseg.nn.reversible.reversible_parts`)."""
        return [module for _, module in reversible_parts(self)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = self.checkpoint(self.down[i - 1], x)
            x = encoder(x)
            if i < len(self.encoders) - 1:  # the bottom level has no skip
                skip, x = fork(x)
                skips.append(skip)
        for i in range(len(self.decoders) - 1, -1, -1):
            x = self.decoders[i](x)
            if i > 0:
                x = self.checkpoint(self.up[i - 1], x) + skips.pop()
        return head_in_state_dtype(self.head, x)
