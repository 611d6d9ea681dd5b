"""RevNet blocks: the residual-style F and G, exact inverses, exact gradients, flat memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import rel_err
from revseg.memory.measure import SavedTensorsCounter
from revseg.nn.reversible import AdditiveCoupling, ReversibleSequence
from revseg.nn.revnet import ResidualFunction, revnet_coupling, revnet_sequence


def randomized(module: nn.Module) -> nn.Module:
    """Float64 with GroupNorm affine parameters away from their (1, 0) initialisation."""
    torch.manual_seed(0)
    module = module.double()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    return module


def test_residual_function_is_the_pre_activation_basic_block():
    f = randomized(ResidualFunction(4, norm_groups=2, negative_slope=0.2))
    kinds = [type(m) for m in f.modules() if not list(m.children())]
    assert kinds == [nn.GroupNorm, nn.LeakyReLU, nn.Conv3d] * 2
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    expected = x
    with torch.no_grad():
        for unit in f:
            norm = F.group_norm(expected, 2, unit.norm.weight, unit.norm.bias, unit.norm.eps)
            expected = F.conv3d(F.leaky_relu(norm, 0.2), unit.conv.weight, padding=1)
        out = f(x)
    assert out.shape == x.shape
    assert rel_err(out, expected) < 1e-12
    assert f.channels == 4 and all(u.conv.bias is None for u in f)


def test_residual_function_rejects_an_even_kernel():
    with pytest.raises(ValueError, match="odd kernel_size"):
        ResidualFunction(4, kernel_size=2)
    assert ResidualFunction(4, 2, kernel_size=1)(torch.randn(1, 4, 3, 3, 3)).shape == (
        1,
        4,
        3,
        3,
        3,
    )


def test_coupling_has_residual_f_and_g_on_half_the_channels_and_inverts():
    block = randomized(revnet_coupling(8, norm_groups=2))
    assert isinstance(block, AdditiveCoupling)
    assert isinstance(block.f, ResidualFunction) and isinstance(block.g, ResidualFunction)
    assert block.f.channels == block.g.channels == 4
    x = torch.randn(2, 8, 4, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        assert rel_err(y, x) > 1e-2  # the block does change its input
        assert rel_err(block.inverse(y), x) < 1e-12
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + block.f(x2)
        assert rel_err(y, torch.cat((y1, x2 + block.g(y1)), dim=1)) < 1e-14


def test_sequence_inverts_at_depth():
    seq = randomized(revnet_sequence(8, 4, norm_groups=2))
    assert isinstance(seq, ReversibleSequence) and len(seq.blocks) == 4
    x = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(seq.inverse(seq(x)), x) < 1e-12


@pytest.mark.parametrize("depth", [1, 3])
def test_sequence_gradients_equal_plain_autograd(depth):
    saving = randomized(revnet_sequence(8, depth, norm_groups=2, memory_saving=True))
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(2, 8, 4, 5, 6, dtype=torch.float64)
    results = []
    for seq in (saving, plain):
        xi = x.clone().requires_grad_(True)
        y = seq(xi)
        (y.pow(2).sum() + y.sin().sum()).backward()
        results.append((y.detach(), xi.grad, [p.grad for p in seq.parameters()]))
    (y1, gx1, g1), (y2, gx2, g2) = results
    assert torch.equal(y1, y2)
    assert rel_err(gx1, gx2) < 1e-10
    assert len(g1) == len(g2) == depth * 2 * 2 * 3  # per block: F, G x 2 units x (w, b, conv)
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-10


def saved_bytes(depth: int, memory_saving: bool) -> int:
    seq = revnet_sequence(8, depth, norm_groups=2, memory_saving=memory_saving)
    x = torch.randn(1, 8, 8, 8, 8, requires_grad=True)
    with SavedTensorsCounter(exclude=seq.parameters()) as counter:
        seq(x)
    return counter.bytes


def test_saved_memory_is_the_output_only_whatever_the_depth():
    state = 8 * 8**3 * 4  # one (1, 8, 8, 8, 8) float32 state
    assert [saved_bytes(d, True) for d in (1, 2, 4)] == [state] * 3
    plain = [saved_bytes(d, False) for d in (1, 2, 4)]
    assert plain[0] < plain[1] < plain[2], plain
    # plain autograd keeps per block at least the inputs of its four GroupNorms and four convs
    assert plain[2] - plain[1] >= 2 * 8 * (state // 2)


def test_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="even channel count"):
        revnet_coupling(7)
    with pytest.raises(ValueError, match="depth >= 1"):
        revnet_sequence(8, 0)
