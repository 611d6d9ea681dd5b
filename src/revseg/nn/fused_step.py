"""The half step of an additive coupling at its memory floor, for GroupNorm -> LeakyReLU -> Conv.

A memory-saving coupling backward (:mod:`revseg.nn.reversible`) does, for each half
``total = rebuilt + fn(inp)`` of a block:

* reconstruct ``rebuilt = total - fn(inp)``, in place in ``total``'s storage;
* add ``J_fn(inp)^T upstream`` to the gradient that passes through, in place;
* return the gradients of ``fn``'s parameters.

Through autograd that costs ``fn``'s output, every activation autograd saves (norm output,
activation output), and as many gradient temporaries: about six half-states for a
GN -> LReLU -> Conv unit. :func:`half_step` does the same step with the ops autograd would run
(``native_group_norm``, ``leaky_relu_``, ``conv3d``, ``convolution_backward``,
``leaky_relu_backward``, ``native_group_norm_backward``), each tensor dropped after its last use
and the activation backward written over its own input, so at most two half-states are alive at
once. With ``chunks > 1`` it goes slab by slab along the first spatial axis (``D``): the group
statistics are taken over the whole volume first, each slab's norm -> activation -> convolution is
computed with the convolution's halo, the input gradient of the convolution comes from the
upstream gradient with its halo (a transposed convolution), and the norm backward, linear in its
incoming gradient, is accumulated per slab plus one whole-volume term from the statistics. The
workspace is then a few slabs, a fraction of a half-state. :func:`add_forward` computes the
forward with the same slabs, so the recomputation reproduces the forward exactly and the
reconstruction is as exact as without chunks.

Mixed precision: the convolution runs in the autocast dtype as under autograd (its input, weight
and incoming gradient cast, its gradients cast back); the norm, the activation and the states
stay in the states' dtype (float32). Low-precision states (``state_dtype="autocast"`` of the
sequences) always take the slab formulation (one slab when ``chunks`` is 1): the group statistics
and the norm backward's sums in float32, the normalised activation computed in float32 slab by
slab and handed to the convolution in the autocast dtype, so the forward and its recomputation
run the same ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from revseg.nn.blocks import NormActConv, conv_in_float32

__all__ = [
    "SLAB_BYTES",
    "add_forward",
    "auto_chunks_as_if_scaled",
    "can_fuse",
    "half_step",
    "resolve_chunks",
    "slabs",
]

# ``chunks="auto"``: the number of slabs that keeps one slab of a half-state at or below this
SLAB_BYTES = 64 * 2**20
# the group statistics' workspace: pieces that stay in the CPU's cache
_PIECE_BYTES = 4 * 2**20
_MIN_PIECES = 16

_AUTO_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar(
    "revseg_auto_chunks_scale", default=1.0
)


@contextlib.contextmanager
def auto_chunks_as_if_scaled(scale: float) -> Iterator[None]:
    """Resolve ``chunks="auto"`` as for inputs ``scale`` times as large (in voxels).

    The memory planner traces tiny inputs and extrapolates to the planned size; under this, each
    sequence takes the number of slabs it would take at the planned size.
    """
    token = _AUTO_SCALE.set(float(scale))
    try:
        yield
    finally:
        _AUTO_SCALE.reset(token)


def can_fuse(fn: nn.Module) -> bool:
    """``True`` for a :class:`~revseg.nn.blocks.NormActConv` with GroupNorm (affine), LeakyReLU
    and a plain 3D convolution (stride 1, dilation 1, one group, 'same' padding, no bias)."""
    if type(fn) is not NormActConv or type(fn.norm) is not nn.GroupNorm:
        return False
    conv = fn.conv
    k = conv.kernel_size
    return (
        fn.norm.affine
        and isinstance(fn.act, nn.LeakyReLU)
        and conv.bias is None
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and all(s == 1 for s in conv.stride)
        and all(d == 1 for d in conv.dilation)
        and all(kk % 2 == 1 for kk in k)
        and tuple(conv.padding) == tuple(kk // 2 for kk in k)
    )


def resolve_chunks(chunks: int | str | None, inp: torch.Tensor) -> int:
    """The number of slabs for a half-state ``inp`` of shape ``(B, C, D, H, W)``.

    ``None`` or ``1``: no slabs. ``"auto"``: the fewest slabs of at most :data:`SLAB_BYTES`
    each, counted in float32 (the dtype of a slab's norm and activation), and half that for
    bf16/fp16 states (see :func:`auto_chunks_as_if_scaled`). An int: that many, at most ``D``.

    Raises:
        ValueError: for anything else, naming the value.
    """
    if chunks is None:
        return 1
    if chunks == "auto":
        # a slab's norm and activation are computed in float32 whatever the states' dtype; with
        # low-precision states the budget shrinks with them, so that the float32 work stays the
        # same share of the states' bytes
        budget = SLAB_BYTES * min(inp.element_size(), 4) / 4
        n = math.ceil(inp.numel() * _AUTO_SCALE.get() * 4 / budget)
    elif isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 1:
        n = chunks
    else:
        raise ValueError(f"chunks must be 'auto' or a positive int, got {chunks!r}")
    return max(1, min(n, inp.shape[2]))


def slabs(depth: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous ``[start, stop)`` ranges covering ``range(depth)``, sizes within 1."""
    bounds = [round(i * depth / chunks) for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# --------------------------------------------------------------------------------------------
# shared pieces


def _gn_args(fn: NormActConv, inp: torch.Tensor) -> tuple[int, int, int, int]:
    n, c = inp.shape[:2]
    return n, c, inp[0, 0].numel(), fn.norm.num_groups


def _low_precision(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _statistics(fn: NormActConv, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``mean`` and ``rstd`` of ``inp``, shape ``(B, groups)``, over the whole volume,
    in float32 (or ``inp``'s dtype if wider) whatever ``inp``'s dtype.

    Two passes, both vectorised: the mean by one sum, then the variance as the sum of the
    squared deviations from it, piece by piece (pieces of at most :data:`_PIECE_BYTES` in
    float32, as many as at the planned size under :func:`auto_chunks_as_if_scaled`, and at least
    :data:`_MIN_PIECES`: a piece is a small fraction of a slab), so that no
    float32 copy of the half-state is made. ``torch.var_mean`` (a Welford pass) reads the same
    bytes about ten times slower on the CPU; the two-pass variance is as accurate (no
    cancellation: the deviations are taken from the mean).
    """
    n, _, _, groups = _gn_args(fn, inp)
    x = inp.reshape(n, groups, -1)
    count = x.shape[-1]
    acc = torch.promote_types(inp.dtype, torch.float32)
    mean = torch.sum(x, dim=-1, dtype=acc) / count
    pieces = max(_MIN_PIECES, math.ceil(inp.numel() * _AUTO_SCALE.get() * 4 / _PIECE_BYTES))
    piece = max(1, math.ceil(count / pieces))
    centre = mean[..., None]
    var = sum((part.to(acc) - centre).square_().sum(-1) for part in x.split(piece, dim=-1)) / count
    return mean, (var + fn.norm.eps).rsqrt()


def _dot(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(g * x).sum((2, 3, 4))`` in ``g``'s dtype (float32 at least), without the product's
    temporary where ``x`` has ``g``'s dtype and the batch is one (for several, ``einsum``
    copies the channel half's slab, as large as the product); autocast off (autocast would run
    ``einsum``'s product in bf16/fp16)."""
    if x.dtype != g.dtype:
        return (g * x).sum(dim=(2, 3, 4), dtype=g.dtype)
    with torch.autocast(g.device.type, enabled=False):
        return torch.einsum("ncdhw,ncdhw->nc", g, x)


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """``(B, groups)`` -> ``(B, C, 1, 1, 1)``, each group's value repeated over its channels."""
    n, groups = t.shape
    return t.repeat_interleave(channels // groups, dim=1).view(n, channels, 1, 1, 1)


def _affine(fn: NormActConv, mean: torch.Tensor, rstd: torch.Tensor, channels: int):
    """``scale, shift`` of shape ``(B, C, 1, 1, 1)`` with ``norm(x) = x * scale + shift``."""
    gamma = fn.norm.weight.view(1, -1, 1, 1, 1)
    scale = _per_channel(rstd, channels) * gamma
    shift = fn.norm.bias.view(1, -1, 1, 1, 1) - _per_channel(mean, channels) * scale
    return scale, shift


def _halo(fn: NormActConv) -> int:
    return fn.conv.kernel_size[0] // 2


def _halo_rows(t: torch.Tensor, start: int, stop: int, halo: int, dtype: torch.dtype):
    """``(buffer, interior, source)`` for ``t[:, :, start - halo : stop + halo]``: a new
    contiguous ``buffer`` of that many rows (``dtype``) whose rows outside ``D`` are zero,
    ``interior`` its rows inside ``D``, to be filled from ``source``, ``t``'s rows there."""
    lo, hi = max(start - halo, 0), min(stop + halo, t.shape[2])
    rows = stop - start + 2 * halo
    buffer = t.new_empty((*t.shape[:2], rows, *t.shape[3:]), dtype=dtype)
    first, last = lo - (start - halo), hi - (start - halo)
    buffer[:, :, :first].zero_()
    buffer[:, :, last:].zero_()
    return buffer, buffer[:, :, first:last], t[:, :, lo:hi]


def _activation(
    fn: NormActConv, inp: torch.Tensor, scale, shift, start: int, stop: int
) -> torch.Tensor:
    """Norm -> activation of ``inp[:, :, start - halo : stop + halo]``, zero outside ``D``
    (float32, or ``scale``'s dtype: the states' if wider)."""
    buffer, interior, source = _halo_rows(inp, start, stop, _halo(fn), scale.dtype)
    torch.addcmul(shift, source, scale, out=interior)
    return F.leaky_relu_(buffer, fn.act.negative_slope)  # zero rows stay zero


def _upstream_rows(upstream: torch.Tensor, start: int, stop: int, halo: int, dtype):
    """``upstream[:, :, start - halo : stop + halo]`` in ``dtype``, zero outside ``D``."""
    buffer, interior, source = _halo_rows(upstream, start, stop, halo, dtype)
    interior.copy_(source)
    return buffer


def _slab_padding(fn: NormActConv) -> tuple[int, int, int]:
    return (0, *fn.conv.padding[1:])


def _conv(fn: NormActConv, a: torch.Tensor, padding) -> torch.Tensor:
    """The unit's convolution of ``a`` in the dtype :func:`_compute_dtype` gives (input and
    weight cast as autocast casts them)."""
    dtype = _compute_dtype(a)
    with torch.autocast(a.device.type, enabled=False):
        return F.conv3d(a.to(dtype), fn.conv.weight.to(dtype), None, 1, padding)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the convolution runs in: autocast's, else ``t``'s (float32 where
    :func:`~revseg.nn.blocks.conv_in_float32` avoids a torch defect)."""
    if conv_in_float32(t):
        return torch.promote_types(t.dtype, torch.float32)
    if torch.is_autocast_enabled(t.device.type) and t.is_floating_point():
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


# --------------------------------------------------------------------------------------------
# forward


@torch.no_grad()
def add_forward(fn: NormActConv, inp: torch.Tensor, out: torch.Tensor, chunks: int) -> None:
    """``out += fn(inp)`` in place, slab by slab when ``chunks > 1`` (same slabs as
    :func:`half_step`, so that its recomputation reproduces these values)."""
    if chunks <= 1 and not _low_precision(inp):
        out.add_(fn(inp))
        return
    scale, shift = _affine(fn, *_statistics(fn, inp), inp.shape[1])
    padding = _slab_padding(fn)
    for start, stop in slabs(inp.shape[2], chunks):
        out[:, :, start:stop].add_(
            _conv(fn, _activation(fn, inp, scale, shift, start, stop), padding)
        )


# --------------------------------------------------------------------------------------------
# backward


def _wanted(fn: NormActConv) -> tuple[bool, bool, bool]:
    return (fn.norm.weight.requires_grad, fn.norm.bias.requires_grad, fn.conv.weight.requires_grad)


def _grads(fn: NormActConv, dgamma, dbeta, dweight) -> list[torch.Tensor | None]:
    """The gradients in ``[p for p in fn.parameters() if p.requires_grad]`` order."""
    wanted = _wanted(fn)
    return [g for g, w in zip((dgamma, dbeta, dweight), wanted) if w]


@torch.no_grad()
def half_step(
    fn: NormActConv,
    inp: torch.Tensor,
    upstream: torch.Tensor,
    target: torch.Tensor | None,
    grad_acc: torch.Tensor,
    chunks: int = 1,
) -> list[torch.Tensor | None]:
    """``target -= fn(inp)`` and ``grad_acc += J_fn(inp)^T upstream``, both in place.

    Args:
        fn: a unit for which :func:`can_fuse` holds.
        inp: its input ``(B, C, D, H, W)``; not modified.
        upstream: ``dL/d fn(inp)``, the shape of ``fn(inp)``; not modified.
        target: the state ``fn(inp)`` was added to, rebuilt in place; ``None`` when known.
        grad_acc: the gradient of ``inp`` accumulated so far, added to in place.
        chunks: slabs along ``D`` (1: the whole volume at once, as the forward ran it).

    Returns:
        the gradients of ``fn``'s trainable parameters in ``fn.parameters()`` order.
    """
    if chunks <= 1 and not _low_precision(inp):
        with record_function("fused half step: whole volume"):
            return _whole_step(fn, inp, upstream, target, grad_acc)
    with record_function("fused half step: slabs"):
        return _slab_step(fn, inp, upstream, target, grad_acc, max(chunks, 1))


def _whole_step(fn, inp, upstream, target, grad_acc) -> list[torch.Tensor | None]:
    """The unchunked step: the forward's own ops, at most two half-states alive at once."""
    weight = fn.conv.weight
    n, c, hxw, groups = _gn_args(fn, inp)
    inp = inp.contiguous()  # as at::group_norm does: a copy only for a channel half of B > 1
    a, mean, rstd = torch.native_group_norm(
        inp, fn.norm.weight, fn.norm.bias, n, c, hxw, groups, fn.norm.eps
    )
    F.leaky_relu_(a, fn.act.negative_slope)  # `a` is also the activation's result for its backward
    dtype = _compute_dtype(inp)
    a_c = a.to(dtype)  # `a` itself unless autocast casts it
    if target is not None:
        target.sub_(_conv(fn, a_c, fn.conv.padding))
    wanted_w = fn.conv.weight.requires_grad
    da, dweight, _ = torch.ops.aten.convolution_backward(
        upstream.to(dtype),
        a_c,
        weight.to(dtype),
        None,
        fn.conv.stride,
        fn.conv.padding,
        fn.conv.dilation,
        False,
        [0, 0, 0],
        1,
        [True, wanted_w, False],
    )
    del a_c
    # cuDNN gives the input gradient in the weight's memory format (channels-last under
    # trainer.channels_last); native_group_norm_backward reads it in the input's format (autograd
    # makes it contiguous first, in GroupNorm's derivatives.yaml entry), so do the same
    da = da.to(dtype=a.dtype, memory_format=torch.contiguous_format)
    torch.ops.aten.leaky_relu_backward.grad_input(da, a, fn.act.negative_slope, True, grad_input=da)
    del a
    dx, dgamma, dbeta = torch.ops.aten.native_group_norm_backward(
        da, inp, mean, rstd, fn.norm.weight, n, c, hxw, groups, [True, *_wanted(fn)[:2]]
    )
    del da
    grad_acc.add_(dx)
    del dx
    if dweight is not None:
        dweight = dweight.to(weight.dtype)
    return _grads(fn, dgamma, dbeta, dweight)


def _slab_step(fn, inp, upstream, target, grad_acc, chunks) -> list[torch.Tensor | None]:
    """The chunked step: per slab the activation with its halo, the reconstruction, the weight
    gradient, the input gradient (transposed convolution of the upstream gradient with its halo)
    and the slab's part of the norm backward; then the norm backward's whole-volume term."""
    weight = fn.conv.weight
    channels, depth = inp.shape[1], inp.shape[2]
    halo = _halo(fn)
    mean, rstd = _statistics(fn, inp)
    scale, shift = _affine(fn, mean, rstd, channels)
    dtype = _compute_dtype(inp)
    weight_c = weight.to(dtype)
    padding = _slab_padding(fn)
    transposed_padding = (2 * halo, *fn.conv.padding[1:])
    wanted_w = weight.requires_grad
    dweight = torch.zeros_like(weight) if wanted_w else None
    # per (sample, channel): sums of dL/d norm(inp) and of dL/d norm(inp) * inp, in float32 at
    # least (also for low-precision states)
    acc = torch.promote_types(inp.dtype, torch.float32)
    sum_g = inp.new_zeros(inp.shape[:2], dtype=acc)
    sum_gx = inp.new_zeros(inp.shape[:2], dtype=acc)
    for start, stop in slabs(depth, chunks):
        a = _activation(fn, inp, scale, shift, start, stop)  # [start - halo, stop + halo)
        a_c = a.to(dtype)
        if target is not None:
            target[:, :, start:stop].sub_(_conv(fn, a_c, padding))
        up = upstream[:, :, start:stop].to(dtype)
        if wanted_w:
            _, dw, _ = torch.ops.aten.convolution_backward(
                up, a_c, weight_c, None, [1, 1, 1], padding, [1, 1, 1], False, [0, 0, 0], 1,
                [False, True, False],
            )  # fmt: skip
            dweight.add_(dw)
            del dw
        del a_c, up
        up = _upstream_rows(upstream, start, stop, halo, dtype)
        g = F.conv_transpose3d(up, weight_c, None, 1, transposed_padding).to(a.dtype)
        del up
        torch.ops.aten.leaky_relu_backward.grad_input(
            g, a[:, :, halo : halo + stop - start], fn.act.negative_slope, True, grad_input=g
        )
        del a
        x = inp[:, :, start:stop]
        sum_g += g.sum(dim=(2, 3, 4), dtype=acc)
        sum_gx += _dot(g, x)
        grad_acc[:, :, start:stop].addcmul_(g, scale)  # the norm backward's per-element term
        del g
    # GroupNorm backward, dx = rstd * gamma * g + a * x + b per group:
    # a = -rstd^3 * mean_g(gamma * g * (x - mu)), b = -a * mu - rstd * mean_g(gamma * g)
    n, groups = mean.shape
    per_group = channels // groups
    count = per_group * inp[0, 0].numel()
    gamma = fn.norm.weight.view(1, -1)
    m1 = (gamma * sum_g).view(n, groups, per_group).sum(-1) / count
    centred = sum_gx - _per_channel(mean, channels).view(n, -1) * sum_g  # sum of g * (x - mu)
    m2 = (gamma * centred).view(n, groups, per_group).sum(-1) / count
    a_coef = -(rstd**3) * m2
    b_coef = -a_coef * mean - rstd * m1
    grad_acc.addcmul_(inp, _per_channel(a_coef, channels))
    grad_acc.add_(_per_channel(b_coef, channels))
    dgamma = (centred * _per_channel(rstd, channels).view(n, -1)).sum(0)
    dbeta = sum_g.sum(0)
    return _grads(fn, dgamma, dbeta, dweight)
