"""Every option of every config group composes, and instantiates to what the trainer expects."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from revseg.config import CONFIG_DIR, group_options

from conftest import compose_train

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


def test_every_group_has_options():
    assert {
        "model",
        "data",
        "loss",
        "optimizer",
        "scheduler",
        "trainer",
        "callbacks",
        "logger",
    } <= set(GROUPS)
    assert all(group_options(g) for g in GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}"]
    if group == "data" or option.startswith(("brats", "davis")):  # real data needs a root
        overrides.append(f"data.root={tmp_path / 'data'}")
    cfg = compose_train(*overrides)
    # the composed config always holds a complete model, data, loss and optimizer
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, nn.Module)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    if cfg.get("scheduler"):
        optimizer.step()
        instantiate(cfg.scheduler)(optimizer=optimizer).step()
    loss = instantiate(cfg.loss)
    target = torch.randint(0, 2, (1, 3, 4, 4, 4)).float()
    assert loss(torch.randn(1, 3, 4, 4, 4), target).ndim == 0
    for callback in (cfg.get("callbacks") or {}).values():
        assert hasattr(instantiate(callback), "state_dict")
    if cfg.get("logger"):
        instantiate(cfg.logger, log_dir=str(tmp_path / "tb")).close()
    data = instantiate(cfg.data, _convert_="all")  # constructing validates; setup() reads files
    if group not in ("model", "data"):
        # a model or data option alone is paired with the other group's default (a video model
        # with BraTS data); experiments and the other groups must compose a matching pair
        assert data.in_channels == cfg.model.in_channels
        assert data.out_channels == cfg.model.out_channels
