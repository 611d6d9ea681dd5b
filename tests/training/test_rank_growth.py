"""The adaptive block-rank schedule: grows on a plateau, shrinks on over-fitting, saves state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from revseg.training.rank_growth import BlockRankSchedule


class RankedModel(nn.Module):
    """Stands in for HyperbolicNet: one parameter block per rank unit on the coarse level."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ParameterList([nn.Parameter(torch.ones(2)) for _ in range(4)])

    def ranks(self) -> list[int]:
        return [6, len(self.blocks), 6]

    def set_ranks(self, rank: int, init: str = "small", scale: float = 1e-2) -> list[int]:
        while len(self.blocks) < rank:
            self.blocks.append(nn.Parameter(torch.zeros(2)))
        if len(self.blocks) > rank:
            self.blocks = nn.ParameterList(list(self.blocks)[:rank])
        return self.ranks()


def fake_trainer(model: nn.Module) -> SimpleNamespace:
    optimizer = torch.optim.Adam(model.parameters())
    trainer = SimpleNamespace(network=model, epoch=0, writer=None, optimizer=optimizer, synced=0)

    def sync():
        optimizer.param_groups[0]["params"] = list(model.parameters())
        trainer.synced += 1

    trainer.sync_optimizer_params = sync
    return trainer


def run_epochs(cb, trainer, losses, vals=None):
    for i, loss in enumerate(losses):
        trainer.epoch += 1
        cb.on_train_epoch_end(trainer, {"train/loss": loss})
        if vals is not None:
            cb.on_validation_end(trainer, {"val/dice_mean": vals[i]})


def test_grows_when_the_training_loss_stalls_and_keeps_old_parameters():
    model = RankedModel()
    trainer = fake_trainer(model)
    cb = BlockRankSchedule(ranks=[4, 8], patience=2, threshold=0.01, shrink=False)
    cb.on_train_start(trainer)
    old = list(model.parameters())
    run_epochs(cb, trainer, [1.0, 0.8, 0.6])  # improving: no change
    assert model.ranks()[1] == 4
    run_epochs(cb, trainer, [0.599, 0.598])  # < 1 % better for 2 epochs: grow
    assert model.ranks()[1] == 8
    assert list(model.parameters())[:4] == old  # the same Parameter objects
    assert trainer.optimizer.param_groups[0]["params"] == list(model.parameters())
    assert cb.summary()["ranks"]["current"] == [6, 8, 6]
    (event,) = cb.summary()["ranks"]["history"]
    assert event["epoch"] == 5 and event["from"] == [6, 4, 6] and event["to"] == [6, 8, 6]
    run_epochs(cb, trainer, [0.598] * 5)  # the schedule's end: stays
    assert model.ranks()[1] == 8


def test_shrinks_when_validation_worsens_while_training_improves():
    model = RankedModel()
    trainer = fake_trainer(model)
    cb = BlockRankSchedule(ranks=[4, 8], patience=1, shrink=True, shrink_patience=2)
    cb.on_train_start(trainer)
    run_epochs(cb, trainer, [1.0, 1.0], vals=[0.5, 0.6])  # stall -> grow to 8
    assert model.ranks()[1] == 8
    run_epochs(cb, trainer, [0.9, 0.8, 0.7], vals=[0.7, 0.65, 0.6])  # train better, val worse
    assert model.ranks()[1] == 4
    assert cb.history[-1]["reason"].startswith("over-fitting")


def test_state_round_trip():
    model = RankedModel()
    trainer = fake_trainer(model)
    cb = BlockRankSchedule(ranks=[4, 8], patience=1)
    cb.on_train_start(trainer)
    run_epochs(cb, trainer, [1.0, 1.0])
    restored = BlockRankSchedule(ranks=[4, 8], patience=1)
    restored.load_state_dict(cb.state_dict())
    assert restored.state_dict() == cb.state_dict()
    restored.on_train_start(trainer)  # resumed: takes the model's ranks, changes nothing
    assert model.ranks()[1] == 8 and restored.summary() == cb.summary()


def test_needs_a_ranked_model():
    cb = BlockRankSchedule()
    with pytest.raises(TypeError, match="ranks"):
        cb.on_train_start(fake_trainer(nn.Linear(2, 2)))
