"""Layer-wise invertible layers (Hascoet et al.): pooling, batch norm, LeakyReLU, convolution,
the layer-wise chain with its memory-saving backward, and the SNR closed forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from helpers import rel_err
from revseg.memory.measure import SavedTensorsCounter
from revseg.nn.invertible import (
    BatchPooling3d,
    ChannelPooling3d,
    InverseOf,
    InvertibleBatchNorm3d,
    InvertibleConv3d,
    InvertibleLeakyReLU,
    LayerwiseInvertibleChain,
    batch_norm_alpha,
    leaky_relu_alpha,
)
from revseg.nn.reversible import _frozen_batchnorm_stats, block_backward_step

# ------------------------------------------------------------------------------------------------
# pooling


def test_channel_pooling_stacks_each_cell_along_channels():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    y = ChannelPooling3d()(x)
    assert y.shape == (2, 24, 2, 3, 4)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    assert torch.equal(y[:, 8 * c + 4 * i + 2 * j + k], x[:, c, i::2, j::2, k::2])
    assert torch.equal(ChannelPooling3d().inverse(y), x)


def test_channel_pooling_in_2d_is_pixel_unshuffle():
    x = torch.randn(2, 3, 2, 6, 8)  # depth 2: one cell along D, so each D offset is one block
    y = ChannelPooling3d()(x).reshape(2, 3, 2, 4, 3, 4)  # (B, C, i, 4 (j,k), H/2, W/2)
    expected = torch.nn.functional.pixel_unshuffle(x[:, :, 0], 2).reshape(2, 3, 4, 3, 4)
    assert torch.equal(y[:, :, 0, :, :, :], expected)


def test_batch_pooling_stacks_each_cell_along_the_batch():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    y = BatchPooling3d()(x)
    assert y.shape == (16, 3, 2, 3, 4)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    assert torch.equal(y[8 * b + 4 * i + 2 * j + k], x[b, :, i::2, j::2, k::2])
    assert torch.equal(BatchPooling3d().inverse(y), x)


@pytest.mark.parametrize("pool", [ChannelPooling3d(), BatchPooling3d()])
def test_pooling_is_exactly_invertible_and_differentiable(pool):
    x = torch.randn(2, 4, 8, 4, 6, dtype=torch.float64, requires_grad=True)
    y = pool(x)
    assert y.numel() == x.numel()
    assert torch.equal(pool.inverse(y), x)
    z = torch.randn_like(y)
    assert torch.equal(pool(pool.inverse(z)), z)
    (y * z).sum().backward()  # a permutation: the gradient is the permuted upstream gradient
    assert torch.equal(x.grad, pool.inverse(z))


@pytest.mark.parametrize("pool", [ChannelPooling3d(), BatchPooling3d()])
def test_pooling_rejects_odd_sizes(pool):
    with pytest.raises(ValueError, match="divisible"):
        pool(torch.randn(1, 2, 4, 5, 4))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        pool(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="divisible by 8"):
        pool.inverse(torch.randn(3, 3, 2, 2, 2))


def test_inverse_of_swaps_the_directions():
    x = torch.randn(1, 16, 2, 2, 2)
    unpool = InverseOf(ChannelPooling3d())
    assert unpool(x).shape == (1, 2, 4, 4, 4)
    assert torch.equal(unpool.inverse(unpool(x)), x)


# ------------------------------------------------------------------------------------------------
# LeakyReLU


def test_leaky_relu_inverse_and_slope_check():
    layer = InvertibleLeakyReLU(0.2)
    x = torch.randn(4, 3, 4, 4, 4, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y, torch.nn.functional.leaky_relu(x, 0.2))
    assert rel_err(layer.inverse(y), x) < 1e-15  # one division by n: exact up to one rounding
    with pytest.raises(ValueError, match="negative_slope > 0"):
        InvertibleLeakyReLU(0.0)
    with pytest.raises(ValueError, match="> 0"):
        leaky_relu_alpha(-1.0)


def measured_alpha(layer: nn.Module, x: torch.Tensor, noise: torch.Tensor) -> float:
    """alpha = snr_in / snr_out (eq. 17-18): inject ``noise`` at the output, invert, compare."""
    with torch.no_grad():
        y = layer(x)
        x_hat = layer.inverse(y + noise)
    snr_out = y.pow(2).sum() / noise.pow(2).sum()
    snr_in = x.pow(2).sum() / (x_hat - x).pow(2).sum()
    return float(snr_in / snr_out)


def test_leaky_relu_alpha_closed_form_values():
    assert leaky_relu_alpha(1.0) == 1.0
    assert leaky_relu_alpha(0.2) == pytest.approx(4 / (26 * 1.04))
    assert leaky_relu_alpha(0.1) == pytest.approx(leaky_relu_alpha(10.0))  # n <-> 1/n
    slopes = [1e-3, 1e-2, 0.1, 0.5, 1.0]
    values = [leaky_relu_alpha(n) for n in slopes]
    assert values == sorted(values)  # the SNR loss shrinks as n -> 1 (Figure 6)


@pytest.mark.parametrize("slope", [0.05, 0.2, 0.5, 2.0])
def test_leaky_relu_alpha_matches_a_measurement_on_gaussian_inputs(slope):
    """Gaussian input and output noise 1e-6 (the ``y >> eps_y`` regime of eq. 30-32: sign flips
    have probability ~1e-6). The measured ratio fluctuates with the split of signal and noise
    energy between the two branches: relative std about 3 / sqrt(N) (0.55% measured over ten
    seeds at N = 2^18), so 2% at N = 2^20 is more than 5 sigma."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2**20, dtype=torch.float64, generator=gen)
    noise = 1e-6 * torch.randn(2**20, dtype=torch.float64, generator=gen)
    measured = measured_alpha(InvertibleLeakyReLU(slope), x, noise)
    assert measured == pytest.approx(leaky_relu_alpha(slope), rel=0.02)


def test_leaky_relu_alpha_is_exact_when_its_assumptions_hold_exactly():
    """Signal energy split evenly by sign (x and -x) and noise energy split evenly by branch:
    eq. 32c holds up to rounding."""
    gen = torch.Generator().manual_seed(1)
    z = torch.rand(4096, dtype=torch.float64, generator=gen) + 0.1  # away from 0: no sign flip
    x = torch.cat((z, -z))
    noise = 1e-6 * torch.randn(8192, dtype=torch.float64, generator=gen)
    noise[4096:] *= noise[:4096].norm() / noise[4096:].norm()
    assert measured_alpha(InvertibleLeakyReLU(0.3), x, noise) == pytest.approx(
        leaky_relu_alpha(0.3), rel=1e-6
    )


# ------------------------------------------------------------------------------------------------
# batch norm


def gaussian_channels(shape, seed=0):
    """``(B, C, D, H, W)`` float64 input whose channels have different means and scales."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    mean = 2 * torch.randn(c, dtype=torch.float64, generator=gen)
    std = 3 * torch.rand(c, dtype=torch.float64, generator=gen) + 0.2
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    return x * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1), gen


def random_bn(c, gen, scale_eps=0.1) -> InvertibleBatchNorm3d:
    bn = InvertibleBatchNorm3d(c, scale_eps=scale_eps).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, dtype=torch.float64, generator=gen))
        bn.bias.copy_(torch.randn(c, dtype=torch.float64, generator=gen))
    return bn


def test_batch_norm_is_torch_batch_norm_with_the_bounded_scale():
    x, gen = gaussian_channels((2, 5, 4, 4, 4))
    ours = random_bn(5, gen)
    ref = nn.BatchNorm3d(5).double()
    with torch.no_grad():
        ref.weight.copy_(ours.weight.abs() + 0.1)
        ref.bias.copy_(ours.bias)
    for _ in range(2):
        assert rel_err(ours(x), ref(x)) < 1e-14
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name), getattr(ref, name), rtol=1e-14), name
    ours.eval(), ref.eval()
    assert rel_err(ours(x), ref(x)) < 1e-14


def test_batch_norm_scale_starts_at_one_and_never_reaches_zero():
    bn = InvertibleBatchNorm3d(3, scale_eps=0.05)
    assert torch.allclose(bn.scale(), torch.ones(3))
    with torch.no_grad():
        bn.weight.zero_()  # |gamma + eps| would vanish at gamma = -eps; |gamma| + eps does not
    assert torch.equal(bn.scale(), torch.full((3,), 0.05))
    with pytest.raises(ValueError, match="scale_eps"):
        InvertibleBatchNorm3d(3, scale_eps=0.0)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_inverse_uses_the_statistics_of_the_forward(training):
    x, gen = gaussian_channels((2, 4, 4, 4, 4))
    bn = random_bn(4, gen)
    with torch.no_grad():
        bn(x + 1.0)  # a step: running statistics move away from their initial values
        bn.train(training)
        y = bn(x)
        # in training the batch statistics of *this* forward, in eval the running ones
        err = rel_err(bn.inverse(y), x)
    assert err < 1e-13, err


def test_batch_norm_inverse_needs_a_forward_in_training_mode():
    with pytest.raises(RuntimeError, match="batch statistics"):
        InvertibleBatchNorm3d(2).inverse(torch.randn(1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        InvertibleBatchNorm3d(2)(torch.randn(1, 3, 2, 2, 2))


def test_batch_norm_alpha_reduces_to_the_two_channel_example():
    """Eq. 23c: beta = 0, gamma = [1, rho], unit-variance zero-mean input."""
    for rho in (0.1, 0.5, 3.0):
        alpha = batch_norm_alpha(
            torch.zeros(2),
            torch.ones(2),
            torch.tensor([1.0, rho], dtype=torch.float64),
            torch.zeros(2),
        )
        assert alpha == pytest.approx(4 / ((1 + 1 / rho**2) * (1 + rho**2)), rel=1e-12)
        assert alpha == pytest.approx(leaky_relu_alpha(rho), rel=1e-12)  # the same mechanism
    assert batch_norm_alpha(torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)) == 1.0


def test_batch_norm_alpha_is_exact_for_noise_spread_evenly_over_channels():
    """With the batch statistics, |x|^2 and |y|^2 per channel are exactly the moments in eq. 26;
    noise with the same energy in every channel makes eq. 25f exact: up to rounding."""
    x, gen = gaussian_channels((2, 6, 8, 8, 8))
    bn = random_bn(6, gen)
    noise = 1e-6 * torch.randn(x.shape, dtype=torch.float64, generator=gen)
    noise /= noise.pow(2).sum(dim=(0, 2, 3, 4), keepdim=True).sqrt()
    measured = measured_alpha(bn, x, noise)
    assert measured == pytest.approx(bn.snr_alpha(), rel=1e-6)
    assert bn.snr_alpha() < 1.0


def test_batch_norm_alpha_matches_a_measurement_on_gaussian_inputs():
    """I.i.d. Gaussian noise: the per-channel noise energies fluctuate by sqrt(2 / 16384) = 1.1%
    (16384 elements per channel), so 5% is more than 4 sigma even on the largest channel term."""
    x, gen = gaussian_channels((4, 6, 16, 16, 16), seed=2)
    bn = random_bn(6, gen)
    noise = 1e-6 * torch.randn(x.shape, dtype=torch.float64, generator=gen)
    assert measured_alpha(bn, x, noise) == pytest.approx(bn.snr_alpha(), rel=0.05)


def test_running_stats_are_frozen_for_both_batch_norms():
    bns = [InvertibleBatchNorm3d(2), nn.BatchNorm3d(2)]
    x = torch.randn(2, 2, 4, 4, 4)
    with _frozen_batchnorm_stats(bns):
        assert bns[0].stats_frozen
        for bn in bns:
            bn(x)
    assert all(int(bn.num_batches_tracked) == 0 for bn in bns)
    assert all(torch.equal(bn.running_mean, torch.zeros(2)) for bn in bns)
    assert not bns[0].stats_frozen
    for bn in bns:
        bn(x)
    assert all(int(bn.num_batches_tracked) == 1 for bn in bns)


# ------------------------------------------------------------------------------------------------
# invertible convolution and the layer-wise chain


def test_invertible_conv_is_an_exact_coupling_and_its_backward_step_is_autograd():
    torch.manual_seed(0)
    conv = InvertibleConv3d(6).double()
    x = torch.randn(2, 6, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    with torch.no_grad():
        assert rel_err(conv.inverse(y), x) < 1e-14
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *conv.parameters()], grad_y)
    x_rec, grad_x, param_grads = block_backward_step(conv, y.detach(), grad_y)
    assert rel_err(x_rec, x.detach()) < 1e-14
    assert rel_err(grad_x, grads[0]) < 1e-13
    assert len(param_grads) == 2 and all(
        rel_err(a, b) < 1e-13 for a, b in zip(param_grads, grads[1:])
    )
    with pytest.raises(ValueError, match="even"):
        InvertibleConv3d(5)
    with pytest.raises(ValueError, match="odd kernel"):
        InvertibleConv3d(4, kernel_size=2)


def make_chain(units: int, channels: int = 4, slope: float = 0.2, pool: bool = False):
    layers: list[nn.Module] = []
    for _ in range(units):
        layers += [InvertibleConv3d(channels), InvertibleBatchNorm3d(channels)]
        layers.append(InvertibleLeakyReLU(slope))
    if pool:
        layers += [BatchPooling3d(), InvertibleConv3d(channels), InverseOf(BatchPooling3d())]
    return LayerwiseInvertibleChain(layers)


def perturbed(chain: LayerwiseInvertibleChain) -> LayerwiseInvertibleChain:
    """Batch norm parameters away from their initial values, so their gradients are tested."""
    with torch.no_grad():
        for module in chain.modules():
            if isinstance(module, InvertibleBatchNorm3d):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return chain


@pytest.mark.parametrize("pool", [False, True])
def test_chain_gradients_equal_plain_autograd(pool):
    torch.manual_seed(0)
    saving = perturbed(make_chain(3, pool=pool)).double()
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(2, 4, 4, 6, 4, dtype=torch.float64)
    results = []
    for chain in (saving, plain):
        xi = x.clone().requires_grad_(True)
        out = chain(xi)
        (out.pow(2).mean() + out.sin().sum()).backward()
        results.append((out.detach(), xi.grad, [p.grad for p in chain.parameters()]))
    (o1, gx1, g1), (o2, gx2, g2) = results
    assert torch.equal(o1, o2)
    assert rel_err(gx1, gx2) < 1e-6
    assert len(g1) == len(g2) == 3 * 4 + 2 * pool
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-6
    # running statistics: one update per step, the same as plain autograd's
    for a, b in zip(saving.buffers(), plain.buffers()):
        assert torch.equal(a, b)
    bns = [m for m in saving.modules() if isinstance(m, InvertibleBatchNorm3d)]
    assert len(bns) == 3 and all(int(m.num_batches_tracked) == 1 for m in bns)


def test_chain_inverse_accuracy_float64_and_float32():
    """Layer-wise inverses through BN and LeakyReLU lose SNR (alpha < 1 per layer), but with
    rounding noise only (1e-16 / 1e-7) the reconstruction stays accurate at this depth."""
    torch.manual_seed(0)
    chain = perturbed(make_chain(4)).double()
    x = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(chain.inverse(chain(x)), x) < 1e-12
        chain.float()
        assert rel_err(chain.inverse(chain(x.float())), x.float()) < 1e-4


def test_chain_keeps_only_its_output():
    torch.manual_seed(0)

    def saved(units: int, memory_saving: bool) -> int:
        chain = make_chain(units)
        chain.memory_saving = memory_saving
        x = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
        with SavedTensorsCounter(exclude=chain.parameters()) as counter:
            chain(x)
        return counter.bytes

    state = 4 * 4**3 * 4
    assert [saved(u, True) for u in (1, 2, 4)] == [state] * 3
    plain = [saved(u, False) for u in (1, 2, 4)]
    assert plain[0] < plain[1] < plain[2], plain


def test_chain_registers_its_layers_once():
    chain = make_chain(2)
    keys = list(chain.state_dict())
    assert keys[:2] == ["layers.0.f.weight", "layers.0.g.weight"]
    assert all(k.startswith("layers.") for k in keys)
    # per unit: the conv's two weights, BN's weight, bias, running mean, var and count
    assert len(keys) == 2 * (2 + 5)
    # the chain, its ModuleList, per unit the conv (with its two convolutions), BN, LeakyReLU
    assert len(list(chain.modules())) == 1 + 1 + 2 * (3 + 1 + 1)


def test_chain_rejects_layers_without_inverse():
    with pytest.raises(TypeError, match="Conv3d has no inverse"):
        LayerwiseInvertibleChain([nn.Conv3d(2, 2, 1)])
    with pytest.raises(ValueError, match="at least one"):
        LayerwiseInvertibleChain([])


def test_leaky_relu_alpha_value_at_common_slopes():
    assert math.isclose(leaky_relu_alpha(0.01), 4 / (10001 * 1.0001))
