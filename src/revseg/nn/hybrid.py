"""Hascoet et al.'s hybrid reversible block, a per-block backward step for the engine.

Hascoet, Febvre, Ariki, Takiguchi: "Reversible designs for extreme memory reduction of deep
neural networks" (section 4.2, Figures 8-9), in 3D. A hybrid block is an additive coupling
(Gomez et al.)::

    y1 = x1 + F(x2),   y2 = x2 + G(y1)

whose modules F and G are chains of layer-wise invertible layers
(:class:`~revseg.nn.invertible.LayerwiseInvertibleChain`: invertible convolution, invertible
batch norm, invertible LeakyReLU, repeated). Its backward (:meth:`HybridBlock.backward_step`,
which the engine's :class:`~revseg.nn.reversible.BlockStep` calls) has two phases (Figure 9):

1. the block input is reconstructed from the output with the coupling's analytical inverse,
   ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``, without keeping hidden activations: block-level
   inverses carry the activations between blocks with minimal error;
2. the gradient goes back through G, then F, layer by layer: each layer's input is rebuilt from
   its output with the layer's own inverse, the layer is recomputed with grad and differentiated.
   The hidden activations of a block are never all alive at once (no local bottleneck); layer-wise
   inverses only run inside a short chain, so their SNR loss does not accumulate across blocks.

That is two extra forwards per block instead of RevNet's one (the paper's cost).
"""

from __future__ import annotations

import torch
from torch import nn

from revseg.nn.invertible import (
    InvertibleBatchNorm3d,
    InvertibleConv3d,
    InvertibleLeakyReLU,
    LayerwiseInvertibleChain,
)
from revseg.nn.reversible import AdditiveCoupling

__all__ = ["HybridBlock", "hybrid_block"]


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
