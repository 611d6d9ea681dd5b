"""The leapfrog stack of the fully reversible hyperbolic network, as steps of the one engine.

Peters, Haber, Lensink: "Symmetric block-low-rank layers for fully reversible multilevel neural
networks". A leapfrog discretisation of the telegraph equation ``Y'' = f(Y)`` (eq. 3.5, 4.7)::

    Y_{j+1} = 2 W_j Y_j - W_j W_{j-1} Y_{j-1} - h^2 K_j^T act(K_j W_j Y_j + b_j),  Y_{-1} = Y_0

with ``K_j`` a flat block of ``m x n`` 3x3x3 kernels
(:class:`~revseg.nn.low_rank.SymmetricBlockLowRankConv3d`) and ``W_j`` the orthonormal 3D Haar
transform (:func:`~revseg.nn.haar.haar3d`: channels x8, D, H, W halved) at the first layer of a
coarser level, its inverse at the first layer of a finer level, the identity elsewhere. The paper
writes the second term as ``W_{j-1} Y_{j-1}``; we read it as "the previous state brought to the
current level", which keeps the shapes consistent. Equivalently, at a level change both states
of the leapfrog pair ``(Y_{j-1}, Y_j)`` are transformed by ``W`` and the plain recursion
``Y_{j+1} = 2 Y_j - Y_{j-1} + h^2 f_j(Y_j)`` runs inside each level. ``W`` is orthogonal, so the
reverse recursion (eq. 4.9)::

    Y_{j-1} = 2 Y_j - Y_{j+1} + h^2 f_j(Y_j),   then (Y_{j-1}, Y_j) <- W^T (Y_{j-1}, Y_j)

recovers every earlier state, up to rounding, from the last two.

Memory saving (``memory_saving=True``) runs the stack as a chain of
:class:`~revseg.nn.reversible.Step` objects on the pair (:meth:`LeapfrogStack.steps`) in the one
engine of :mod:`revseg.nn.reversible`, which keeps only the last pair. Backward walks the layers
from the end and, per layer, evaluates ``f_j(Y_j)`` once with grad enabled: the value
reconstructs ``Y_{j-1}`` and the local graph gives ``J^T`` products and parameter gradients
through :func:`torch.autograd.grad`. ``memory_saving=False`` is plain autograd on the same
modules, with identical outputs and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from revseg.nn.blocks import check_volume
from revseg.nn.haar import haar3d, inverse_haar3d
from revseg.nn.low_rank import SymmetricBlockLowRankConv3d
from revseg.nn.reversible import ChainState, Step, run_chain

__all__ = [
    "LeapfrogStack",
    "LeapfrogStep",
    "LevelTransformStep",
    "Rank",
    "leapfrog_update",
    "level_plan",
    "level_transform",
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


class _PairStart(Step):
    """``Y_0 -> (Y_{-1}, Y_0) = (Y_0, Y_0)``: the leapfrog pair the recursion starts from."""

    def forward(self, state: ChainState) -> ChainState:
        return [state[0], state[0]]

    def backward(self, state: ChainState, grads: ChainState) -> list[torch.Tensor | None]:
        # Y_{-1} = Y_0: both halves of the first pair are the input
        g_prev, g_cur = grads
        grads[:] = [g_prev.add_(g_cur)]
        del state[0]
        return []

    def inverse(self, state: ChainState) -> ChainState:
        return [state[1]]


class LevelTransformStep(Step):
    """The Haar transform of a level change, applied to both states of the pair."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def forward(self, state: ChainState) -> ChainState:
        return level_transform(self.kind, False, *state)

    def backward(self, state: ChainState, grads: ChainState) -> list[torch.Tensor | None]:
        # one tensor at a time, each freed once transformed (W^T = W^-1 for the gradients)
        for tensors in (state, grads):
            for i in range(len(tensors)):
                (tensors[i],) = level_transform(self.kind, True, tensors[i])
        return []

    def inverse(self, state: ChainState) -> ChainState:
        return level_transform(self.kind, True, *state)


class LeapfrogStep(Step):
    """One leapfrog layer: ``(Y_{j-1}, Y_j) -> (Y_j, Y_{j+1})`` with
    ``Y_{j+1} = 2 Y_j - Y_{j-1} + h^2 f(Y_j)``, and back (eq. 4.9)."""

    def __init__(self, layer: SymmetricBlockLowRankConv3d, h: float) -> None:
        self.module = layer
        self.h2 = h**2

    def forward(self, state: ChainState) -> ChainState:
        prev, cur = state
        return [cur, leapfrog_update(self.module(cur), cur, prev, self.h2)]

    def backward(self, state: ChainState, grads: ChainState) -> list[torch.Tensor | None]:
        # the pair (Y_j, Y_{j+1}) = (prev, cur) with gradients (g_prev, g_cur), held only here
        prev, cur = state
        g_prev, g_cur = grads
        state.clear()
        grads.clear()
        h2 = self.h2
        params = self.params()
        y = prev.detach().requires_grad_(True)
        u = self.module.unsigned(y)  # f(Y_j) = -u: sign flips are exact
        # Y_{j-1} = 2 Y_j - Y_{j+1} + h^2 f(Y_j), in place on u before its backward (no op of
        # the graph saved its output), so Y_{j+1} is freed before the gradients
        prev, cur = leapfrog_update(u.detach(), prev, cur, -h2), prev
        layer_grads = torch.autograd.grad(u, [y, *params], g_cur, allow_unused=True)
        del u, y
        # dL/dY_j = g_{j-1} + 2 g_{j+1} + h^2 J_f^T g_{j+1};  dL/dY_{j-1} = -g_{j+1}
        g_y = layer_grads[0].mul_(-h2).add_(g_cur, alpha=2).add_(g_prev)
        del g_prev  # before negating g_{j+1} in place (the engine owns the gradients)
        state[:] = [prev, cur]
        grads[:] = [g_cur.neg_(), g_y]
        return [g if g is None else g.mul_(-h2) for g in layer_grads[1:]]

    def inverse(self, state: ChainState) -> ChainState:
        prev, cur = state
        return [leapfrog_update(self.module(prev), prev, cur, self.h2), prev]


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
        memory_saving: keep only the last two states for backward (see module docstring);
            ``False`` is plain autograd on the same modules, with identical outputs and gradients.
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

    @property
    def divisor(self) -> int:
        """The factor ``D, H, W`` must be multiples of: ``2^c`` for ``c`` Haar coarsenings."""
        return 2**self.coarsenings

    def check_input(self, y: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``y`` is ``(B, channels, D, H, W)`` with sizes divisible."""
        why = f"{self.coarsenings} Haar coarsenings"
        check_volume(y, self.divisor, "LeapfrogStack", self.channels, why)

    def steps(self) -> list[Step]:
        """The engine's steps, in forward order: the start pair ``(Y_{-1}, Y_0) = (Y_0, Y_0)``,
        then per level its Haar transform (where the level changes) and its leapfrog layers."""
        steps: list[Step] = [_PairStart()]
        for kind, level in zip(self.transforms, self.levels):
            if kind is not None:
                steps.append(LevelTransformStep(kind))
            steps += [LeapfrogStep(layer, self.h) for layer in level]
        return steps

    def run(self, prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The recursion from the pair ``(Y_{-1}, Y_0)`` to the last pair ``(Y_{N-1}, Y_N)``."""
        state = [prev, cur]
        for step in self.steps()[1:]:
            state = step.forward(state)
        return state[0], state[1]

    def inverse(self, prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse recursion (eq. 4.9): ``(Y_{N-1}, Y_N) -> (Y_{-1}, Y_0)``."""
        state = [prev, cur]
        for step in reversed(self.steps()[1:]):
            state = step.inverse(state)
        return state[0], state[1]

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        """``Y_0 -> Y_N`` with ``Y_{-1} = Y_0``; with memory saving, the engine keeps only the
        last pair (:func:`~revseg.nn.reversible.run_chain`)."""
        self.check_input(y0)
        if self.memory_saving and torch.is_grad_enabled():
            return run_chain(self.steps(), y0)[1]
        return self.run(y0, y0)[1]

    def ranks(self) -> list[int]:
        """Block rank per level (the largest among the level's layers)."""
        return [max(layer.rank for layer in level) for level in self.levels]

    def level_channels(self) -> list[int]:
        return [level[0].channels for level in self.levels]
