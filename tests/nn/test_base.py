"""Every model is a SegmentationModel: one input check, one memory_saving switch over its
reversible parts, one checkpoint wrapper."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from revseg.config import group_options
from revseg.nn.base import SegmentationModel
from revseg.nn.reversible import reversible_parts

from conftest import compose_train


def build(name: str):
    return instantiate(compose_train(f"model={name}").model, _convert_="all")


@pytest.mark.parametrize("name", group_options("model"))
def test_every_model_is_a_segmentation_model(name):
    model = build(name)
    assert isinstance(model, SegmentationModel) and model.divisor >= 1
    parts = [part for _, part in reversible_parts(model)]
    assert model.memory_saving == (bool(parts) and all(p.memory_saving for p in parts))
    if not parts:  # the baseline: nothing to switch
        model.memory_saving = False
        with pytest.raises(ValueError, match=f"^{type(model).__name__} has no reversible parts"):
            model.memory_saving = True
        return
    model.memory_saving = False
    assert not model.memory_saving and not any(p.memory_saving for p in parts)
    model.memory_saving = True
    assert model.memory_saving and all(p.memory_saving for p in parts)


@pytest.mark.parametrize("name", ["unet_baseline", "prev_unet", "hyperbolic_blr"])
def test_the_input_check_names_the_model_the_channels_and_the_divisor(name):
    model = build(name)
    wrong = torch.zeros(1, model.in_channels + 1, *[model.divisor] * 3)
    with pytest.raises(ValueError, match=rf"^{type(model).__name__} expects \(B, "):
        model(wrong)


def test_checkpoint_runs_the_module_under_checkpointing_only_in_training():
    calls = []

    class Counted(torch.nn.Linear):
        def forward(self, x):
            calls.append(torch.is_grad_enabled())
            return super().forward(x)

    model = SegmentationModel()
    model.checkpointing = True
    layer = Counted(2, 2)
    x = torch.ones(1, 2, requires_grad=True)
    model.checkpoint(layer, x).sum().backward()
    assert len(calls) == 2  # forward, then recomputed in backward
    model.eval()
    calls.clear()
    model.checkpoint(layer, x)
    assert len(calls) == 1
