"""Crash safety: SIGKILL at any moment and resume give the same weights; NaN guard; flat memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from revseg.errors import TrainingError
from revseg.training import trainer as trainer_module
from revseg.training.checkpoint import load_checkpoint
from revseg.training.trainer import train

from conftest import REPO, TINY, compose_train

CLI = [
    *TINY,
    "trainer.max_epochs=3",
    "trainer.checkpoint_every_n_steps=1",
    "~logger",
    "trainer.deterministic=true",
]


def last_step(run) -> int:
    path = run / "checkpoints" / "last.pt"
    if not path.exists():
        return -1
    try:
        return int(load_checkpoint(path)["global_step"])
    except Exception:  # noqa: BLE001 - replaced while we read it
        return -1


def test_sigkill_at_several_points_then_resume_gives_the_same_weights(tmp_path, tiny_data_root):
    args = [*CLI, f"data.root={tiny_data_root}"]
    reference = tmp_path / "reference"
    done = subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.run.dir={reference}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    run = tmp_path / "killed"
    kills = []
    for first in (True, False):  # mid-epoch 1, then 3 steps later (3 training cases per epoch)
        # under load the poll may see a checkpoint late: the second kill follows the first
        kill_after = 2 if first else min(kills[0] + 3, 8)
        proc = subprocess.Popen(
            [
                sys.executable,
                "train.py",
                *args,
                f"hydra.run.dir={run}",
                "trainer.resume=" + ("true" if kills else "false"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while last_step(run) < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(last_step(run))
    assert 2 <= kills[0] < 9 and kills[0] <= kills[1] < 9, kills  # killed before the end
    final = subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.run.dir={run}", "trainer.resume=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr[-2000:]
    a = load_checkpoint(reference / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["global_step"] == b["global_step"] == 9
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 3
    assert not list((run / "checkpoints").glob(".*.tmp"))


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the loss NaN once, at one global step (1-based)."""

    def install(step: int):
        original = trainer_module.Trainer.compute_loss
        fired = []

        def compute_loss(self, logits, label, mask):
            loss = original(self, logits, label, mask)
            if self.network.training and self.global_step + 1 == step and not fired:
                fired.append(step)
                return loss * float("nan")
            return loss

        monkeypatch.setattr(trainer_module.Trainer, "compute_loss", compute_loss)

    return install


def test_nan_loss_stops_naming_step_and_case_and_keeps_the_checkpoint(
    tmp_path, tiny_data_root, nan_at_step
):
    common = [*TINY, f"data.root={tiny_data_root}", "~logger", f"paths.output_dir={tmp_path}"]
    train(compose_train(*common))
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    nan_at_step(5)  # the second step of epoch 2
    with pytest.raises(
        TrainingError,
        match=r"non-finite loss \(nan\) at epoch 2, step 5, case BraTS2021_\d+; "
        r"the last good checkpoint is",
    ):
        train(compose_train(*common, "trainer.max_epochs=2", "trainer.resume=true"))
    assert last.read_bytes() == before


def test_nan_policy_skip_goes_on(tmp_path, tiny_data_root, nan_at_step):
    nan_at_step(2)
    summary = train(
        compose_train(
            *TINY,
            f"data.root={tiny_data_root}",
            "~logger",
            f"paths.output_dir={tmp_path}",
            "trainer.nan_policy=skip",
        )
    )
    # global_step counts optimizer steps: 3 batches, one skipped
    assert summary["skipped_steps"] == 1 and summary["global_step"] == 2
    assert summary["epochs_completed"] == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, tiny_data_root, precision):
    summary = train(
        compose_train(
            *TINY,
            f"data.root={tiny_data_root}",
            "~logger",
            f"paths.output_dir={tmp_path}",
            f"trainer.precision={precision}",
        )
    )
    assert summary["precision"] == precision and summary["global_step"] == 3
    assert 0.0 <= summary["final_metrics"]["val/dice_mean"] <= 1.0


def test_long_runs_keep_memory_flat(tmp_path, tiny_data_root):
    """200 steps: live tensor bytes after a step do not grow, nor does the resident set."""
    cfg = compose_train(
        *TINY,
        f"data.root={tiny_data_root}",
        f"paths.output_dir={tmp_path}",
        "trainer.limit_val_batches=1",
    )
    from hydra.utils import instantiate

    model = instantiate(cfg.model, _convert_="all")
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    data = instantiate(cfg.data, _convert_="all")
    data.setup()
    writer = instantiate(cfg.logger, log_dir=str(tmp_path))
    tr = trainer_module.Trainer(
        cfg,
        model,
        data,
        instantiate(cfg.loss),
        optimizer,
        None,
        {},
        writer,
        tmp_path,
        torch.device("cpu"),
    )
    batch = next(iter(data.train_dataloader(seed=0)))

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    ends, rss_at = [], []
    for step in range(200):
        tr.training_step(batch["image"], batch["label"], None, ["x"])
        if step in (19, 199):
            ends.append(tr.last_measurement.end_bytes)  # live tensor bytes after the step
            rss_at.append(rss())
    writer.close()
    assert ends[0] == ends[1]
    assert rss_at[1] - rss_at[0] < 32 * 2**20, rss_at


def test_stale_temporary_files_already_removed_are_fine(tmp_path, monkeypatch):
    stale = [tmp_path / ".summary.json.x1.tmp", tmp_path / "checkpoints" / ".last.pt.x2.tmp"]
    stale[1].parent.mkdir()
    for path in stale:
        path.write_text("half written")
    unlink = type(tmp_path).unlink

    def another_process_first(self, missing_ok=False):
        unlink(self, missing_ok=True)  # another rank removed it between listing and removing
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(type(tmp_path), "unlink", another_process_first)
    trainer_module.remove_stale_temporaries(tmp_path)
    assert not any(path.exists() for path in stale)
