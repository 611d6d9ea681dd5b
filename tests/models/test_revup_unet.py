"""RevUp U-Net (Thangarasa et al.): invertible Fixup blocks, gradients of the memory-saving
backward against plain autograd at converged and at single fixed-point iterations, memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from revseg.models.revup_unet import RevUpBlock, RevUpUNet
from revseg.nn.lipschitz import SpectralNormConv3d
from revseg.nn.reversible import InvertibleSequence

from model_tester import ReversibleModelTester, rel_err

CHANNELS = (30, 60, 120, 180, 240)


def default_params() -> int:
    """Parameters of the default config at depth 1/1: per level two blocks of two C x C 3x3x3
    convolutions and 5 Fixup scalars; stem 4 -> 30 (3x3x3, no bias); strided 2x2x2 down and
    1x1x1 up convolutions with bias; head 30 -> 3."""
    blocks = sum(2 * (2 * 27 * c * c + 5) for c in CHANNELS)
    pairs = list(zip(CHANNELS, CHANNELS[1:]))
    down = sum(8 * a * b + b for a, b in pairs)
    up = sum(b * a + a for a, b in pairs)
    return blocks + down + up + 4 * 30 * 27 + 30 * 3 + 3


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move a (Fixup-initialised, hence identity) model to weights that exercise everything:
    ``conv1`` at the spectral bound (N(0, 1) weights, norm about 30, cut back to c), ``conv2``
    below it (0.6 c, so Fixup's multiplier has an effect), nonzero scalars and head; the power
    iterations converged."""
    gen = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    for block in model.modules():
        if isinstance(block, RevUpBlock):
            for name in ("bias1a", "bias1b", "bias2a", "bias2b"):
                getattr(block, name).copy_(0.1 * randn(getattr(block, name)))
            block.scale.copy_(1 + 0.1 * randn(block.scale))
            for conv in (block.conv1, block.conv2):
                conv.weight.copy_(randn(conv.weight))
                conv.power_iteration(100)
            block.conv2.weight.mul_(0.6 * block.conv2.coefficient / block.conv2.sigma())
            block.conv2.weight.div_(block.scale.abs())
    model.head.weight.copy_(0.1 * randn(model.head.weight))
    return model


def layer_norm(weight: torch.Tensor, size: int = 7, iterations: int = 200) -> float:
    """Operator norm of the zero-padded 3x3x3 convolution on ``size^3`` inputs (power
    iteration with conv3d and its adjoint conv_transpose3d)."""
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(1, weight.shape[1], size, size, size, dtype=weight.dtype, generator=gen)
    with torch.no_grad():
        for _ in range(iterations):
            v = F.conv_transpose3d(F.conv3d(v, weight, padding=1), weight, padding=1)
            v = v / v.norm()
        return float(F.conv3d(v, weight, padding=1).norm())


def grads(model: nn.Module, x: torch.Tensor):
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (out.pow(2).mean() + out.sigmoid().sum()).backward()
    return out.detach(), xi.grad, [p.grad for p in model.parameters()]


class TestRevUpUNet(ReversibleModelTester):
    config_name = "revup_unet"
    expected_params = default_params()  # 12,429,773: within 0.5% of prev_unet's 12.37M
    tiny = ("model.channels=[8,16,24]",)
    tiny_shape = (8, 8, 8)
    checkpointable = True
    # its down (a strided conv) and up (1x1x1 conv, trilinear) keep only their inputs, which the
    # sequences keep anyway: checkpointing them saves nothing
    checkpointing_saves = False

    part_type = InvertibleSequence

    def test_default_size(self):
        """The default config has exactly the parameters :func:`default_params` counts."""
        model = self.build(tiny=False)
        assert sum(p.numel() for p in model.parameters()) == 12_429_773 == self.expected_params

    def test_every_sequence_inverts(self):
        """With converged fixed points every sequence inverts to rounding; at one iteration
        (the paper's training setting) the error is visible. Measured on the 6 sequences of two
        blocks (random weights at the bound, 4^3 inputs, seed 0): the blocks change the state
        by 5.5e-2 to 1.3e-1; reconstruction error 1.9e-3 to 4.7e-3 at 1 iteration, 4e-9 to
        1.2e-8 at 5, about 5e-17 (rounding) from 20."""
        model = randomize_(self.build(*self.depth_overrides(2)).double()).eval()
        torch.manual_seed(0)
        for seq in self.sequences(model):
            x = torch.randn(2, seq.blocks[0].channels, 4, 4, 4, dtype=torch.float64)
            with torch.no_grad():
                y = seq(x)
                assert rel_err(y, x) > 1e-2  # the blocks do change the state
                model.inverse_iterations = 40
                assert rel_err(seq.inverse(y), x) < 1e-10
                model.inverse_iterations = 1
                assert 1e-4 < rel_err(seq.inverse(y), x) < 0.1

    def test_gradients_equal_plain_autograd(self):
        """Memory saving vs plain autograd, float64, tiny model at depth 2 on 8^3 inputs with
        random weights at the bound (seed 0). Outputs are identical; gradient errors (input,
        worst parameter) per fixed-point iteration count: 1: 5.8e-3, 6.6e-2; 2: 3.9e-3, 9.8e-2;
        3: 7.1e-4, 2.8e-2; 5: 0 (the ReLU patterns, which alone set the input gradient, are
        recovered exactly), 6.6e-8; 10 and 20: 0, 9.4e-15. With the paper's single iteration the
        gradients are those of slightly wrong activations."""
        torch.manual_seed(0)
        base = randomize_(self.build(*self.depth_overrides(2)).double())
        plain = copy.deepcopy(base)
        plain.memory_saving = False
        x = torch.randn(2, self.in_channels, *self.tiny_shape, dtype=torch.float64)
        out_plain, gx_plain, g_plain = grads(plain, x)
        errors = {}
        for iterations in (1, 10):
            saving = copy.deepcopy(base)
            saving.inverse_iterations = iterations
            out, gx, g = grads(saving, x)
            assert torch.equal(out, out_plain)
            errors[iterations] = (
                rel_err(gx, gx_plain),
                max(rel_err(a, b) for a, b in zip(g, g_plain)),
            )
        assert errors[10][0] < 1e-6 and errors[10][1] < 1e-6, errors
        assert 1e-3 < errors[1][0] < 0.05 and 1e-2 < errors[1][1] < 0.2, errors

    def test_fixup_start_is_the_identity_without_normalisation_layers(self):
        """Fixup: ``conv2`` and the head start at zero (every block is the identity, the model
        outputs 0), ``conv1`` at He init times ``L^(-1/2)`` with ``L`` the blocks of the model;
        no normalisation layers."""
        model = self.build(*self.depth_overrides(2))
        blocks = model.blocks()
        assert len(blocks) == 12  # 3 levels x (encoder + decoder) x 2
        assert not any(isinstance(m, (nn.GroupNorm, _BatchNorm)) for m in model.modules())
        for block in blocks:
            assert torch.count_nonzero(block.conv2.weight) == 0
            x = torch.randn(1, block.channels, 4, 4, 4)
            with torch.no_grad():
                assert torch.equal(block(x), x)
        with torch.no_grad():
            assert torch.count_nonzero(model(torch.randn(1, 4, 8, 8, 8))) == 0
        big = self.build("model.channels=[64,64,64]", "model.encoder_depth=[8,8,8]")
        weights = torch.cat([b.conv1.weight.flatten() for b in big.blocks()])
        he = (2 / (64 * 27)) ** 0.5
        assert abs(float(weights.detach().std()) / (he * (24 + 3) ** -0.5) - 1) < 0.02

    def test_blocks_stay_contractive(self):
        """Both convolutions of every block have operator norm <= c on zero-padded 7^3 inputs
        (the largest the default 8^3 power-iteration grid bounds exactly; larger inputs can be a
        few % above c) whatever Fixup's multiplier learned: ``conv1`` at the bound, ``conv2``
        below it and then, with a multiplier of 50, cut back to it."""
        model = randomize_(self.build().double())
        for block in model.blocks():
            w1, w2 = block.normalized_weights(update=False)
            c = block.conv1.coefficient
            assert 0.8 * c < layer_norm(w1.detach()) <= c * (1 + 1e-6)
            assert layer_norm(w2.detach()) < 0.65 * c
            with torch.no_grad():
                block.scale.mul_(50)  # far beyond 1 / c^2
            w2 = block.normalized_weights(update=False)[1]
            assert 0.8 * c < layer_norm(w2.detach()) <= c * (1 + 1e-6)

    def test_backward_does_not_advance_the_power_iteration(self):
        """One power iteration per training forward; the memory-saving backward (inverse and
        recomputation) reuses the forward's normalised weights; eval never iterates."""
        model = randomize_(self.build())
        x = torch.randn(1, 4, 8, 8, 8)

        def vectors() -> list[torch.Tensor]:
            convs = [m for m in model.modules() if isinstance(m, SpectralNormConv3d)]
            return [c.power_vector.clone() for c in convs]

        before = vectors()
        out = model(x)
        after_forward = vectors()
        assert all(not torch.equal(a, b) for a, b in zip(before, after_forward))
        out.square().mean().backward()
        assert all(torch.equal(a, b) for a, b in zip(after_forward, vectors()))
        model.eval()
        with torch.no_grad():
            model(x)
        assert all(torch.equal(a, b) for a, b in zip(after_forward, vectors()))

    def test_config_keys_reach_the_blocks(self):
        model = self.build("model.inverse_iterations=7", "model.coefficient=0.5")
        assert model.inverse_iterations == 7
        assert {b.conv1.coefficient for b in model.blocks()} == {0.5}
        assert len(model.fixup_parameters()) == 5 * len(model.blocks())
        assert isinstance(model, RevUpUNet)


def test_fixup_scalars_train_at_a_tenth_of_the_lr():
    from revseg.training.trainer import parameter_groups

    model = RevUpUNet(channels=(8, 16), encoder_depth=2, decoder_depth=1)
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-3), lr=1e-3)
    main, fixup = optimizer.param_groups
    assert main["lr"] == 1e-3 and fixup["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in fixup["params"]} == {id(p) for p in model.fixup_parameters()}
    assert len(fixup["params"]) == 5 * 6  # 5 scalars in each block: 2 levels x (2 + 1) blocks
    everything = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="fixup_lr_scale"):
        RevUpUNet(channels=(8, 16), fixup_lr_scale=0)
