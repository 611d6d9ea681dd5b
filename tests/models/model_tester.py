"""A shared tester that every model's test file subclasses with its config name.

Checks the composed config instantiates to a module mapping ``(B, C_in, D, H, W)`` to
``(B, C_out, D, H, W)`` logits, the parameter count of the paper's size and, for reversible
models, exact inverses, gradients equal to plain autograd and saved memory flat in depth.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from helpers import rel_err
from revseg.memory.measure import SavedTensorsCounter
from revseg.nn.reversible import ReversibleSequence, reversible_parts

from conftest import compose_train


class ModelTester:
    """Subclass and set the class attributes; pytest collects the ``test_`` methods."""

    config_name: str = ""
    expected_params: float = 0.0  # of the default config, in parameters
    tiny: tuple[str, ...] = ()  # overrides for a model that runs in milliseconds
    tiny_shape: tuple[int, int, int] = (16, 16, 16)
    in_channels: int = 4
    out_channels: int = 3

    def build(self, *overrides: str, tiny: bool = True) -> nn.Module:
        cfg = compose_train(f"model={self.config_name}", *(self.tiny if tiny else ()), *overrides)
        return instantiate(cfg.model, _convert_="all")

    def test_default_config_has_the_papers_size(self):
        model = self.build(tiny=False)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - self.expected_params) / self.expected_params < 0.005, n

    def test_default_config_forward_shape(self):
        model = self.build(tiny=False).eval()
        with torch.no_grad():
            out = model(torch.randn(1, self.in_channels, 16, 16, 16))
        assert out.shape == (1, self.out_channels, 16, 16, 16)

    @pytest.mark.parametrize("shape", [(16, 16, 16), (32, 16, 48)])
    def test_tiny_forward_backward_shapes(self, shape):
        model = self.build()
        x = torch.randn(2, self.in_channels, *shape, requires_grad=True)
        out = model(x)
        assert out.shape == (2, self.out_channels, *shape)
        out.mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert all(p.grad is not None for p in model.parameters())

    def test_rejects_sizes_not_divisible_by_the_downsampling(self):
        model = self.build()
        with pytest.raises(ValueError, match=f"divisible by {model.divisor}"):
            model(torch.randn(1, self.in_channels, 10, 16, 16))

    def test_divisor_is_the_rule_the_forward_applies(self):
        # `divisor` is what train() checks data.crop_size against before reading data
        model = self.build().eval()
        d = model.divisor
        assert isinstance(d, int) and d > 1
        with torch.no_grad():
            assert model(torch.randn(1, self.in_channels, d, 2 * d, d)).shape[2:] == (d, 2 * d, d)
            with pytest.raises(ValueError, match=f"divisible by {d}"):
                model(torch.randn(1, self.in_channels, d, d + d // 2, d))


class ReversibleModelTester(ModelTester):
    """Adds the checks of the reversible core on every reversible sequence of the model."""

    def depth_overrides(self, depth: int) -> tuple[str, ...]:
        return (f"model.encoder_depth={depth}", f"model.decoder_depth={depth}")

    def test_memory_saving_is_a_config_key(self):
        assert all(s.memory_saving for s in self.sequences(self.build()))
        assert not any(
            s.memory_saving for s in self.sequences(self.build("model.memory_saving=false"))
        )

    part_type: type = ReversibleSequence  # the class of every reversible part of the model
    part_count: int | None = None  # how many there are, where the design fixes it

    def test_reversible_parts_are_found(self):
        parts = self.sequences(self.build())
        assert all(isinstance(p, self.part_type) for p in parts), parts
        assert self.part_count is None or len(parts) == self.part_count

    @staticmethod
    def sequences(model: nn.Module) -> list[nn.Module]:
        """The model's reversible parts (:func:`~revseg.nn.reversible.reversible_parts`)."""
        seqs = [m for _, m in reversible_parts(model)]
        assert seqs, "a reversible model must contain reversible parts"
        return seqs

    def test_every_sequence_inverts(self):
        model = self.build(*self.depth_overrides(2)).double()
        torch.manual_seed(0)
        for seq in self.sequences(model):
            channels = seq.blocks[0].f.conv.in_channels * 2
            x = torch.randn(2, channels, 4, 4, 4, dtype=torch.float64)
            with torch.no_grad():
                assert rel_err(seq.inverse(seq(x)), x) < 1e-10

    # overrides that run the design's fused GN-LReLU-Conv units in slabs (model.chunks); empty
    # for designs without such units, which have no chunks to test
    chunked: tuple[str, ...] = ()
    # the design takes model.checkpointing (its resampling under gradient checkpointing), and
    # its resampling keeps tensors that no sequence keeps (max-pooling's indices)
    checkpointable: bool = False
    checkpointing_saves: bool = True

    def gradients_against_plain(self, *overrides: str) -> tuple[float, float, float]:
        """Relative errors (output, input gradient, worst parameter gradient) of the model with
        memory saving against plain autograd, float64, depth 2."""
        torch.manual_seed(0)
        saving = self.build(*self.depth_overrides(2), *overrides).double()
        plain = copy.deepcopy(saving)
        for seq in self.sequences(plain):
            seq.memory_saving = False
        x = torch.randn(2, self.in_channels, *self.tiny_shape, dtype=torch.float64)
        grads = []
        for model in (saving, plain):
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            (out.pow(2).mean() + out.sigmoid().sum()).backward()
            grads.append((out.detach(), xi.grad, [p.grad for p in model.parameters()]))
        (o1, gx1, g1), (o2, gx2, g2) = grads
        return rel_err(o1, o2), rel_err(gx1, gx2), max(rel_err(a, b) for a, b in zip(g1, g2))

    def test_gradients_equal_plain_autograd(self):
        out, grad_x, grad_p = self.gradients_against_plain()
        assert out < 1e-12
        assert grad_x < 1e-6
        assert grad_p < 1e-6, grad_p

    def test_chunked_gradients_equal_plain_autograd(self):
        if not self.chunked:
            pytest.skip(f"{self.config_name} has no GN-LReLU-Conv couplings to run in slabs")
        out, grad_x, grad_p = self.gradients_against_plain(*self.chunked)
        assert out < 1e-12
        assert grad_x < 1e-10
        assert grad_p < 1e-10, grad_p

    def test_checkpointing_keeps_gradients_and_saves_memory(self):
        if not self.checkpointable:
            pytest.skip(f"{self.config_name} has no model.checkpointing")
        x = torch.randn(1, self.in_channels, *self.tiny_shape, requires_grad=True)
        grads, saved = [], []
        for on in (False, True):
            torch.manual_seed(0)
            model = self.build(f"model.checkpointing={on}").train()
            with SavedTensorsCounter(exclude=model.parameters()) as counter:
                out = model(x)
            saved.append(counter.bytes)
            x.grad = None
            out.square().mean().backward()
            grads.append([x.grad.clone(), *(p.grad for p in model.parameters())])
        assert saved[1] < saved[0] if self.checkpointing_saves else saved[1] == saved[0], saved
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))

    def saved_bytes(self, depth: int, memory_saving: bool) -> int:
        model = self.build(*self.depth_overrides(depth), f"model.memory_saving={memory_saving}")
        x = torch.randn(1, self.in_channels, *self.tiny_shape, requires_grad=True)
        with SavedTensorsCounter(exclude=model.parameters()) as counter:
            model(x)
        return counter.bytes

    def test_saved_memory_does_not_grow_with_depth(self):
        saving = [self.saved_bytes(d, True) for d in (1, 2, 4)]
        assert saving[0] == saving[1] == saving[2], saving
        plain = [self.saved_bytes(d, False) for d in (1, 2, 4)]
        assert plain[0] < plain[1] < plain[2], plain
        assert saving[0] < plain[0]
