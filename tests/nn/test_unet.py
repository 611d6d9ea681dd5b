"""The shared U-Net skeleton (revseg.nn.unet): wiring, factory order, checks, resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revseg.nn.blocks import NormActConv, PointwiseConv3d
from revseg.nn.reversible import AdditiveCoupling, ReversibleSequence
from revseg.nn.unet import (
    ConvTrilinearUp3d,
    MaxPoolConv3d,
    ReversibleUNet,
    level_sequence,
    upsample2x,
)

CHANNELS = [4, 8, 12]


def coupling_level(channels: int, depth: int) -> ReversibleSequence:
    half = channels // 2
    return level_sequence(
        lambda: AdditiveCoupling(NormActConv(half, half, 2), NormActConv(half, half, 2)),
        depth,
        ReversibleSequence,
        memory_saving=True,
        preserve_rng_state=False,
    )


def tiny_unet() -> ReversibleUNet:
    torch.manual_seed(0)
    return ReversibleUNet(
        2,
        3,
        CHANNELS,
        encoder_depth=[1, 2, 1],
        decoder_depth=1,
        level=coupling_level,
        down=lambda i, fine, coarse: MaxPoolConv3d(fine, coarse),
        up=lambda i, coarse, fine: ConvTrilinearUp3d(coarse, fine),
    )


def test_forward_is_the_u_net_wiring():
    """The forward equals the layout written out by hand: encoders keep skips, each decoder's
    upsampled output gets the skip of the level it reaches, the bottom level has none."""
    model = tiny_unet()
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        e0 = model.encoders[0](model.stem(x))
        e1 = model.encoders[1](model.down[0](e0))
        e2 = model.encoders[2](model.down[1](e1))
        h = model.up[1](model.decoders[2](e2)) + e1
        h = model.up[0](model.decoders[1](h)) + e0
        expected = model.head(model.decoders[0](h))
        out = model(x)
    assert out.shape == (2, 3, 8, 8, 8)
    assert torch.equal(out, expected)


def test_factories_build_the_submodules_in_order():
    """Factories get the level channels; submodules (hence initialisation order and
    ``state_dict`` keys) come as stem, encoders, down, decoders, up, head."""
    calls = []

    def level(c: int, d: int) -> nn.Module:
        calls.append(("level", c, d))
        return coupling_level(c, d)

    def down(i: int, fine: int, coarse: int) -> nn.Module:
        calls.append(("down", i, fine, coarse))
        return MaxPoolConv3d(fine, coarse)

    def up(i: int, coarse: int, fine: int) -> nn.Module:
        calls.append(("up", i, coarse, fine))
        return ConvTrilinearUp3d(coarse, fine)

    model = ReversibleUNet(2, 3, CHANNELS, [1, 2, 1], 3, level, down, up)
    assert calls == [
        ("level", 4, 1),
        ("level", 8, 2),
        ("level", 12, 1),
        ("down", 0, 4, 8),
        ("down", 1, 8, 12),
        ("level", 4, 3),
        ("level", 8, 3),
        ("level", 12, 3),
        ("up", 0, 8, 4),
        ("up", 1, 12, 8),
    ]
    names = [name for name, _ in model.named_children()]
    assert names == ["stem", "encoders", "down", "decoders", "up", "head"]
    assert model.channels == CHANNELS and model.divisor == 4
    assert len(model.decoders[1].blocks) == 3
    with pytest.raises(ValueError, match="encoder_depth"):
        ReversibleUNet(2, 3, CHANNELS, [1, 2], 1, level, down, up)


@pytest.mark.parametrize("shape", [(1, 2, 8, 8, 6), (1, 2, 10, 8, 8), (2, 8, 8, 8)])
def test_rejects_inputs_that_are_not_5d_or_not_divisible(shape):
    with pytest.raises(ValueError, match="ReversibleUNet expects .* divisible by 4"):
        tiny_unet()(torch.randn(*shape))


def test_memory_saving_reaches_every_sequence():
    model = tiny_unet()
    seqs = model.reversible_sequences()
    assert seqs == [*model.encoders, *model.decoders] and len(seqs) == 6
    assert model.memory_saving
    model.memory_saving = False
    assert not any(seq.memory_saving for seq in seqs) and not model.memory_saving
    seqs[3].memory_saving = True
    assert not model.memory_saving  # only when every sequence saves memory
    model.memory_saving = True
    assert all(seq.memory_saving for seq in seqs) and model.memory_saving


def test_resampling_modules_are_plain_convolutions_around_the_resampling():
    torch.manual_seed(0)
    down, up = MaxPoolConv3d(4, 6), ConvTrilinearUp3d(6, 4)
    assert list(down.state_dict()) == list(up.state_dict()) == ["weight", "bias"]
    assert down.weight.shape == (6, 4, 1, 1, 1) and up.weight.shape == (4, 6, 1, 1, 1)
    x = torch.randn(2, 4, 8, 6, 4)
    with torch.no_grad():
        y = down(x)
        # a matrix product on the CPU (PointwiseConv3d): equal to float rounding
        close = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, F.conv3d(F.max_pool3d(x, 2), down.weight, down.bias), **close)
        z = up(y)
        expected = F.interpolate(
            F.conv3d(y, up.weight, up.bias), scale_factor=2, mode="trilinear", align_corners=False
        )
        torch.testing.assert_close(z, expected, **close)
        assert torch.equal(upsample2x(z), F.interpolate(z, size=(16, 12, 8), mode="trilinear"))
    assert y.shape == (2, 6, 4, 3, 2) and z.shape == (2, 4, 8, 6, 4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("out", [3, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_equals_conv3d_with_its_gradients(layout, out, bias):
    """The 1x1x1 convolution as a matrix product: the values and the gradients of the input,
    weight and bias are conv3d's (float64, so to rounding), for a batch of two, one output
    channel (a channels-last tensor that is also contiguous), an incoming gradient in the
    other layout, a frozen weight, and the input's layout kept in the result and gradient."""
    torch.manual_seed(0)
    conv = PointwiseConv3d(6, out, bias=bias).double()
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 6, 4, 6, 8, dtype=torch.float64).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    y = conv(x)
    reference = F.conv3d(x, conv.weight, conv.bias)
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    other = torch.contiguous_format if layout == "channels_last" else torch.channels_last_3d
    g = torch.randn(reference.shape, dtype=torch.float64).contiguous(memory_format=other)
    params = [p for p in (x, conv.weight, conv.bias) if p is not None]
    ours = torch.autograd.grad(y, params, g)
    theirs = torch.autograd.grad(reference, params, g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=fmt) and ours[0].is_contiguous(memory_format=fmt)
    conv.weight.requires_grad_(False)  # only some gradients wanted
    (gx,) = torch.autograd.grad(conv(x), [x], g)
    torch.testing.assert_close(gx, theirs[0], rtol=1e-12, atol=1e-12)


def test_pointwise_conv_strided_input_and_a_second_backward():
    """A strided input runs conv3d (the same values); a second backward through the matrix
    product (written with out=) raises autograd's once_differentiable error, never a wrong
    gradient."""
    conv = PointwiseConv3d(4, 2).double()
    x = torch.randn(1, 4, 4, 8, 4, dtype=torch.float64)[:, :, :, ::2]
    torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias))
    x = torch.randn(1, 4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(conv(x).pow(2).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_pointwise_conv_under_autocast_runs_in_the_low_precision_as_conv3d():
    conv = PointwiseConv3d(6, 3)
    x = torch.randn(1, 6, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        reference = F.conv3d(x, conv.weight, conv.bias)
    assert y.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_level_sequence_builds_distinct_blocks_and_passes_the_flags():
    seq = level_sequence(lambda: nn.Identity(), 3, _Recorder, False, True)
    assert len(seq.blocks) == 3 and len({id(b) for b in seq.blocks}) == 3
    assert seq.kwargs == {"memory_saving": False, "preserve_rng_state": True}


class _Recorder(nn.Module):
    def __init__(self, blocks: list[nn.Module], **kwargs: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.kwargs = kwargs
