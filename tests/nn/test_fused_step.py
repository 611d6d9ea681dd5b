"""The fused GN -> LReLU -> Conv half step: exact against autograd, slabs equal to the whole
volume, in place, and at most two half-states of workspace (a fraction of one with slabs)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import rel_err
from revseg.memory import PeakMemoryMeter
from revseg.models.prev_unet import reversible_level
from revseg.nn import fused_step
from revseg.nn.blocks import NormActConv


def unit(channels: int = 6, groups: int = 3, dtype=torch.float64) -> NormActConv:
    torch.manual_seed(0)
    fn = NormActConv(channels, channels, groups, negative_slope=0.1).to(dtype)
    with torch.no_grad():  # a non-trivial affine, so that its gradients are tested
        fn.norm.weight.uniform_(0.5, 1.5)
        fn.norm.bias.uniform_(-0.5, 0.5)
    return fn


def reference(fn: nn.Module, inp, upstream, total, grad):
    """What the step must compute, by plain autograd: ``total - fn(inp)``, ``grad + J^T up``."""
    leaf = inp.detach().requires_grad_(True)
    params = [p for p in fn.parameters() if p.requires_grad]
    out = fn(leaf)
    grads = torch.autograd.grad(out, [leaf, *params], upstream)
    return total - out.detach(), grad + grads[0], list(grads[1:])


@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
@pytest.mark.parametrize("batch", [1, 2])
def test_half_step_equals_autograd_in_float64(chunks, batch):
    fn = unit()
    torch.manual_seed(1)
    # a channel half of a larger state, as inside a coupling (not contiguous for batch 2)
    state = torch.randn(batch, 12, 7, 5, 6, dtype=torch.float64)
    inp = state[:, 6:]
    upstream, total, grad = (torch.randn(batch, 6, 7, 5, 6, dtype=torch.float64) for _ in range(3))
    want_total, want_grad, want_params = reference(fn, inp, upstream, total, grad)
    total_c, grad_c = total.clone(), grad.clone()
    params = fused_step.half_step(fn, inp, upstream, total_c, grad_c, chunks)
    assert rel_err(total_c, want_total) < 1e-13
    assert rel_err(grad_c, want_grad) < 1e-13
    assert len(params) == 3
    assert max(rel_err(a, b) for a, b in zip(params, want_params)) < 1e-13
    assert torch.equal(inp, state[:, 6:]) and torch.equal(upstream, upstream)  # inputs untouched


class CudnnChannelsLast(TorchDispatchMode):
    """cuDNN's convolution backward under ``trainer.channels_last``, on the CPU: the input
    gradient comes back channels-last; records the layout GroupNorm's backward receives."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_backward_contiguous: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution_backward.default and out[0] is not None:
            out = (out[0].contiguous(memory_format=torch.channels_last_3d), *out[1:])
        if func is torch.ops.aten.native_group_norm_backward.default:
            self.norm_backward_contiguous.append(args[0].is_contiguous())
        return out


@pytest.mark.parametrize("chunks", [1, 2])
def test_half_step_with_a_channels_last_input_gradient_from_the_convolution(chunks):
    """GroupNorm's backward reads its incoming gradient in the input's (contiguous) layout, as
    autograd hands it over; a channels-last gradient read as contiguous gave dx, dgamma, dbeta
    relative errors of 0.4-1.6 (issue 19, item 1)."""
    fn = unit()
    inp, upstream, total, grad = (torch.randn(1, 6, 5, 4, 6, dtype=torch.float64) for _ in range(4))
    want_total, want_grad, want_params = reference(fn, inp, upstream, total, grad)
    total_c, grad_c = total.clone(), grad.clone()
    with CudnnChannelsLast() as mode:
        params = fused_step.half_step(fn, inp, upstream, total_c, grad_c, chunks)
    assert all(mode.norm_backward_contiguous)
    assert rel_err(total_c, want_total) < 1e-13
    assert rel_err(grad_c, want_grad) < 1e-13
    assert max(rel_err(a, b) for a, b in zip(params, want_params)) < 1e-13


def test_half_step_with_frozen_parameters_and_a_known_half():
    fn = unit()
    fn.norm.bias.requires_grad_(False)
    fn.conv.weight.requires_grad_(False)
    inp, upstream, grad = (torch.randn(1, 6, 6, 4, 4, dtype=torch.float64) for _ in range(3))
    for chunks in (1, 3):
        _, want_grad, want_params = reference(fn, inp, upstream, inp, grad)
        grad_c = grad.clone()
        params = fused_step.half_step(fn, inp, upstream, None, grad_c, chunks)
        assert len(params) == 1  # only the norm's weight trains
        assert rel_err(params[0], want_params[0]) < 1e-13
        assert rel_err(grad_c, want_grad) < 1e-13


def test_chunked_forward_equals_the_module_to_rounding():
    fn = unit(dtype=torch.float32)
    x = torch.randn(2, 6, 9, 8, 8)
    want = fn(x)
    for chunks in (2, 4, 9):
        out = torch.zeros_like(want)
        fused_step.add_forward(fn, x, out, chunks)
        assert rel_err(out, want) < 1e-6


def test_only_gn_lrelu_conv_units_fuse():
    assert fused_step.can_fuse(NormActConv(4, 4, 2))
    assert not fused_step.can_fuse(NormActConv(4, 4, 2, norm=False))  # a bare convolution
    strided = NormActConv(4, 4, 2)
    strided.conv.stride = (2, 2, 2)
    assert not fused_step.can_fuse(strided)
    assert not fused_step.can_fuse(nn.Conv3d(4, 4, 3, padding=1))


def test_chunks_resolve_and_bad_values_raise():
    half = torch.empty(1, 30, 160, 192, 160)  # prev_unet's top level at the full field of view
    assert fused_step.resolve_chunks(None, half) == 1
    assert fused_step.resolve_chunks(4, half) == 4
    assert fused_step.resolve_chunks(500, half) == 160  # at most one slice per slab
    assert fused_step.resolve_chunks("auto", half) == 9  # 562.5 MiB in slabs of <= 64 MiB
    assert fused_step.resolve_chunks("auto", half[:, :, :16, :64, :64]) == 1
    with fused_step.auto_chunks_as_if_scaled(75.0):  # the planner's tiny traces (x75 voxels)
        assert fused_step.resolve_chunks("auto", half[:, :, :16, :64, :64]) == 9
    for bad in (0, -2, "4", 2.5, True):
        with pytest.raises(ValueError, match="chunks"):
            fused_step.resolve_chunks(bad, half)
    with pytest.raises(ValueError, match="chunks"):
        reversible_level(8, 1, 2, 0.01, True, chunks="many")


def test_slabs_cover_the_axis_in_near_equal_parts():
    for depth, chunks in ((10, 3), (7, 7), (160, 9), (5, 2)):
        parts = fused_step.slabs(depth, chunks)
        assert parts[0][0] == 0 and parts[-1][1] == depth and len(parts) == chunks
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        sizes = [b - a for a, b in parts]
        assert max(sizes) - min(sizes) <= 1


def workspace(fn: NormActConv, chunks: int, size: int = 24) -> float:
    """Peak bytes of one in-place half step above its operands, in half-states."""
    inp, upstream, total, grad = (torch.randn(1, 30, size, size, size) for _ in range(4))
    params = list(fn.parameters())
    with PeakMemoryMeter("cpu").measure(static=[params, inp, upstream, total, grad]) as m:
        grads = fused_step.half_step(fn, inp, upstream, total, grad, chunks)
        del grads
    return (m.peak_bytes - m.baseline_bytes) / inp.nbytes


def test_workspace_is_two_half_states_and_a_fraction_with_slabs():
    """Autograd's step holds fn's output, the norm's output and the gradients: about 6
    half-states. Measured at 24^3, C = 30 (the weight gradient is 0.06): 2.06 whole, 1.81 in 2
    slabs, 1.06 in 4 (slabs of 6 slices, 8 with the halo), 0.68 in 8."""
    fn = unit(30, 30, torch.float32)
    assert workspace(fn, 1) <= 2.1
    assert workspace(fn, 4) <= 1.1
    assert workspace(fn, 8) <= 0.7


def test_autocast_step_matches_autograd_under_autocast():
    """bf16 autocast on the CPU: the convolution runs in bf16 as under autograd, the norm and
    the states in float32; the fused step then equals autograd's step to bf16 rounding."""
    fn = unit(8, 4, torch.float32)
    inp, upstream, total, grad = (torch.randn(1, 8, 8, 8, 8) for _ in range(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_total, want_grad, want_params = reference(fn, inp, upstream, total, grad)
        for chunks in (1, 2):
            total_c, grad_c = total.clone(), grad.clone()
            params = fused_step.half_step(fn, inp, upstream, total_c, grad_c, chunks)
            assert total_c.dtype == grad_c.dtype == torch.float32
            assert rel_err(total_c, want_total) < 1e-2
            assert rel_err(grad_c, want_grad) < 2e-2
            assert all(p.dtype == torch.float32 for p in params)
            assert max(rel_err(a, b) for a, b in zip(params, want_params)) < 3e-2


@pytest.mark.parametrize("chunks", [None, 3, "auto"])
def test_sequence_gradients_equal_plain_autograd(chunks):
    torch.manual_seed(0)
    seq = reversible_level(8, 3, 2, 0.01, True, chunks=chunks).double()
    plain = copy.deepcopy(seq)
    plain.memory_saving = False
    x = torch.randn(2, 8, 6, 5, 4, dtype=torch.float64)
    out = []
    for s in (seq, plain):
        xi = x.clone().requires_grad_(True)
        y = s(xi)
        (y.pow(2).sum() + y.sin().sum()).backward()
        out.append((y.detach(), xi.grad, [p.grad for p in s.parameters()]))
    assert rel_err(out[0][0], out[1][0]) < 1e-14
    assert rel_err(out[0][1], out[1][1]) < 1e-12
    assert max(rel_err(a, b) for a, b in zip(out[0][2], out[1][2])) < 1e-12


def test_sequence_leaves_a_gradient_held_elsewhere_untouched():
    """The backward accumulates in place only into a gradient nothing else refers to."""
    seq = reversible_level(8, 2, 2, 0.01, True)
    x = torch.randn(1, 8, 4, 4, 4, requires_grad=True)
    y = seq(x)
    g = torch.randn_like(y)
    kept = g.clone()
    y.backward(g)
    assert torch.equal(g, kept)
    y = seq(x)
    y.sum().backward()  # an expanded (stride 0) gradient: copied, never written
    assert torch.isfinite(x.grad).all()


def test_second_backward_is_right_or_fails_loudly():
    """An output held elsewhere (here by ``pow``) is copied before the inputs are rebuilt, so a
    second backward through the graph gives the same gradients; an output nobody else holds is
    rebuilt in place, and a second backward raises instead of reading overwritten values."""
    seq = reversible_level(8, 1, 2, 0.01, True)
    x = torch.randn(1, 8, 4, 4, 4, requires_grad=True)
    loss = seq(x).pow(2).sum()
    loss.backward(retain_graph=True)
    first, x.grad = x.grad.clone(), None
    loss.backward()
    assert torch.allclose(x.grad, first, rtol=1e-6, atol=0)
    loss = seq(x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("chunks", [None, 3])
def test_channels_last_keeps_the_memory_floor_and_exact_gradients(chunks):
    """Under ``trainer.channels_last`` the input and the incoming gradient are channels-last: the
    gradient is still written in place (copying it cost one state more: 4.0 instead of 3.0
    states here; issue 19, item 9), and the gradients are those of plain autograd."""
    torch.manual_seed(0)
    seq = reversible_level(16, 2, 4, 0.01, True, chunks=chunks)
    x = torch.randn(1, 16, 16, 16, 16)
    params = list(seq.parameters())
    peaks, grads = {}, {}
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        xi = x.clone(memory_format=layout).requires_grad_(True)
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        w = w.contiguous(memory_format=layout)  # its gradient takes w's layout
        for p in params:
            p.grad = torch.zeros_like(p)
        with PeakMemoryMeter("cpu").measure(static=[params, [p.grad for p in params], xi, w]) as m:
            (seq(xi) * w).sum().backward()
        peaks[layout] = (m.peak_bytes - m.baseline_bytes - sum(p.nbytes for p in params)) / x.nbytes
        grads[layout] = [xi.grad, *(p.grad.clone() for p in params)]
    assert peaks[torch.channels_last_3d] <= peaks[torch.contiguous_format] + 0.01
    plain = copy.deepcopy(seq)
    plain.memory_saving = False
    xi = x.clone(memory_format=torch.channels_last_3d).requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (plain(xi) * w.contiguous(memory_format=torch.channels_last_3d)).sum().backward()
    want = [xi.grad, *(p.grad for p in plain.parameters())]
    assert max(rel_err(a, b) for a, b in zip(grads[torch.channels_last_3d], want)) < 1e-4
