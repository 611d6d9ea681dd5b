"""Fully reversible hyperbolic network with symmetric block-low-rank layers.

Peters, Haber, Lensink: "Symmetric block-low-rank layers for fully reversible multilevel neural
networks" (building on Lensink et al., "Fully hyperbolic convolutional neural networks"). A
leapfrog discretisation of the telegraph equation ``Y'' = f(Y)`` (eq. 3.5, 4.7)::

    Y_{j+1} = 2 W_j Y_j - W_j W_{j-1} Y_{j-1} - h^2 K_j^T act(K_j W_j Y_j + b_j),  Y_{-1} = Y_0

with ``K_j`` a flat block of ``m x n`` 3x3x3 kernels (:class:`SymmetricBlockLowRankConv3d`) and
``W_j`` the orthonormal 3D Haar transform (:func:`haar3d`: channels x8, D, H, W halved) at the
first layer of a coarser level, its inverse at the first layer of a finer level, the identity
elsewhere. The paper writes the second term as ``W_{j-1} Y_{j-1}``; we read it as "the previous
state brought to the current level", which keeps the shapes consistent. Equivalently, at a level
change both states of the leapfrog pair ``(Y_{j-1}, Y_j)`` are transformed by ``W`` and the plain
recursion ``Y_{j+1} = 2 Y_j - Y_{j-1} + h^2 f_j(Y_j)`` runs inside each level. ``W`` is
orthogonal, so the reverse recursion (eq. 4.9)::

    Y_{j-1} = 2 Y_j - Y_{j+1} + h^2 f_j(Y_j),   then (Y_{j-1}, Y_j) <- W^T (Y_{j-1}, Y_j)

recovers every earlier state, up to rounding, from the last two.

Memory saving (``memory_saving=True``) runs the whole stack in one :class:`torch.autograd.Function`
that keeps only the last two states. Backward walks the layers from the end and, per layer,
evaluates ``f_j(Y_j)`` once with grad enabled: the value reconstructs ``Y_{j-1}`` and the local
graph gives ``J^T`` products and parameter gradients through :func:`torch.autograd.grad`. The
parameters are Function inputs, so their gradients are accumulated by autograd (nothing calls
``.backward()`` inside backward). ``memory_saving=False`` is plain autograd on the same modules,
with identical outputs and gradients.

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

from revseg.nn.haar import haar3d, inverse_haar3d
from revseg.nn.low_rank import SymmetricBlockLowRankConv3d
from revseg.nn.reversible import _AutocastState, _float32_states

__all__ = [
    "HyperbolicNet",
    "LeapfrogStack",
    "MemoryReport",
    "leapfrog_update",
    "level_plan",
    "level_transform",
    "memory_report",
    "resolve_ranks",
]

Rank = int | None


def level_plan(layers: Sequence[int], channels: int) -> list[tuple[int, int, str | None]]:
    """``(coarsenings, channels, transform)`` of each level of a V-shaped multilevel net.

    ``len(layers)`` must be odd: ``c = len(layers) // 2`` Haar coarsenings, then ``c``
    refinements. ``transform`` is what the level applies to the leapfrog pair on entry:
    ``None`` (first level), ``"coarsen"`` or ``"refine"``.
    """
    if len(layers) % 2 != 1 or any(int(k) < 1 for k in layers):
        raise ValueError(
            f"layers must list an odd number of levels with >= 1 layer each, got {list(layers)}"
        )
    last = len(layers) - 1
    depths = [min(i, last - i) for i in range(len(layers))]
    plan = []
    for i, depth in enumerate(depths):
        transform = None if i == 0 else ("coarsen" if depth > depths[i - 1] else "refine")
        plan.append((depth, channels * 8**depth, transform))
    return plan


def resolve_ranks(
    rank: Rank | Sequence[Rank], plan: Sequence[tuple[int, int, str | None]]
) -> list[int]:
    """Block rank per level from ``rank``.

    Args:
        rank: an int: the block rank of every *coarse* level (capped at its channels); levels at
            the input resolution keep full ``n x n`` kernels, as in Table 1 (6x6). ``None``:
            full everywhere. A list: one entry per level (``None`` = full).
        plan: the :func:`level_plan`.
    """
    if rank is None or isinstance(rank, int):
        return [n if rank is None or depth == 0 else min(int(rank), n) for depth, n, _ in plan]
    if len(rank) != len(plan):
        raise ValueError(f"rank lists one entry per level ({len(plan)}), got {list(rank)}")
    return [n if r is None else int(r) for r, (_, n, _) in zip(rank, plan)]


def level_transform(kind: str | None, inverse: bool, *states: torch.Tensor) -> list[torch.Tensor]:
    """Apply a level's entry transform (or its inverse = transpose) to each state."""
    if kind is None:
        return list(states)
    coarsen = (kind == "coarsen") != inverse
    fn = haar3d if coarsen else inverse_haar3d
    return [fn(s) for s in states]


def leapfrog_update(
    force: torch.Tensor, y: torch.Tensor, other: torch.Tensor, h2: float
) -> torch.Tensor:
    """``h^2 f(Y_j) + 2 Y_j - Y_other``, in place on ``force`` (forward: ``Y_other = Y_{j-1}``
    gives ``Y_{j+1}``; reverse: ``Y_other = Y_{j+1}`` gives ``Y_{j-1}``). One op order for every
    path, so plain autograd and the memory-saving Function give bit-identical outputs."""
    if force.dtype != y.dtype:  # autocast: the layer ran in half precision, states stay in y's
        force = force.to(y.dtype)
    return force.mul_(h2).add_(y, alpha=2).sub_(other)


class _LeapfrogFunction(torch.autograd.Function):
    """The whole leapfrog stack keeping only its last two states (see module docstring).

    Inputs: ``y0``, the stack, then every trainable parameter of its layers in
    :meth:`LeapfrogStack.trainable_parameters` order.
    """

    @staticmethod
    def forward(ctx, y0, stack, *params):  # type: ignore[override]
        ctx.stack = stack
        ctx.autocast = _AutocastState(y0.device.type)
        prev, cur = stack.run(y0, y0)
        ctx.save_for_backward(prev, cur)
        return cur

    @staticmethod
    def backward(ctx, grad_cur):  # type: ignore[override]
        prev, cur = (t.detach() for t in ctx.saved_tensors)
        stack = ctx.stack
        h2 = stack.h**2
        g_prev, g_cur = torch.zeros_like(grad_cur), grad_cur
        layer_grads: list[list[torch.Tensor | None]] = []
        for kind, level in zip(reversed(stack.transforms), reversed(stack.levels)):
            for layer in reversed(level):
                # the pair (Y_j, Y_{j+1}) = (prev, cur) with gradients (g_prev, g_cur)
                params = [p for p in layer.parameters() if p.requires_grad]
                with torch.enable_grad(), ctx.autocast.context():
                    y = prev.detach().requires_grad_(True)
                    u = layer.unsigned(y)  # f(Y_j) = -u: sign flips are exact
                # Y_{j-1} = 2 Y_j - Y_{j+1} + h^2 f(Y_j), in place on u before its backward (no
                # op of the graph saved its output), so Y_{j+1} is freed before the gradients
                prev, cur = leapfrog_update(u.detach(), prev, cur, -h2), prev
                grads = torch.autograd.grad(u, [y, *params], g_cur, allow_unused=True)
                # dL/dY_j = g_{j-1} + 2 g_{j+1} + h^2 J_f^T g_{j+1};  dL/dY_{j-1} = -g_{j+1}
                g_y = grads[0].mul_(-h2).add_(g_cur, alpha=2).add_(g_prev)
                del g_prev  # before negating: g_{j+1} in place once it is ours
                g_prev = g_cur.neg_() if g_cur is not grad_cur else g_cur.neg()
                g_cur = g_y
                layer_grads.append([g if g is None else g.mul_(-h2) for g in grads[1:]])
                del u, y, grads, g_y
            # one state at a time (W^T = W^-1 for the gradients), each freed once transformed
            (prev,) = level_transform(kind, True, prev)
            (cur,) = level_transform(kind, True, cur)
            (g_prev,) = level_transform(kind, True, g_prev)
            (g_cur,) = level_transform(kind, True, g_cur)
        # Y_{-1} = Y_0: both halves of the first pair are the input
        grad_y0 = g_prev + g_cur if ctx.needs_input_grad[0] else None
        ordered = [g for grads in reversed(layer_grads) for g in grads]
        return (grad_y0, None, *ordered)


class LeapfrogStack(nn.Module):
    """Leapfrog layers on a V of levels joined by Haar transforms; exactly invertible.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)`` with ``D, H, W`` divisible by ``2^c``
    (``c = len(layers) // 2`` coarsenings); level ``i`` holds ``C * 8^depth_i`` channels.

    Args:
        channels: channels ``C`` of the state at the input resolution.
        layers: leapfrog layers per level (odd count of levels; see :func:`level_plan`).
        rank: block rank (see :func:`resolve_ranks`).
        h: time step.
        kernel_size: kernel size of the block-low-rank layers.
        activation: activation of the block-low-rank layers.
        memory_saving: keep only the last two states for backward (see module docstring).
    """

    def __init__(
        self,
        channels: int,
        layers: Sequence[int],
        rank: Rank | Sequence[Rank] = 4,
        h: float = 0.1,
        kernel_size: int = 3,
        activation: str = "relu",
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        plan = level_plan(layers, channels)
        ranks = resolve_ranks(rank, plan)
        self.channels = channels
        self.plan = plan
        self.coarsenings = len(plan) // 2
        self.transforms = [kind for _, _, kind in plan]
        self.h = float(h)
        self.memory_saving = memory_saving
        self.levels = nn.ModuleList(
            nn.ModuleList(
                SymmetricBlockLowRankConv3d(n, r, kernel_size, activation) for _ in range(int(k))
            )
            for k, (_, n, _), r in zip(layers, plan, ranks)
        )

    def check_input(self, y: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``y`` is ``(B, channels, D, H, W)`` with sizes divisible."""
        factor = 2**self.coarsenings
        if y.ndim != 5 or y.shape[1] != self.channels:
            raise ValueError(
                f"expected (B, {self.channels}, D, H, W) states, got shape {tuple(y.shape)}"
            )
        if any(s % factor for s in y.shape[2:]):
            raise ValueError(
                f"input D, H, W must be divisible by {factor} ({self.coarsenings} Haar "
                f"coarsenings), got {tuple(y.shape[2:])}"
            )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters in the order the memory-saving backward returns their grads."""
        layers = [layer for level in self.levels for layer in level]
        return [p for layer in layers for p in layer.parameters() if p.requires_grad]

    def run(self, prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The recursion from the pair ``(Y_{-1}, Y_0)`` to the last pair ``(Y_{N-1}, Y_N)``."""
        h2 = self.h**2
        for kind, level in zip(self.transforms, self.levels):
            prev, cur = level_transform(kind, False, prev, cur)
            for layer in level:
                prev, cur = cur, leapfrog_update(layer(cur), cur, prev, h2)
        return prev, cur

    def inverse(self, prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse recursion (eq. 4.9): ``(Y_{N-1}, Y_N) -> (Y_{-1}, Y_0)``."""
        h2 = self.h**2
        for kind, level in zip(reversed(self.transforms), reversed(self.levels)):
            for layer in reversed(level):
                prev, cur = leapfrog_update(layer(prev), prev, cur, h2), prev
            prev, cur = level_transform(kind, True, prev, cur)
        return prev, cur

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        """``Y_0 -> Y_N`` with ``Y_{-1} = Y_0``."""
        self.check_input(y0)
        if self.memory_saving and torch.is_grad_enabled():
            return _LeapfrogFunction.apply(y0, self, *self.trainable_parameters())
        return self.run(y0, y0)[1]

    def ranks(self) -> list[int]:
        """Block rank per level (the largest among the level's layers)."""
        return [max(layer.rank for layer in level) for level in self.levels]

    def level_channels(self) -> list[int]:
        return [level[0].channels for level in self.levels]


class HyperbolicNet(nn.Module):
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
    def memory_saving(self) -> bool:
        return self.stack.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.stack.memory_saving = value

    def open(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W) -> (B, state_channels, D, H, W)``: the first state."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if self.opening is not None:
            # under autocast the convolution gives half precision; the states stay float32, as
            # everywhere in revseg's reversible parts, so the leapfrog reverse is float32-exact
            return _float32_states(self.opening(x))
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

    def memory_report(self, spatial_shape: Sequence[int], batch_size: int = 1) -> MemoryReport:
        """Conv-kernel and state memory of this model on ``(D, H, W)`` inputs (Table 2 terms)."""
        return memory_report(self, spatial_shape, batch_size)


# ------------------------------------------------------------------------------------------------
# memory of kernels and states (Table 2)


@dataclass(frozen=True)
class MemoryReport:
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
) -> MemoryReport:
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
    return MemoryReport(
        kernel_bytes=numel * bytes_per_element,
        full_kernel_bytes=full * bytes_per_element,
        state_bytes=3 * state * bytes_per_element,
    )
