"""The symmetric block-low-rank layer: K^T D K structure, rank growth and shrinkage, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from revseg.nn.low_rank import SymmetricBlockLowRankConv3d


def layer(channels: int = 5, rank: int | None = 2, **kwargs) -> SymmetricBlockLowRankConv3d:
    torch.manual_seed(0)
    blr = SymmetricBlockLowRankConv3d(channels, rank, **kwargs).double()
    with torch.no_grad():
        for b in blr.bias:
            b.normal_()  # a bias that switches some ReLUs off, so D is not the identity
    return blr


def dense_jacobian(blr, shape=(1, 3, 3, 3, 3)) -> torch.Tensor:
    torch.manual_seed(1)
    y = torch.randn(*shape, dtype=torch.float64)
    n = y.numel()
    return jacobian(blr, y).reshape(n, n)


@pytest.mark.parametrize(("channels", "rank"), [(3, 2), (3, None)])
def test_jacobian_is_symmetric_negative_semidefinite_of_block_rank(channels, rank):
    blr = layer(channels, rank)
    jac = dense_jacobian(blr, (1, channels, 3, 3, 3))
    assert torch.allclose(jac, jac.T, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(jac)
    assert eigenvalues.max() < 1e-10
    assert eigenvalues.min() < -1e-3  # not trivially zero
    # -K^T D K factors through m channels: its rank is at most m * D * H * W
    assert torch.linalg.matrix_rank(jac) <= blr.rank * 27


def test_forward_is_minus_transposed_conv_of_relu_of_conv():
    blr = layer(4, 3)
    y = torch.randn(2, 4, 5, 4, 3, dtype=torch.float64)
    weight, bias = blr.weight[0], blr.bias[0]
    z = torch.relu(F.conv3d(y, weight, bias, padding=1))
    assert torch.allclose(blr(y), -F.conv_transpose3d(z, weight, padding=1), atol=1e-14)
    # K^T is the adjoint of K: <K y, z> == <y, K^T z>
    ky = F.conv3d(y, weight, padding=1)
    assert torch.allclose((ky * z).sum(), (y * F.conv_transpose3d(z, weight, padding=1)).sum())


def test_kernel_and_parameter_counts():
    blr = SymmetricBlockLowRankConv3d(48, 4)
    assert blr.rank == 4 and blr.kernel()[0].shape == (4, 48, 3, 3, 3)
    assert sum(p.numel() for p in blr.parameters()) == 4 * 48 * 27 + 4
    assert SymmetricBlockLowRankConv3d(6).rank == 6  # rank None: full n x n


@pytest.mark.parametrize("init", ["small", "zeros", "default"])
def test_grow_keeps_old_kernels_and_parameter_identity(init):
    blr = layer(6, 2)
    old = list(blr.parameters())
    old_values = [p.detach().clone() for p in old]
    y = torch.randn(1, 6, 4, 4, 4, dtype=torch.float64)
    before = blr(y).detach()
    new = blr.grow(3, init=init)
    assert blr.rank == 5 and blr.block_sizes == [2, 3]
    assert all(p.dtype == torch.float64 for p in new)  # dtype follows the existing blocks
    assert [id(p) for p in blr.parameters()] == [id(p) for p in (old[0], new[0], old[1], new[1])]
    assert all(torch.equal(p, v) for p, v in zip(old, old_values))
    assert torch.equal(blr.kernel()[0][:2], old_values[0])
    change = float((blr(y) - before).detach().norm() / before.norm())
    if init == "zeros":
        assert change < 1e-14  # rounding only: the convolution sums over more rows
    elif init == "small":
        assert 0 < change < 1e-3
    else:
        assert change > 1e-2
    # the new rows are trainable from where they start (zeros: the positive bias opens the ReLU)
    blr(y).pow(2).sum().backward()
    assert new[0].grad.abs().max() > 0


def test_shrink_removes_rows_from_the_end():
    blr = layer(6, 2)
    first = blr.weight[0]
    y = torch.randn(1, 6, 4, 4, 4, dtype=torch.float64)
    before = blr(y).detach()
    blr.grow(3)
    grown = blr.weight[1].detach().clone()
    blr.shrink(1)  # cuts the new block in part: a new parameter with its first two rows
    assert blr.block_sizes == [2, 2] and blr.weight[0] is first
    assert torch.equal(blr.weight[1], grown[:2])
    blr.shrink(2)  # drops that block: the original layer again
    assert blr.block_sizes == [2] and blr.weight[0] is first
    assert torch.equal(blr(y), before)
    blr.shrink(1)
    assert blr.block_sizes == [1] and torch.equal(blr.weight[0], first.detach()[:1])


def test_set_rank_and_invalid_ranks():
    blr = layer(6, 2)
    blr.set_rank(4)
    assert blr.rank == 4
    blr.set_rank(3)
    assert blr.rank == 3
    blr.set_rank(None)
    assert blr.rank == 6
    with pytest.raises(ValueError, match=r"block rank must be in \[1, 6\]"):
        blr.grow(1)
    with pytest.raises(ValueError, match="block rank"):
        blr.set_rank(0)
    with pytest.raises(ValueError, match="block rank"):
        SymmetricBlockLowRankConv3d(4, 5)
    with pytest.raises(ValueError, match="init must be"):
        layer(6, 2).grow(1, init="ones")
    with pytest.raises(ValueError, match="activation"):
        SymmetricBlockLowRankConv3d(4, 2, activation="sigmoid")


@pytest.mark.parametrize("saved_sizes", [[2, 3, 1], [1]])
def test_state_dict_saved_at_another_rank_loads_into_a_fresh_layer(saved_sizes):
    trained = layer(6, saved_sizes[0])
    for k in saved_sizes[1:]:
        trained.grow(k, init="default")
    fresh = SymmetricBlockLowRankConv3d(6, 2).double()
    fresh.load_state_dict(trained.state_dict())  # strict
    assert fresh.block_sizes == saved_sizes
    y = torch.randn(1, 6, 3, 3, 3, dtype=torch.float64)
    assert torch.equal(fresh(y), trained(y))


def test_optimizer_keeps_state_of_old_parameters_and_gains_new_ones():
    blr = layer(6, 2)
    optimizer = torch.optim.Adam(blr.parameters(), lr=1e-2)
    y = torch.randn(1, 6, 3, 3, 3, dtype=torch.float64)
    blr(y).pow(2).sum().backward()
    optimizer.step()
    old_state = {id(p): optimizer.state[p]["exp_avg"].clone() for p in blr.parameters()}
    new = blr.grow(2)
    # what Trainer.sync_optimizer_params does after a rank change
    optimizer.param_groups[0]["params"] = list(blr.parameters())
    assert optimizer.param_groups[0]["params"] == list(blr.parameters())
    assert all(torch.equal(optimizer.state[p]["exp_avg"], old_state[id(p)]) for p in blr.weight[:1])
    optimizer.zero_grad()
    blr(y).pow(2).sum().backward()
    before = new[0].detach().clone()
    optimizer.step()
    assert not torch.equal(new[0], before)
