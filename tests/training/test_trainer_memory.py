"""The trainer's memory report: per-epoch peaks, validation and callbacks measured too."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from revseg.training.callbacks import Callback
from revseg.training.trainer import Trainer

from conftest import TINY, compose_train

BIG = 2**22  # float32 elements: 16 MiB, far above the tiny model's steps


class Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.setdefault(tag, {})[step] = value

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class Allocates(Callback):
    """A big temporary in the forward of epoch 1 only, and one in each validation's callback."""

    def on_train_start(self, trainer) -> None:
        def hook(module, args, output):
            if trainer.epoch == 0 and module.training:
                torch.zeros(BIG).add_(1)

        trainer.module.register_forward_hook(hook)

    def on_validation_end(self, trainer, metrics) -> None:
        torch.ones(2 * BIG).sum()


def make_trainer(tmp_path, tiny_data_root, callbacks) -> Trainer:
    cfg = compose_train(
        *TINY,
        f"data.root={tiny_data_root}",
        f"paths.output_dir={tmp_path}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    )
    model = instantiate(cfg.model, _convert_="all")
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    data = instantiate(cfg.data, _convert_="all")
    data.setup()
    loss = instantiate(cfg.loss)
    device = torch.device("cpu")
    return Trainer(cfg, model, data, loss, optimizer, None, callbacks, Writer(), tmp_path, device)


def test_epoch_peaks_validation_and_callbacks_are_reported(tmp_path, tiny_data_root):
    trainer = make_trainer(tmp_path, tiny_data_root, {"allocates": Allocates()})
    summary = trainer.fit()
    peaks = trainer.writer.scalars["memory/peak_mib"]
    # each epoch's own peak, not a running maximum: the big temporary was in epoch 1 only
    assert peaks[1] > BIG * 4 / 2**20 > peaks[2] > 0
    assert summary["peak_memory_bytes"] == max(peaks.values()) * 2**20
    # validation and callbacks are measured too, each on its own
    assert 0 < summary["val_peak_memory_bytes"] < BIG * 4
    assert summary["callbacks_peak_memory_bytes"] >= 2 * BIG * 4
    for tag in ("memory/val_peak_mib", "memory/callbacks_peak_mib"):
        assert set(trainer.writer.scalars[tag]) == {1, 2}
    # the CUDA allocator's reserve is reported on CUDA only
    assert summary["peak_reserved_bytes"] is None
    assert "memory/reserved_peak_mib" not in trainer.writer.scalars
