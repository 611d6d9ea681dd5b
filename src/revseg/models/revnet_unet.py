"""RevNet U-Net: the partially reversible U-Net built from RevNet blocks, with invertible pooling.

Gomez, Ren, Urtasun, Grosse, "The Reversible Residual Network: Backpropagation Without Storing
Activations", NeurIPS 2017 (the blocks); Jacobsen, Smeulders, Oyallon, "i-RevNet: Deep
Invertible Networks", ICLR 2018 (channel pooling); Hascoet, Febvre, Ariki, Takiguchi,
"Reversible designs for extreme memory reduction of deep neural networks" (batch pooling).

The layout is the one of :class:`~revseg.models.prev_unet.PartiallyReversibleUNet` (Brügger et al.
2019): input conv 4 -> C_0 (3x3x3, no bias), one reversible sequence per level in the encoder and
in the decoder, additive skips, head 1x1x1 conv C_0 -> 3 region logits. Each block is a RevNet
block (:func:`revseg.nn.revnet.revnet_sequence`): F = G = GN-LReLU-Conv-GN-LReLU-Conv on C/2.

Between levels ``downsample`` chooses how the resolution is halved, and the way up undoes it:

* ``maxpool``: maxpool(2) + 1x1x1 conv down; 1x1x1 conv + trilinear x2 up (as prev_unet).
* ``channel_pool``: i-RevNet's invertible pooling ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``
  then a 1x1x1 conv ``8 C_i -> C_{i+1}``; up: 1x1x1 conv ``C_{i+1} -> 8 C_i`` and the exact
  inverse (pixel shuffle).
* ``batch_pool``: Hascoet et al.'s pooling ``(B, C, D, ...) -> (8B, C, D/2, ...)``, the eight
  2x2x2 sub-grids of a volume side by side along the batch, then a 1x1x1 conv ``C_i -> C_{i+1}``;
  up: 1x1x1 conv ``C_{i+1} -> C_i`` and batch un-pooling. Level ``i`` then holds ``8^i B``
  samples of size ``D / 2^i``: a skip leaves level ``i`` and comes back to it with the same batch
  layout, so skips add element to element and the output has batch ``B`` again. A 3x3x3 conv on
  a sub-grid is a conv dilated by ``2^i`` on the full-resolution volume, applied to each phase
  separately (GroupNorm statistics are per sub-grid). Every level keeps the whole volume, so its
  activations cost ``C_i`` channels at full resolution: keep the channels small with it.

``downsample`` may also be a list with one kind per level transition, e.g. alternating channel
and batch pooling to control the channel count (Hascoet et al., section 4.1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from revseg.nn.invertible import BatchPooling3d, ChannelPooling3d
from revseg.nn.reversible import ReversibleSequence
from revseg.nn.revnet import revnet_sequence
from revseg.nn.unet import ReversibleUNet, upsample2x

__all__ = ["DOWNSAMPLE_KINDS", "LevelDown", "LevelUp", "RevNetUNet"]

DOWNSAMPLE_KINDS = ("maxpool", "channel_pool", "batch_pool")


def _check_kind(kind: str) -> str:
    if kind not in DOWNSAMPLE_KINDS:
        raise ValueError(f"downsample must be one of {DOWNSAMPLE_KINDS}, got {kind!r}")
    return kind


def _invertible_pooling(kind: str) -> ChannelPooling3d | BatchPooling3d | None:
    """The invertible pooling of ``kind``, ``None`` for ``maxpool``."""
    if kind == "channel_pool":
        return ChannelPooling3d()
    if kind == "batch_pool":
        return BatchPooling3d()
    return None


class LevelDown(nn.Module):
    """Halve the resolution and change the channels: pooling then a 1x1x1 conv.

    Args:
        kind: ``maxpool``, ``channel_pool`` or ``batch_pool`` (see the module docstring).
        in_channels: channels of the finer level.
        out_channels: channels of the coarser level.

    Shapes: ``(B, in, D, H, W) -> (B, out, D/2, H/2, W/2)``; ``(8B, out, ...)`` for batch pooling.
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.kind = _check_kind(kind)
        pool = _invertible_pooling(kind)
        self.pool = nn.MaxPool3d(2) if pool is None else pool
        factor = 8 if kind == "channel_pool" else 1
        self.conv = nn.Conv3d(factor * in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class LevelUp(nn.Module):
    """Undo :class:`LevelDown` of the same ``kind``: a 1x1x1 conv then the resolution doubled.

    ``maxpool`` doubles by trilinear interpolation; the invertible poolings by their exact inverse.

    Args:
        kind: ``maxpool``, ``channel_pool`` or ``batch_pool``.
        in_channels: channels of the coarser level.
        out_channels: channels of the finer level.

    Shapes: ``(B, in, D, H, W) -> (B, out, 2D, 2H, 2W)``; ``(8B, in, ...) -> (B, out, ...)`` for
    batch pooling.
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.kind = _check_kind(kind)
        factor = 8 if kind == "channel_pool" else 1
        self.conv = nn.Conv3d(in_channels, factor * out_channels, 1)
        self.pool = _invertible_pooling(kind)  # None for maxpool: trilinear interpolation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.pool is None:
            return upsample2x(x)
        return self.pool.inverse(x)


class RevNetUNet(ReversibleUNet):
    """U-Net of RevNet blocks for 3D segmentation, with max, channel or batch pooling.

    The skeleton (stem, ``encoders``, ``down``, ``decoders``, ``up``, additive skips, ``head``,
    ``memory_saving``, :meth:`reversible_sequences`) is :class:`~revseg.nn.unet.ReversibleUNet`'s;
    down is :class:`LevelDown`, up :class:`LevelUp`.

    Args:
        in_channels: input channels (4 MRI modalities).
        out_channels: output logits (3 regions WT, TC, ET; apply a sigmoid for probabilities).
        channels: channels per resolution level, top to bottom; each must be even.
        encoder_depth: RevNet blocks per encoder sequence: one int for all levels, or a list with
            one entry per level.
        decoder_depth: the same for the decoder sequences.
        norm_groups: GroupNorm groups inside F and G.
        negative_slope: LeakyReLU slope.
        downsample: ``maxpool``, ``channel_pool`` or ``batch_pool`` for every level transition,
            or a list of ``len(channels) - 1`` of them.
        memory_saving: ``True`` frees activations inside the reversible sequences and reconstructs
            them in backward; ``False`` is plain autograd (same parameters, outputs, gradients).
        preserve_rng_state: restore the RNG for recomputation (only needed with random ops).
        checkpointing: run the resampling between the sequences under gradient checkpointing
            (see :class:`~revseg.nn.unet.ReversibleUNet`).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``, D, H, W divisible by
    ``2 ** (len(channels) - 1)``.

    Raises:
        ValueError: for an odd channel count, a bad depth or ``downsample``, and (in ``forward``)
            for an input that is not 5D or whose sizes are not divisible.
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
        downsample: str | Sequence[str] = "maxpool",
        memory_saving: bool = True,
        preserve_rng_state: bool = False,
        checkpointing: bool = False,
    ) -> None:
        channels = [int(c) for c in channels]
        levels = len(channels)
        if levels < 2:
            raise ValueError(f"RevNetUNet needs at least 2 levels, got channels={channels}")
        kinds = [downsample] * (levels - 1) if isinstance(downsample, str) else list(downsample)
        if len(kinds) != levels - 1:
            raise ValueError(
                f"downsample must be one kind or a list of {levels - 1}, got {downsample!r}"
            )
        kinds = [_check_kind(k) for k in kinds]

        def level(c: int, depth: int) -> ReversibleSequence:
            return revnet_sequence(
                c, depth, norm_groups, negative_slope, memory_saving, preserve_rng_state
            )

        super().__init__(
            in_channels,
            out_channels,
            channels,
            encoder_depth,
            decoder_depth,
            level,
            down=lambda i, fine, coarse: LevelDown(kinds[i], fine, coarse),
            up=lambda i, coarse, fine: LevelUp(kinds[i], coarse, fine),
            checkpointing=checkpointing,
        )
        self.downsample = kinds
