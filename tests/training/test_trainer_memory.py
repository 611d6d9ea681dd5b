"""The trainer's memory report: per-epoch peaks, validation and callbacks measured too."""

from __future__ import annotations

import contextlib

import torch
from trainer_builder import make_trainer

from revseg.memory.measure import MemoryMeasurement
from revseg.training.callbacks import Callback

BIG = 2**22  # float32 elements: 16 MiB, far above the tiny model's steps


class Allocates(Callback):
    """A big temporary in the forward of epoch 1 only, and one in each validation's callback."""

    def on_train_start(self, trainer) -> None:
        def hook(module, args, output):
            if trainer.epoch == 0 and module.training:
                torch.zeros(BIG).add_(1)

        trainer.network.register_forward_hook(hook)

    def on_validation_end(self, trainer, metrics) -> None:
        torch.ones(2 * BIG).sum()


def test_epoch_peaks_validation_and_callbacks_are_reported(tmp_path, tiny_data_root):
    trainer = make_trainer(
        tmp_path, tiny_data_root, "trainer.max_epochs=2", callbacks={"allocates": Allocates()}
    )
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


class SteppedMeter:
    """A stand-in for the CUDA meter: the given peaks, one per measured block."""

    method = "cuda_max_memory_allocated"

    def __init__(self, peaks: list[int]) -> None:
        self.peaks = iter(peaks)

    @contextlib.contextmanager
    def measure(self, static=()):
        m = MemoryMeasurement(self.method)
        yield m
        m.peak_bytes = next(self.peaks)


def test_cudnn_autotuning_step_is_left_out_of_the_peak(tmp_path, tiny_data_root):
    trainer = make_trainer(tmp_path, tiny_data_root, "trainer.cudnn_benchmark=true")
    assert not trainer.autotune_first_step  # no cuDNN autotuner on the CPU
    trainer.autotune_first_step = True  # as on CUDA
    trainer.meter = SteppedMeter([1000, 100, 120])  # step 1 holds the autotuner's workspaces
    batch = next(iter(trainer.data.train_dataloader(seed=0)))
    for _ in range(3):
        trainer.training_step(batch["image"], batch["label"])
    summary = trainer.summary()
    assert (summary["peak_memory_bytes"], summary["autotune_peak_bytes"]) == (120, 1000)
    assert trainer.global_step == 3


def test_a_run_of_only_the_autotuning_step_reports_its_peak(tmp_path, tiny_data_root):
    trainer = make_trainer(tmp_path, tiny_data_root, "trainer.cudnn_benchmark=true")
    trainer.autotune_first_step = True
    trainer.meter = SteppedMeter([1000])
    batch = next(iter(trainer.data.train_dataloader(seed=0)))
    trainer.training_step(batch["image"], batch["label"])
    assert trainer.summary()["peak_memory_bytes"] == 1000
