"""The one training step (revseg.step.TrainStep): the only place an optimizer steps; gradient
accumulation gives the update of the whole batch; DDP's all-reduce deferred but on the last
micro-batch; a non-finite step drops its gradients."""

from __future__ import annotations

import ast
import contextlib
import copy

import pytest
import torch
from torch import nn

from helpers import rel_err
from revseg.step import NON_FINITE, TrainStep

from conftest import REPO


def test_no_other_file_steps_an_optimizer():
    """Every optimisation step in the code base goes through TrainStep (tests aside)."""
    found = []
    for path in sorted((REPO / "src").rglob("*.py")):
        if path.name == "step.py" and path.parent.name == "revseg":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                receiver = ast.unparse(node.func.value).lower()
                if node.func.attr == "step" and ("optim" in receiver or "scaler" in receiver):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "optimizer/scaler stepped outside revseg.step:\n" + "\n".join(found)


def net() -> nn.Module:
    torch.manual_seed(0)  # GroupNorm: no statistics across the batch
    return nn.Sequential(
        nn.Conv3d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.LeakyReLU(), nn.Conv3d(6, 1, 1)
    ).double()


def mse(logits, target, mask):
    return (logits - target).pow(2).mean()


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_k_micro_batches_give_the_update_of_one_batch_of_k(optimizer):
    x = torch.randn(4, 2, 5, 5, 5, dtype=torch.float64)
    y = torch.randn(4, 1, 5, 5, 5, dtype=torch.float64)
    whole, parts = net(), net()
    for model, batches in (
        (whole, [(x, y, None)]),
        (parts, [(x[i : i + 1], y[i : i + 1], None) for i in range(4)]),
    ):
        step = TrainStep(model, optimizer(model.parameters(), lr=0.1), mse)
        result = step(batches)
        assert result.skipped is None
        model.loss = result.loss
    assert rel_err(parts.loss, whole.loss) < 1e-14
    for a, b in zip(parts.parameters(), whole.parameters()):
        assert rel_err(a, b) < 1e-12


def test_ddp_all_reduce_waits_for_the_last_micro_batch():
    model = net()
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(True)
        yield

    x = torch.randn(3, 2, 4, 4, 4, dtype=torch.float64)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse, no_sync=no_sync)
    step([(x[i : i + 1], x[i : i + 1, :1], None) for i in range(3)])
    assert len(entered) == 2


def test_a_non_finite_loss_drops_the_gradients_and_keeps_the_weights():
    model = net()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    nan = torch.full_like(x[:, :1], float("nan"))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    result = step([(x[:1], x[:1, :1], None), (x[1:], nan[1:], None)])
    assert result.skipped == NON_FINITE
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_step_needs_a_micro_batch():
    model = net()
    with pytest.raises(ValueError, match="at least one micro-batch"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)([])
