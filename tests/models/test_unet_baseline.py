"""The non-reversible baseline, and its gradient checkpointing option (same outputs and
gradients as plain autograd, less memory kept for backward)."""

from __future__ import annotations

import copy

import torch

from revseg.memory.measure import PeakMemoryMeter, SavedTensorsCounter
from revseg.models.unet_baseline import UNetBaseline

from model_tester import ModelTester, rel_err


class TestUNetBaseline(ModelTester):
    config_name = "unet_baseline"
    expected_params = 12.4e6  # Brügger et al. 2019, sec. 2.2
    tiny = ("model.channels=[4,8,16]", "model.norm_groups=2")

    def test_checkpointing_is_a_config_key_off_by_default(self):
        assert self.build().checkpointing is False
        assert self.build("model.checkpointing=true").checkpointing is True


def tiny_pair() -> tuple[UNetBaseline, UNetBaseline]:
    """The same float64 weights without and with checkpointing."""
    torch.manual_seed(0)
    plain = UNetBaseline(channels=[4, 8, 16], norm_groups=2).double()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    return plain, checkpointed


def test_checkpointing_gives_the_same_outputs_and_gradients():
    x = torch.randn(2, 4, 8, 8, 16, dtype=torch.float64)
    results = []
    for model in tiny_pair():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out.pow(2).mean() + out.sigmoid().sum()).backward()
        results.append((out.detach(), xi.grad, [p.grad for p in model.parameters()]))
    (o1, gx1, g1), (o2, gx2, g2) = results
    assert torch.equal(o1, o2)
    assert rel_err(gx2, gx1) < 1e-12
    assert len(g1) == len(g2) and all(g is not None for g in g2)
    assert max(rel_err(b, a) for a, b in zip(g1, g2)) < 1e-12


def test_checkpointing_keeps_less_for_backward():
    x = torch.randn(1, 4, 16, 16, 16, requires_grad=True)
    saved, kept, peak = [], [], []
    for model in tiny_pair():
        model.float()
        params = list(model.parameters())
        with SavedTensorsCounter(exclude=params) as counter:
            model(x)
        saved.append(counter.bytes)
        # what the graph keeps alive after forward, inputs of checkpointed blocks included
        with PeakMemoryMeter("cpu").measure(static=[params, x]) as m:
            out = model(x)
        kept.append(m.end_bytes - m.baseline_bytes - out.nbytes)
        del out
        for p in params:
            p.grad = torch.zeros_like(p)
        with PeakMemoryMeter("cpu").measure(static=[params, [p.grad for p in params], x]) as m:
            model(x).square().mean().backward()
        peak.append(m.peak_bytes - m.baseline_bytes)
    assert saved[1] < saved[0] / 2, saved
    assert kept[1] < kept[0] / 2, kept
    assert peak[1] < peak[0], peak


def test_checkpointing_is_off_in_eval():
    _, model = tiny_pair()
    x = torch.randn(1, 4, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    sizes = []
    for train in (True, False):
        model.train(train)
        with SavedTensorsCounter(exclude=model.parameters()) as counter:
            model(x)
        sizes.append(counter.bytes)
    assert sizes[0] < sizes[1], sizes  # eval with grad enabled: plain autograd
