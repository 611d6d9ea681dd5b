"""RevUp U-Net: invertible residual blocks with Fixup and spectral norm, no normalisation layers.

Thangarasa, Tsai, Taylor, Köster, "Reversible Fixup Networks for Memory-Efficient Training"
(RevUp). Each block is a ResNet + Fixup basic block made invertible: ``y = x + g(x)`` with
``Lip(g) < 1`` kept by spectral normalisation of both convolutions (one power iteration per
training step, ``c = 0.9``) and inverted by fixed-point iteration (one iteration, as the paper
trains). Fixup initialisation replaces normalisation layers, so nothing depends on the batch.

The U-Net is the partially reversible U-Net's skeleton (:class:`revseg.nn.unet.ReversibleUNet`)
with RevUp blocks: an input conv 4 -> C_0 (3x3x3, no bias); per level an
:class:`InvertibleSequence` of blocks in the encoder and in the decoder; down = a strided 2x2x2
convolution (stride 2, the paper's strided downsampling; its input, the encoder sequence's
output, is kept, as the paper keeps inputs only at strided downsampling); up = 1x1x1 conv +
trilinear x2; additive skips; head 1x1x1 conv C_0 -> 3 region logits (WT, TC, ET),
zero-initialised (Fixup's rule for the classification layer).

Block (``ReLU`` moved from after the sum into the branch, our reading of "moving the ReLU after
the summation into the residual"; Fixup's scalar biases ``b`` and multiplier ``s``)::

    g(x) = conv2_s(relu(conv1(relu(x) + b1a) + b1b) + b2a) + b2b

``conv2_s`` applies the multiplier to the weight before the spectral bound, so whatever ``s``
learns each convolution's operator norm is about ``c`` and ``Lip(g)`` about ``c^2`` (a free
multiplier would make the branch expansive once ``|s| > 1/c^2``). The bound ``c`` holds exactly
only on inputs up to the power-iteration grid size (7^3 for the default 8^3 periodic grid); on
larger inputs it is a few % above (each normalised conv measured 1.006-1.036 c on 24^3
zero-padded inputs), still below 1 at ``c = 0.9``.
Fixup: ``conv2`` starts at zero, ``conv1`` at He init times ``L^(-1/2)`` (``L`` blocks in the
model), so every block starts as the identity. The paper also lowers the learning rate of the
scalar biases and multipliers 10x (:meth:`RevUpUNet.fixup_parameters` lists them).

Memory saving: each sequence keeps only its output; backward inverts each block (``N``
fixed-point iterations, ``N + 1`` evaluations of ``g`` per block with the recomputation: the
paper's 7L training cost at N = 1). With ``inverse_iterations = 1`` the reconstructed inputs, and
so the gradients, are approximate (the paper trains this way); with enough iterations they equal
plain autograd (``memory_saving=False``).

Default size: channels [30, 60, 120, 180, 240] (half the partially reversible U-Net's at every
level: a basic block holds two C x C 3x3x3 convolutions, four times an additive coupling's
weights, and [60, ..., 480] would give 47M parameters), 12,429,773 parameters at depth 1/1,
within 0.5% of the partially reversible U-Net's 12.37M.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from revseg.nn.blocks import per_level
from revseg.nn.lipschitz import SpectralNormConv3d, fixed_point_inverse, fixup_init_
from revseg.nn.reversible import InvertibleSequence
from revseg.nn.unet import ConvTrilinearUp3d, ReversibleUNet, level_sequence

__all__ = ["RevUpBlock", "RevUpUNet", "revup_level"]


class RevUpBlock(nn.Module):
    """Invertible Fixup basic block ``y = x + g(x)`` (see the module docstring for ``g``).

    Args:
        channels: channels ``C`` of the block's input and output.
        num_branches: ``L``, residual branches in the whole network (Fixup's scaling of
            ``conv1`` by ``L^(-1/2)``).
        coefficient: spectral bound ``c`` of each convolution: its norm is about ``c`` (a few %
            above on inputs larger than the power-iteration grid), ``Lip(g)`` about ``c^2``.
        inverse_iterations: fixed-point iterations of :meth:`inverse` (the paper: 1).
        kernel_size: odd kernel size of both convolutions.
        power_grid_size: grid of the power iteration (:class:`SpectralNormConv3d`).

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        num_branches: int = 1,
        coefficient: float = 0.9,
        inverse_iterations: int = 1,
        kernel_size: int = 3,
        power_grid_size: int = 8,
    ) -> None:
        super().__init__()
        if inverse_iterations < 1:
            raise ValueError(f"inverse_iterations must be >= 1, got {inverse_iterations}")
        self.channels = channels
        self.inverse_iterations = int(inverse_iterations)

        def conv() -> SpectralNormConv3d:
            return SpectralNormConv3d(
                channels, channels, kernel_size, coefficient, power_grid_size, bias=False
            )

        self.bias1a = nn.Parameter(torch.zeros(1))
        self.conv1 = conv()
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.conv2 = conv()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        fixup_init_([self.conv1, self.conv2], num_branches)

    def normalized_weights(self, update: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both convolutions' bounded weights (``update``: see
        :meth:`SpectralNormConv3d.normalized_weight`)."""
        return (
            self.conv1.normalized_weight(update=update),
            self.conv2.normalized_weight(self.scale, update=update),
        )

    def residual(
        self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``g(x)``, with the given :meth:`normalized_weights` or freshly computed ones."""
        w1, w2 = self.normalized_weights() if weights is None else weights
        h = self.conv1(torch.relu(x) + self.bias1a, w1)
        h = self.conv2(torch.relu(h + self.bias1b) + self.bias2a, w2)
        return h + self.bias2b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)

    def inverse(self, y: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """The input reconstructed by ``iterations`` (default ``inverse_iterations``)
        fixed-point iterations; the weights are computed once and the power iteration is not
        advanced."""
        weights = self.normalized_weights(update=False)
        return fixed_point_inverse(
            lambda x: self.residual(x, weights),
            y,
            self.inverse_iterations if iterations is None else iterations,
        )


def revup_level(
    channels: int,
    depth: int,
    num_branches: int,
    coefficient: float,
    inverse_iterations: int,
    power_grid_size: int,
    memory_saving: bool,
    preserve_rng_state: bool = False,
) -> InvertibleSequence:
    """An :class:`InvertibleSequence` of ``depth`` :class:`RevUpBlock` on ``channels``."""

    def block() -> RevUpBlock:
        return RevUpBlock(
            channels, num_branches, coefficient, inverse_iterations, power_grid_size=power_grid_size
        )

    return level_sequence(block, depth, InvertibleSequence, memory_saving, preserve_rng_state)


class RevUpUNet(ReversibleUNet):
    """U-Net of invertible RevUp blocks for 3D segmentation (see the module docstring).

    The skeleton (stem, ``encoders``, ``down``, ``decoders``, ``up``, additive skips, ``head``,
    ``memory_saving``) is :class:`~revseg.nn.unet.ReversibleUNet`'s; down is a strided 2x2x2
    conv, up :class:`~revseg.nn.unet.ConvTrilinearUp3d`.

    Args:
        in_channels: input channels (4 MRI modalities).
        out_channels: output logits (3 regions WT, TC, ET; apply a sigmoid for probabilities).
        channels: channels per resolution level, top to bottom.
        encoder_depth: RevUp blocks per encoder sequence: one int for all levels, or a list with
            one entry per level.
        decoder_depth: the same for the decoder sequences.
        coefficient: spectral bound ``c`` of every convolution inside the blocks (the paper: 0.9).
        inverse_iterations: fixed-point iterations that reconstruct each block's input in the
            memory-saving backward (the paper: 1; exact gradients need more, see the tests).
        power_grid_size: side of the periodic grid of the power iterations.
        fixup_lr_scale: learning-rate factor of Fixup's scalar biases and multipliers (the paper:
            0.1), applied by the trainer through :meth:`parameter_groups`.
        memory_saving: ``True`` keeps only each sequence's output and reconstructs the blocks'
            inputs in backward; ``False`` is plain autograd on the same modules (same parameters
            and outputs; same gradients once the fixed point has converged).
        preserve_rng_state: restore the RNG for recomputation (the blocks hold no random ops).
        checkpointing: run the resampling between the sequences under gradient checkpointing
            (see :class:`~revseg.nn.unet.ReversibleUNet`).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``, D, H, W divisible by
    ``2 ** (len(channels) - 1)``.

    Raises:
        ValueError: for depths that are not positive or do not match the levels, and at call time
            for an input that is not 5D or whose sizes are not divisible.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = (30, 60, 120, 180, 240),
        encoder_depth: int | Sequence[int] = 1,
        decoder_depth: int | Sequence[int] = 1,
        coefficient: float = 0.9,
        inverse_iterations: int = 1,
        power_grid_size: int = 8,
        fixup_lr_scale: float = 0.1,
        memory_saving: bool = True,
        preserve_rng_state: bool = False,
        checkpointing: bool = False,
    ) -> None:
        if not fixup_lr_scale > 0:
            raise ValueError(f"fixup_lr_scale must be > 0, got {fixup_lr_scale}")
        levels = len(channels)
        enc = per_level(encoder_depth, levels, "encoder_depth")
        dec = per_level(decoder_depth, levels, "decoder_depth")
        num_branches = sum(enc) + sum(dec)

        def level(c: int, depth: int) -> InvertibleSequence:
            return revup_level(
                c,
                depth,
                num_branches,
                coefficient,
                inverse_iterations,
                power_grid_size,
                memory_saving,
                preserve_rng_state,
            )

        super().__init__(
            in_channels,
            out_channels,
            channels,
            enc,
            dec,
            level,
            down=lambda i, fine, coarse: nn.Conv3d(fine, coarse, 2, stride=2),
            up=lambda i, coarse, fine: ConvTrilinearUp3d(coarse, fine),
            checkpointing=checkpointing,
        )
        self.fixup_lr_scale = float(fixup_lr_scale)
        nn.init.zeros_(self.head.weight)  # Fixup: the classification layer starts at zero
        nn.init.zeros_(self.head.bias)

    @property
    def inverse_iterations(self) -> int:
        """Fixed-point iterations of the blocks' inverses (set on every block)."""
        return self.blocks()[0].inverse_iterations

    @inverse_iterations.setter
    def inverse_iterations(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"inverse_iterations must be >= 1, got {value}")
        for block in self.blocks():
            block.inverse_iterations = int(value)

    def blocks(self) -> list[RevUpBlock]:
        return [block for seq in self.reversible_sequences() for block in seq.blocks]

    def fixup_parameters(self) -> list[nn.Parameter]:
        """Fixup's scalar biases and multipliers (the paper trains them at 1/10 of the lr)."""
        names = ("bias1a", "bias1b", "bias2a", "bias2b", "scale")
        return [getattr(block, name) for block in self.blocks() for name in names]

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups: every other parameter, then Fixup's scalars with
        ``lr_scale = fixup_lr_scale`` (the trainer multiplies the optimizer's lr by it)."""
        fixup = {id(p) for p in self.fixup_parameters()}
        rest = [p for p in self.parameters() if id(p) not in fixup]
        return [
            {"params": rest},
            {"params": self.fixup_parameters(), "lr_scale": self.fixup_lr_scale},
        ]
