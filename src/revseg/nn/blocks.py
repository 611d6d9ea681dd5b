"""Small 3D building blocks shared by the U-Nets (Hydra-free, explicit arguments)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

__all__ = [
    "FunctionModes",
    "LowPrecisionGroupNorm",
    "NORM_DTYPES",
    "NormActConv",
    "PointwiseConv3d",
    "check_volume",
    "checkpointed",
    "conv_in_float32",
    "sizes_as_if_scaled",
    "group_count",
    "max_pool2x",
    "per_level",
    "pointwise_conv",
]


class FunctionModes:
    """The :class:`~torch.overrides.TorchFunctionMode` objects active when it is made, to
    re-enter for a recomputation in backward (autograd runs backward without them, as it runs it
    without the forward's autocast state): the planner traces CUDA's autocast rules with one
    (:mod:`revseg.memory.autocast_rules`)."""

    def __init__(self) -> None:
        self.modes = list(_get_current_function_mode_stack())

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        active = {id(m) for m in _get_current_function_mode_stack()}
        with contextlib.ExitStack() as stack:
            for mode in self.modes:
                if id(mode) not in active:
                    stack.enter_context(mode)
            yield


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` under non-reentrant gradient checkpointing
    (:func:`torch.utils.checkpoint.checkpoint`): only ``x`` is kept, the module is recomputed in
    backward under the forward's autocast state and function modes."""

    modes = FunctionModes()
    if not modes.modes:  # the usual case (and torch.compile takes no context_fn)
        return checkpoint(module, x, use_reentrant=False)

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), modes.restored()

    return checkpoint(module, x, use_reentrant=False, context_fn=contexts)


def per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    """Blocks per level from an int (every level) or a list with one entry per level.

    Raises:
        ValueError: a wrong length or a count below 1; the message names ``name``.
    """
    depths = [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]
    if len(depths) != levels or any(d < 1 for d in depths):
        raise ValueError(
            f"{name} must be a positive int or a list of {levels} positive ints, got {value!r}"
        )
    return depths


def check_volume(
    x: torch.Tensor, divisor: int, name: str, channels: int | None = None, why: str = ""
) -> None:
    """The one input check of the models: ``x`` is ``(B, C, D, H, W)`` (``C = channels`` if
    given) with ``D, H, W`` divisible by ``divisor`` (the model's downsampling factor).

    Raises:
        ValueError: naming ``name``, the expected layout and the shape it got.
    """
    c = "C" if channels is None else str(channels)
    wrong_layout = x.ndim != 5 or (channels is not None and x.shape[1] != channels)
    if wrong_layout or any(s % divisor for s in x.shape[2:]):
        reason = f" ({why})" if why else ""
        raise ValueError(
            f"{name} expects (B, {c}, D, H, W) with D, H, W divisible by {divisor}{reason}, "
            f"got {tuple(x.shape)}"
        )


def group_count(channels: int, groups: int) -> int:
    """``groups`` when it divides ``channels`` (GroupNorm's constraint), which is also checked:
    a count reduced in silence (``gcd(30, 7) = 1``) would train another network than asked.

    Raises:
        ValueError: naming ``norm_groups``, the channels and the counts that would do.
    """
    if groups < 1 or channels % groups:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ValueError(
            f"norm_groups={groups} must divide the {channels} channels of a GroupNorm of this "
            f"network (one of {', '.join(map(str, divisors))}, for every level's channels)"
        )
    return groups


def max_pool2x(x: torch.Tensor) -> torch.Tensor:
    """``max_pool3d(x, 2)`` in ``x``'s dtype, also under autocast: taking a maximum rounds
    nothing, but CPU autocast casts a bf16 input to float32 first (and keeps the float32 copy
    for backward), while CUDA autocast pools in the input's dtype."""
    with torch.autocast(x.device.type, enabled=False):
        return nn.functional.max_pool3d(x, 2)


def pointwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``conv3d(x, weight, bias)`` for a 1x1x1 ``weight``, as a matrix product on the CPU.

    oneDNN's 1x1x1 convolution is slow on the CPU (torch 2.13, 2 threads, 60 -> 3 channels at
    96³: 110 ms forward and 388 ms with its backward, against 25 and 124 ms as one batched
    GEMM; docs/benchmarks/speed.md). A contiguous ``x`` is read as ``(B, C, voxels)``, a
    channels-last one as ``(B * voxels, C)``: no copy of ``x`` is made, it keeps what the
    convolution keeps for backward (``x`` and ``weight``), and its gradient is a tensor of its
    own, as the convolution's is (not a view: the reversible engine writes an incoming gradient
    in place only where nothing else shares its storage). Under autocast the operands are cast
    as autocast casts ``conv3d``'s (float64 is left alone). Other devices and layouts, and
    ``torch.compile``, take ``conv3d``; a second backward raises.
    """
    if (
        x.device.type != "cpu"
        or x.ndim != 5
        or weight.shape[2:] != (1, 1, 1)
        or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d))
        or torch.compiler.is_compiling()
    ):
        return F.conv3d(x, weight, bias)
    if torch.is_autocast_enabled("cpu") and x.is_floating_point() and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast("cpu", enabled=False):
        return _PointwiseConv.apply(x, weight, bias)


def _rows(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A ``(B, C, D, H, W)`` tensor as a matrix view: ``(B, C, voxels)`` (contiguous) or
    ``(B * voxels, C)`` (channels-last)."""
    if channels_last:
        return t.permute(0, 2, 3, 4, 1).reshape(-1, t.shape[1])
    return t.view(t.shape[0], t.shape[1], -1)


class _PointwiseConv(torch.autograd.Function):
    """The 1x1x1 convolution of :func:`pointwise_conv` on a matrix view of its input (a
    contiguous input, even if also channels-last, e.g. one channel, takes the ``(B, C, voxels)``
    view)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        n, c = x.shape[:2]
        w = weight.view(weight.shape[0], c)
        cl = not x.is_contiguous()
        fmt = torch.channels_last_3d if cl else torch.contiguous_format
        y = torch.empty(
            (n, w.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=fmt
        )
        if not cl:  # (out, C) @ (B, C, voxels)
            cols, batch = _rows(x, cl), w.expand(n, -1, -1)
            if bias is None:
                torch.bmm(batch, cols, out=_rows(y, cl))
            else:
                shape = (n, w.shape[0], cols.shape[-1])
                torch.baddbmm(bias.view(1, -1, 1).expand(shape), batch, cols, out=_rows(y, cl))
        elif bias is None:  # (B * voxels, C) @ (C, out)
            torch.mm(_rows(x, cl), w.t(), out=_rows(y, cl))
        else:
            torch.addmm(bias, _rows(x, cl), w.t(), out=_rows(y, cl))
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.channels_last = bias is not None, cl
        return y

    @staticmethod
    @once_differentiable  # a second backward raises instead of differentiating the out= writes
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        cl = ctx.channels_last
        w = weight.view(weight.shape[0], x.shape[1])
        fmt = torch.channels_last_3d if cl else torch.contiguous_format
        g = _rows(grad.contiguous(memory_format=fmt), cl)
        grad_x = grad_w = grad_b = None
        # sums over the batch and the voxels accumulate in float32 at least, as conv3d's do
        acc = torch.promote_types(weight.dtype, torch.float32)
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x, memory_format=fmt)
            if cl:
                torch.mm(g, w, out=_rows(grad_x, cl))
            else:
                torch.matmul(w.t(), g, out=_rows(grad_x, cl))
        if ctx.needs_input_grad[1]:
            if cl:
                grad_w = g.t() @ _rows(x, cl)
            else:
                grad_w = torch.bmm(g, _rows(x, cl).transpose(1, 2)).sum(0, dtype=acc)
            grad_w = grad_w.to(weight.dtype).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0 if cl else (0, 2), dtype=acc).to(weight.dtype)
        return grad_x, grad_w, grad_b


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 :class:`torch.nn.Conv3d` (its parameters and ``state_dict``) computed by
    :func:`pointwise_conv`: the same results to float rounding, faster on the CPU."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight, self.bias)


NORM_DTYPES = ("float32", "autocast")


_SIZE_SCALE: contextvars.ContextVar[tuple[float, ...] | None] = contextvars.ContextVar(
    "revseg_size_scale", default=None
)


@contextlib.contextmanager
def sizes_as_if_scaled(factors: Sequence[float]) -> Iterator[None]:
    """Take the size-dependent choices (:func:`conv_in_float32`) as for inputs ``factors`` times
    as large along ``(D, H, W)``: the memory planner traces tiny inputs and extrapolates to the
    planned size, so the traced ops must be those of the planned size."""
    token = _SIZE_SCALE.set(tuple(float(f) for f in factors))
    try:
        yield
    finally:
        _SIZE_SCALE.reset(token)


def conv_in_float32(x: torch.Tensor) -> bool:
    """``True`` where a 3D convolution of ``x`` runs in float32 although autocast asks for bf16.

    torch's CPU bf16 ``conv3d`` weight gradient is wrong for inputs with a spatial size of 2 (a
    5-level U-Net's bottom level at 32³): measured with torch 2.13 on x86, a 3x3x3 convolution of
    64 or 240 channels on a 2x2x2 input has a weight-gradient error of 1.0 (other sizes, 1x1x1
    kernels, fp16 and CUDA are not affected; docs/precision.md). Convolutions of such tiny
    inputs are a negligible share of the work, so revseg runs them in float32 there.
    """
    if not (
        x.device.type == "cpu"
        and x.ndim == 5
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    ):
        return False
    factors = _SIZE_SCALE.get() or (1.0, 1.0, 1.0)
    return min(round(s * f) for s, f in zip(x.shape[2:], factors)) <= 2


class LowPrecisionGroupNorm(nn.GroupNorm):
    """GroupNorm that runs in the autocast dtype under autocast (as timm's ``fast_norm``).

    CUDA's autocast runs ``group_norm`` in float32: a bf16/fp16 input is cast up and the float32
    copy is what the norm keeps for backward, so a GroupNorm net keeps float32 activations around
    every normalisation. This module casts its parameters down instead and runs the norm with
    autocast off, in the low precision; the kernels accumulate the group statistics in float32.
    Outside autocast it is :class:`torch.nn.GroupNorm` (same parameters and ``state_dict``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(kind)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(kind, enabled=False):
            return nn.functional.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps)


class NormActConv(nn.Module):
    """Pre-activation unit ``GroupNorm -> LeakyReLU -> Conv3d`` on ``(B, C_in, D, H, W)``.

    This is F (and G) of the partially reversible U-Net (Brügger et al. 2019) and half of a block
    of its non-reversible baseline.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        norm_groups: GroupNorm groups (must divide ``in_channels``).
        kernel_size: convolution kernel size (``padding = kernel_size // 2``).
        negative_slope: LeakyReLU slope.
        norm: ``False`` skips GroupNorm and LeakyReLU (a plain convolution), used on raw inputs.
        norm_dtype: ``"float32"`` (:class:`torch.nn.GroupNorm`: float32 under CUDA autocast) or
            ``"autocast"`` (:class:`LowPrecisionGroupNorm`: the autocast dtype).

    Raises:
        ValueError: for a ``norm_dtype`` not in :data:`NORM_DTYPES`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_groups: int = 30,
        kernel_size: int = 3,
        negative_slope: float = 0.01,
        norm: bool = True,
        norm_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if norm_dtype not in NORM_DTYPES:
            raise ValueError(
                f"norm_dtype must be one of {', '.join(NORM_DTYPES)}, got {norm_dtype!r}"
            )
        group_norm = LowPrecisionGroupNorm if norm_dtype == "autocast" else nn.GroupNorm
        self.norm = group_norm(group_count(in_channels, norm_groups), in_channels) if norm else None
        self.act = nn.LeakyReLU(negative_slope, inplace=True) if norm else None
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            # in place on the norm's output: GroupNorm's backward needs its input, not its output
            x = self.act(self.norm(x))
        if conv_in_float32(x):
            with torch.autocast(x.device.type, enabled=False):
                return self.conv(x.float())
        return self.conv(x)
