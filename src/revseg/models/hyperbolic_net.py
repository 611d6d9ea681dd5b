"""Fully reversible hyperbolic network with symmetric block-low-rank layers.

Peters, Haber, Lensink: "Symmetric block-low-rank layers for fully reversible multilevel neural
networks" (building on Lensink et al., "Fully hyperbolic convolutional neural networks"): an
opening to the state channels, the leapfrog stack of :mod:`revseg.nn.leapfrog` (exactly
invertible, memory O(1) in its depth with ``memory_saving``), and a 1x1x1 head.

Table 1 of the paper (the default config): 27 layers ``[3, 4, 4, 4, 4, 4, 4]`` on levels with
6 | 48 | 384 | 3072 | 384 | 48 | 6 channels (three Haar coarsenings, three refinements) and
kernels 6x6 | 4x48 | 4x384 | 4x3072 | 4x384 | 4x48 | 6x6 (rank 4; rank 8 in stage 2).
:func:`memory_report` reproduces Table 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from revseg.nn.base import SegmentationModel
from revseg.nn.leapfrog import LeapfrogStack, Rank, level_plan, resolve_ranks
from revseg.nn.reversible import states_in

__all__ = ["HyperbolicMemory", "HyperbolicNet", "memory_report"]


class HyperbolicNet(SegmentationModel):
    """Fully reversible hyperbolic segmentation network with block-low-rank layers.

    ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` logits; ``D, H, W`` divisible by
    ``2^c`` with ``c = len(layers) // 2`` (8 for the paper's three coarsenings).

    Args:
        in_channels: input channels (3 for RGB video).
        out_channels: output logits (1 for binary segmentation, sigmoid).
        state_channels: state channels at the input resolution (6 = RGB opened twice in the paper).
        layers: leapfrog layers per level; an odd number of levels, ``len // 2`` coarsenings then
            as many refinements. Default: Table 1, ``[3, 4, 4, 4, 4, 4, 4]``.
        rank: block rank of the coarse levels (levels at input resolution stay ``n x n``), a list
            with one entry per level, or ``None`` for full ``n x n`` kernels everywhere.
        h: leapfrog time step.
        kernel_size: kernel size of the block-low-rank layers.
        activation: ``"relu"`` (paper), ``"tanh"`` or ``"softplus"``.
        opening: ``"repeat"`` tiles the input ``state_channels / in_channels`` times (the paper's
            2 x RGB; parameter-free), ``"conv"`` a learned 1x1x1 convolution.
        memory_saving: ``True`` keeps only the last two states for backward; ``False`` is plain
            autograd (same outputs and gradients, memory growing with depth).

    Raises:
        ValueError: for an inconsistent configuration (see :func:`level_plan`), or at call time
            for an input of the wrong channels or with sizes not divisible by ``2^c``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        state_channels: int = 6,
        layers: Sequence[int] = (3, 4, 4, 4, 4, 4, 4),
        rank: Rank | Sequence[Rank] = 4,
        h: float = 0.1,
        kernel_size: int = 3,
        activation: str = "relu",
        opening: str = "repeat",
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        if opening == "repeat":
            if state_channels % in_channels:
                raise ValueError(
                    f"opening='repeat' needs state_channels ({state_channels}) divisible by "
                    f"in_channels ({in_channels}); use opening='conv'"
                )
            self.opening = None
        elif opening == "conv":
            self.opening = nn.Conv3d(in_channels, state_channels, 1)
        else:
            raise ValueError(f"opening must be 'repeat' or 'conv', got {opening!r}")
        self.stack = LeapfrogStack(
            state_channels, layers, rank, h, kernel_size, activation, memory_saving
        )
        self.head = nn.Conv3d(state_channels, out_channels, 1)

    @property
    def divisor(self) -> int:
        """The factor ``D, H, W`` must be multiples of (the stack's Haar coarsenings)."""
        return self.stack.divisor

    def open(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W) -> (B, state_channels, D, H, W)``: the first state."""
        self.check_input(x, "the stack's Haar coarsenings")
        if self.opening is not None:
            # under autocast the convolution gives half precision; the states stay float32, as
            # everywhere in revseg's reversible parts, so the leapfrog reverse is float32-exact
            return states_in(self.opening(x))
        return x.repeat(1, self.stack.channels // self.in_channels, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(self.open(x)))

    def ranks(self) -> list[int]:
        """Current block rank per level, e.g. ``[6, 4, 4, 4, 4, 4, 6]`` for Table 1 stage 1."""
        return self.stack.ranks()

    def set_ranks(
        self, rank: Rank | Sequence[Rank], init: str = "small", scale: float = 1e-2
    ) -> list[int]:
        """Grow or shrink every layer to the ranks ``rank`` means (see :func:`resolve_ranks`).

        An int changes the coarse levels only (``set_ranks(8)``: Table 1 stage 2). Growth adds
        new parameter blocks initialised by ``init`` / ``scale`` (see
        :meth:`SymmetricBlockLowRankConv3d.grow`) and keeps existing parameters (identity,
        values); the optimizer must then pick up the new parameters
        (``Trainer.sync_optimizer_params()``).

        Returns:
            the new :meth:`ranks`.
        """
        for level, r in zip(self.stack.levels, resolve_ranks(rank, self.stack.plan)):
            for layer in level:
                layer.set_rank(r, init=init, scale=scale)
        return self.ranks()

    def level_channels(self) -> list[int]:
        """State channels per level, e.g. ``[6, 48, 384, 3072, 384, 48, 6]``."""
        return self.stack.level_channels()

    def memory_report(self, spatial_shape: Sequence[int], batch_size: int = 1) -> HyperbolicMemory:
        """Conv-kernel and state memory of this model on ``(D, H, W)`` inputs (Table 2 terms)."""
        return memory_report(self, spatial_shape, batch_size)


# ------------------------------------------------------------------------------------------------
# memory of kernels and states (Table 2)


@dataclass(frozen=True)
class HyperbolicMemory:
    """Conv-kernel and state memory of a fully reversible hyperbolic network, in bytes.

    Counted as in Table 2 of the paper: kernels = the ``m x n`` convolution kernels of every
    layer (``m n s^3`` numbers, biases not counted); ``full_kernel_bytes`` = the same net with
    ``n x n`` kernels; states = the three states alive at once in a fully reversible leapfrog
    (the pair ``Y_{j-1}, Y_j`` and the new ``Y_{j+1}``; Haar transforms keep the element count,
    so every level's state is ``C D H W`` numbers). MB in the paper are ``10^6`` bytes.
    """

    kernel_bytes: int
    full_kernel_bytes: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.kernel_bytes + self.state_bytes

    @property
    def full_total_bytes(self) -> int:
        return self.full_kernel_bytes + self.state_bytes

    def megabytes(self) -> dict[str, float]:
        """The figures in MB (``10^6`` bytes), keyed for logs and ``summary.json``."""
        return {
            "kernels_mb": self.kernel_bytes / 1e6,
            "kernels_full_mb": self.full_kernel_bytes / 1e6,
            "states_mb": self.state_bytes / 1e6,
            "total_mb": self.total_bytes / 1e6,
            "total_full_mb": self.full_total_bytes / 1e6,
        }

    def __str__(self) -> str:
        mb = self.megabytes()
        return (
            f"conv kernels {mb['kernels_mb']:.0f} MB (full n x n: {mb['kernels_full_mb']:.0f} MB), "
            f"states {mb['states_mb']:.0f} MB, total {mb['total_mb']:.0f} MB "
            f"(full: {mb['total_full_mb']:.0f} MB)"
        )


def memory_report(
    model_or_cfg: HyperbolicNet | Mapping,
    spatial_shape: Sequence[int] = (72, 240, 424),
    batch_size: int = 1,
    bytes_per_element: int = 4,
) -> HyperbolicMemory:
    """Kernel and state memory (Table 2) of a built model or of a model config, unbuilt.

    Args:
        model_or_cfg: a :class:`HyperbolicNet` (its current ranks and parameter sizes are
            counted) or a mapping with its constructor arguments (``state_channels``, ``layers``,
            ``rank``, ``kernel_size``; defaults as in :class:`HyperbolicNet`) for configs too
            large to build, such as ``rank: null`` at Table 1 size (4.2 GB of kernels).
        spatial_shape: ``(D, H, W)`` of the input; the paper's 240 x 424 x 72 video is
            ``(72, 240, 424)``.
        batch_size: samples per step.
        bytes_per_element: 4 (float32), as in the paper; a built model uses its parameters'
            element size.
    """
    if isinstance(model_or_cfg, HyperbolicNet):
        layers = [layer for level in model_or_cfg.stack.levels for layer in level]
        bytes_per_element = layers[0].weight[0].element_size()
        numel = sum(w.numel() for layer in layers for w in layer.weight)
        kernel_size = layers[0].kernel_size
        ranks_channels = [(layer.rank, layer.channels) for layer in layers]
        channels = model_or_cfg.stack.channels
    else:
        cfg = model_or_cfg
        channels = int(cfg.get("state_channels", 6))
        kernel_size = int(cfg.get("kernel_size", 3))
        counts = list(cfg.get("layers", (3, 4, 4, 4, 4, 4, 4)))
        plan = level_plan(counts, channels)
        ranks = resolve_ranks(cfg.get("rank", 4), plan)
        ranks_channels = [(r, n) for k, r, (_, n, _) in zip(counts, ranks, plan) for _ in range(k)]
        numel = sum(m * n * kernel_size**3 for m, n in ranks_channels)
    full = sum(n * n * kernel_size**3 for _, n in ranks_channels)
    state = batch_size * channels * math.prod(spatial_shape)
    return HyperbolicMemory(
        kernel_bytes=numel * bytes_per_element,
        full_kernel_bytes=full * bytes_per_element,
        state_bytes=3 * state * bytes_per_element,
    )
