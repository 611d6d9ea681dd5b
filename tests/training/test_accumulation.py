"""Gradient accumulation in training: one optimizer step per trainer.accumulate_grad_batches
batches (the epoch's last group may be shorter), recorded in summary.json and planned; a run
resumed after an epoch continues exactly."""

from __future__ import annotations

import torch

from revseg.training.checkpoint import load_checkpoint
from revseg.training.trainer import train

from conftest import TINY, compose_train


def test_steps_per_epoch_and_exact_resume(tmp_path, tiny_data_root):
    common = [
        *TINY,
        f"data.root={tiny_data_root}",
        "~logger",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_epochs=2",
    ]
    straight = train(compose_train(*common, f"paths.output_dir={tmp_path / 'a'}"))
    assert straight["global_step"] == 4  # groups of 2 and 1 per epoch
    assert straight["accumulate_grad_batches"] == 2
    assert straight["planned_peak_bytes"] > 0
    train(compose_train(*common, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'b'}"))
    resumed = train(
        compose_train(*common, "trainer.resume=true", f"paths.output_dir={tmp_path / 'b'}")
    )
    assert resumed["global_step"] == 4
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_plan_holds_the_gradients_through_a_later_micro_batch():
    from revseg.memory.plan import compose_train_config, step_model_from_config

    sizes = [16, 16, 16]
    overrides = [*TINY[:2], "data.crop_size=[16,16,16]", "data.patch_size=null"]
    one, two = (
        step_model_from_config(
            compose_train_config([*overrides, f"trainer.accumulate_grad_batches={k}"]),
            spatial=sizes,
        ).checked_plan(sizes)
        for k in (1, 2)
    )
    grads = 4 * one.params  # float32 gradients of every parameter
    assert two.peak_bytes > one.peak_bytes
    assert two.peak_bytes <= one.peak_bytes + grads
    assert any("accumulation" in note for note in two.notes)
