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

from revseg.nn.blocks import NormActConv
from revseg.nn.reversible import AdditiveCoupling, ReversibleSequence
from revseg.nn.unet import ConvTrilinearUp3d, MaxPoolConv3d, ReversibleUNet, level_sequence

__all__ = ["PartiallyReversibleUNet", "reversible_level"]


def reversible_level(
    channels: int,
    depth: int,
    norm_groups: int,
    negative_slope: float,
    memory_saving: bool,
    preserve_rng_state: bool = True,
    chunks: int | str | None = None,
    state_dtype: str = "float32",
) -> ReversibleSequence:
    """A reversible sequence of ``depth`` couplings with F = G = GN-LReLU-Conv on C/2 channels
    (``chunks``: slabs of the fused backward step; ``state_dtype``: the states' dtype under
    autocast; see :class:`~revseg.nn.reversible.ReversibleSequence`)."""
    if channels % 2:
        raise ValueError(f"reversible levels need an even channel count, got {channels}")
    half = channels // 2

    def coupling() -> AdditiveCoupling:
        return AdditiveCoupling(
            NormActConv(half, half, norm_groups, negative_slope=negative_slope),
            NormActConv(half, half, norm_groups, negative_slope=negative_slope),
        )

    return level_sequence(
        coupling,
        depth,
        ReversibleSequence,
        memory_saving,
        preserve_rng_state,
        chunks=chunks,
        state_dtype=state_dtype,
    )


class PartiallyReversibleUNet(ReversibleUNet):
    """Partially reversible U-Net for 3D segmentation.

    The skeleton (stem, ``encoders``, ``down``, ``decoders``, ``up``, additive skips, ``head``,
    ``memory_saving``, :meth:`reversible_sequences`) is :class:`~revseg.nn.unet.ReversibleUNet`'s;
    down is :class:`~revseg.nn.unet.MaxPoolConv3d`, up :class:`~revseg.nn.unet.ConvTrilinearUp3d`.

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
        chunks: F and G run slab by slab along D in every sequence (forward and backward with
            memory saving): ``None`` (whole volume), a number of slabs, or ``"auto"`` (slabs of at
            most 64 MiB of a half-state, so only large levels are split).
        checkpointing: run the resampling between the sequences under gradient checkpointing
            (see :class:`~revseg.nn.unet.ReversibleUNet`).
        state_dtype: under autocast, the dtype of the states between reversible blocks:
            ``"float32"`` (exact inverses, gradients equal plain autograd's) or ``"autocast"``
            (bf16/fp16 states: about half the activation memory, inverses exact only to the low
            precision's rounding; see :func:`~revseg.nn.reversible.states_in`).

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
        chunks: int | str | None = None,
        checkpointing: bool = False,
        state_dtype: str = "float32",
    ) -> None:
        def level(c: int, depth: int) -> ReversibleSequence:
            return reversible_level(
                c,
                depth,
                norm_groups,
                negative_slope,
                memory_saving,
                preserve_rng_state,
                chunks,
                state_dtype,
            )

        super().__init__(
            in_channels,
            out_channels,
            channels,
            encoder_depth,
            decoder_depth,
            level,
            down=lambda i, fine, coarse: MaxPoolConv3d(fine, coarse),
            up=lambda i, coarse, fine: ConvTrilinearUp3d(coarse, fine),
            checkpointing=checkpointing,
        )
