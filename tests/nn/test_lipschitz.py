"""Spectral normalisation, fixed-point inverse and Fixup init of RevUp (Thangarasa et al.)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from revseg.nn.lipschitz import SpectralNormConv3d, fixed_point_inverse, fixup_init_, fixup_scale
from revseg.nn.reversible import recomputing


def layer_norm(weight: torch.Tensor, size: int, iterations: int = 500) -> float:
    """Operator norm of the zero-padded convolution on ``size^3`` inputs, by power iteration on
    the layer's own operator (conv3d and its adjoint, conv_transpose3d)."""
    pad = weight.shape[-1] // 2
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(1, weight.shape[1], size, size, size, dtype=weight.dtype, generator=gen)
    with torch.no_grad():
        for _ in range(iterations):
            v = F.conv_transpose3d(F.conv3d(v, weight, padding=pad), weight, padding=pad)
            v = v / v.norm()
        return float(F.conv3d(v, weight, padding=pad).norm())


def large_conv(in_channels: int = 6, out_channels: int = 5, seed: int = 0) -> SpectralNormConv3d:
    """A layer with N(0, 1) weights (operator norm about 30: the bound binds), converged."""
    torch.manual_seed(seed)
    conv = SpectralNormConv3d(in_channels, out_channels).double()
    with torch.no_grad():
        conv.weight.normal_()
    conv.power_iteration(300)
    return conv


def test_circular_adjoint_is_the_transpose():
    conv = large_conv()
    weight = conv.weight.detach()
    v = torch.randn(1, 6, 8, 8, 8, dtype=torch.float64)
    u = torch.randn(1, 5, 8, 8, 8, dtype=torch.float64)
    lhs = (conv._circular(v, weight) * u).sum()
    rhs = (v * conv._circular_adjoint(u, weight)).sum()
    assert abs(float(lhs - rhs)) < 1e-10 * abs(float(lhs))


def test_spectral_norm_bounds_the_layers_operator_norm():
    """Measured (seed 0, 6 -> 5 channels, 8^3 grid): the normalised layer's norm is 0.883 c on
    7^3 inputs (bounded exactly: inputs up to grid - 1 voxels), 0.958 c on 12^3 and 0.988 c on
    20^3 (the norm grows towards the circular estimate with the input size)."""
    conv = large_conv()
    assert float(conv.sigma().detach()) > 10  # the bound binds
    weight = conv.normalized_weight(update=False).detach()
    c = conv.coefficient
    assert abs(float(conv._circular(conv.power_vector, weight).norm()) - c) < 1e-9
    small = layer_norm(weight, 7)
    medium, large = (layer_norm(weight, s, iterations=200) for s in (12, 20))
    assert small <= c * (1 + 1e-6)
    assert 0.8 * c < small < medium < large < 1.01 * c


def test_reshaped_kernel_norm_does_not_bound_the_operator():
    """Why the operator is normalised: for an all-ones 3x3x3 kernel the reshaped 1 x 27 matrix
    has norm sqrt(27) = 5.2, the convolution about 27 (26.1 on 16^3): normalising the matrix to
    0.9 leaves a layer of norm 4.5, far from contractive."""
    ones = torch.ones(1, 1, 3, 3, 3, dtype=torch.float64)
    matrix = float(torch.linalg.matrix_norm(ones.reshape(1, -1), 2))
    assert abs(matrix - math.sqrt(27)) < 1e-12
    assert layer_norm(0.9 * ones / matrix, 16, iterations=100) > 4.3
    conv = SpectralNormConv3d(1, 1).double()
    with torch.no_grad():
        conv.weight.copy_(ones)
    conv.power_iteration(100)
    bounded = conv.normalized_weight(update=False).detach()
    assert layer_norm(bounded, 16, iterations=100) <= 0.9 * (1 + 1e-6)


def test_weights_below_the_bound_are_left_as_they_are():
    conv = large_conv()
    with torch.no_grad():
        conv.weight.mul_(0.5 * conv.coefficient / conv.sigma())
    assert torch.equal(conv.normalized_weight(update=False), conv.weight)
    # a gain is applied before the bound: small gains pass, large ones are cut back to c
    gain = torch.tensor([1.5], dtype=torch.float64)
    assert torch.allclose(conv.normalized_weight(gain, update=False), 1.5 * conv.weight)
    big = conv.normalized_weight(torch.tensor([-10.0], dtype=torch.float64), update=False)
    big = big.detach()
    assert abs(float(conv._circular(conv.power_vector, big).norm()) - conv.coefficient) < 1e-9
    assert torch.allclose(big, -conv.coefficient * conv.weight / conv.sigma())


def test_one_power_iteration_per_training_forward_and_none_elsewhere():
    torch.manual_seed(0)
    conv = SpectralNormConv3d(4, 4).double()
    x = torch.randn(1, 4, 6, 6, 6, dtype=torch.float64)
    start = conv.power_vector.clone()
    reference = SpectralNormConv3d(4, 4).double()
    reference.load_state_dict(conv.state_dict())
    reference.power_iteration(1)
    conv(x)  # training mode: one iteration, before the weight is computed
    assert torch.equal(conv.power_vector, reference.power_vector)
    assert not torch.equal(conv.power_vector, start)
    after = conv.power_vector.clone()
    conv.normalized_weight(update=False)  # as in inverses
    with recomputing():  # as in a memory-saving backward
        conv(x)
    conv.eval()
    conv(x)
    assert torch.equal(conv.power_vector, after)


def test_power_iteration_survives_a_zero_weight():
    """Fixup starts the last layer of each branch at zero: the vector waits, then resumes."""
    conv = SpectralNormConv3d(3, 3).double()
    with torch.no_grad():
        conv.weight.zero_()
    before = conv.power_vector.clone()
    conv.power_iteration(3)
    assert torch.equal(conv.power_vector, before)
    assert float(conv.sigma().detach()) == 0.0
    assert torch.equal(conv.normalized_weight(), conv.weight)
    with torch.no_grad():
        conv.weight.normal_()
    conv.power_iteration(200)
    assert torch.isfinite(conv.power_vector).all()
    # the circular estimate bounds the layer on inputs up to grid - 1 voxels
    sigma, layer = float(conv.sigma().detach()), layer_norm(conv.weight.detach(), 7)
    assert layer <= sigma * (1 + 1e-6) < 1.15 * layer


def test_power_iteration_stays_in_full_precision_under_autocast():
    conv = SpectralNormConv3d(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(torch.randn(1, 4, 4, 4, 4))
        assert conv.sigma().dtype == torch.float32
    assert out.dtype == torch.bfloat16 and conv.power_vector.dtype == torch.float32


def contraction(seed: int = 0) -> tuple[SpectralNormConv3d, SpectralNormConv3d]:
    first, second = large_conv(4, 4, seed), large_conv(4, 4, seed + 1)
    return first, second


def fixed_point_errors(g, x: torch.Tensor, iterations) -> tuple[list[float], float]:
    with torch.no_grad():
        y = x + g(x)
        errors = [float((fixed_point_inverse(g, y, n) - x).norm()) for n in iterations]
        first_step = float(g(y).norm())  # |x_1 - x_0|
    return errors, first_step


def test_fixed_point_inverse_converges_within_the_banach_bound():
    """Relative errors |x_n - x| / |x| at n = 1, 5, 20, 40 (seed 0, 6^3 inputs, c = 0.9, weights
    at the bound): a linear residual g = C (the slowest case, Lip(g) = c): 1.4e-1, 6.2e-3,
    4.9e-7, 3.3e-12; a RevUp-like branch g = C2 relu(C1 relu(x) + 0.1) (Lip <= c^2): 7.7e-3,
    2.2e-7, 4e-17, 4e-17 (rounding). The a-priori bound of eq. 4 holds with room (3.4, 2.2, 0.46,
    0.056 for the linear case). The paper reports visible errors at n = 1 and exact
    reconstructions after about 40 iterations."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, 6, dtype=torch.float64)
    c1, c2 = contraction()
    w1, w2 = (c.normalized_weight(update=False).detach() for c in (c1, c2))
    c = c1.coefficient
    iterations = (1, 5, 20, 40)
    cases = {
        "linear": (lambda t: c1(t, w1), c),
        "branch": (lambda t: c2(torch.relu(c1(torch.relu(t), w1) + 0.1), w2), c * c),
    }
    for name, (g, lip) in cases.items():
        errors, first_step = fixed_point_errors(g, x, iterations)
        relative = [e / float(x.norm()) for e in errors]
        assert relative[0] > 1e-3, name  # one iteration is not exact
        assert all(a > b for a, b in zip(relative[:2], relative[1:3])), (name, relative)
        assert relative[2] < 1e-5 and relative[3] < 1e-10, (name, relative)
        for n, error in zip(iterations, errors):
            # eq. 4 (inputs of 6^3 < grid size: Lip of each layer <= c, up to rounding)
            assert error <= (1 + 1e-6) * lip**n / (1 - lip) * first_step + 1e-13, (name, n)
    with pytest.raises(ValueError, match="iterations >= 1"):
        fixed_point_inverse(lambda t: t, x, 0)


def test_fixup_init():
    """Zhang et al.: last layer of each branch zero, the others He init times L^(-1/(2m-2))."""
    assert fixup_scale(16, 2) == 0.25 and fixup_scale(16, 3) == 0.5 and fixup_scale(1, 2) == 1
    torch.manual_seed(0)
    layers = [SpectralNormConv3d(32, 32) for _ in range(3)]
    fixup_init_(layers, num_branches=16)
    he = math.sqrt(2 / (32 * 27))
    for layer in layers[:2]:
        w = layer.weight.detach()
        assert abs(float(w.std()) / (he * 0.5) - 1) < 0.03
        assert abs(float(w.mean())) < 0.05 * he
    assert torch.count_nonzero(layers[2].weight) == 0
    with_bias = [torch.nn.Conv3d(2, 2, 3), torch.nn.Conv3d(2, 2, 3)]
    fixup_init_(with_bias, num_branches=4)
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in with_bias)
    with pytest.raises(ValueError, match="layers_per_branch >= 2"):
        fixup_init_(layers[:1], num_branches=4)


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="odd kernel_size"):
        SpectralNormConv3d(2, 2, kernel_size=2)
    with pytest.raises(ValueError, match="coefficient"):
        SpectralNormConv3d(2, 2, coefficient=1.5)
    with pytest.raises(ValueError, match="power_grid_size"):
        SpectralNormConv3d(2, 2, kernel_size=5, power_grid_size=4)
