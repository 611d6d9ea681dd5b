"""End to end: the CLI trains, writes what contract 4 promises, resumes, and fails in one line."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from helpers import run_python
from revseg.config import CONFIG_DIR, group_options
from revseg.training.checkpoint import load_checkpoint
from revseg.training.trainer import train

from conftest import TINY, TINY_NO_GROUPS, TINY_VIDEO, compose_train

SUMMARY_KEYS = {
    "model",
    "data",
    "epochs_completed",
    "best_metric",
    "final_metrics",
    "params",
    "peak_memory_bytes",
    "memory_method",
    "step_time_s",
    "voxels_per_sample",
    "bytes_per_voxel",
    "device",
}


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_python("train.py", *args, timeout=timeout)


def test_cli_trains_one_epoch_then_resumes(tmp_path, tiny_data_root):
    run = tmp_path / "run"
    args = [*TINY, "metrics.hd95=true", f"data.root={tiny_data_root}", f"hydra.run.dir={run}"]
    first = run_cli(*args, "metrics.lesion_wise=true")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["model"] == "prev_unet" and summary["data"] == "synthetic_brats"
    assert summary["epochs_completed"] == 1
    assert (
        summary["best_metric"]["name"] == "val/dice_mean" and summary["best_metric"]["epoch"] == 1
    )
    assert 0.0 <= summary["final_metrics"]["val/dice_mean"] <= 1.0
    assert "val/hd95_WT" in summary["final_metrics"]
    assert {"val/lesion_dice_WT", "val/tp_ET", "val/fn_TC"} <= summary["final_metrics"].keys()
    # the peak includes parameters, gradients and Adam's two moments at least
    assert summary["peak_memory_bytes"] > 4 * 4 * summary["params"]
    assert summary["bytes_per_voxel"] == pytest.approx(summary["peak_memory_bytes"] / 16**3)
    assert summary["memory_method"] == "cpu_tensor_tracker"
    # the planner's prediction at start agrees with the measured peak (issue: within 15 %)
    assert abs(summary["planned_peak_bytes"] / summary["peak_memory_bytes"] - 1) < 0.15
    assert (run / ".hydra" / "config.yaml").is_file()
    assert_tensorboard_run(run)
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / "checkpoints" / name)
        assert ckpt["epoch"] == 1 and "encoder_depth: 1" in ckpt["config"]
    assert not list((run / "checkpoints").glob(".*.tmp"))

    second = run_cli(*args, "trainer.max_epochs=2", "trainer.resume=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr + second.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2
    assert summary["global_step"] == 2 * 3  # 3 training cases per epoch
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_resume_continues_exactly(tmp_path, tiny_data_root):
    """1 epoch + resume for a 2nd gives the weights of 2 epochs in one go (CPU)."""
    common = [*TINY, f"data.root={tiny_data_root}", "~logger", "trainer.max_epochs=2"]
    straight = train(compose_train(*common, f"paths.output_dir={tmp_path / 'a'}"))
    train(compose_train(*common, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'b'}"))
    resumed = train(
        compose_train(*common, "trainer.resume=true", f"paths.output_dir={tmp_path / 'b'}")
    )
    assert resumed["epochs_completed"] == straight["epochs_completed"] == 2
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_tensorboard_run(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[str]] = {"scalars": [], "images": [], "hparams": []}
    for path in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags["scalars"] += acc.Tags()["scalars"]
        tags["images"] += acc.Tags()["images"]
        try:
            tags["hparams"] += list(acc.PluginTagToContent("hparams"))
        except KeyError:  # this event file holds no hparams
            pass
    expected = {
        "train/loss",
        "train/loss_step",
        "val/loss",
        "val/dice_WT",
        "val/dice_TC",
        "val/dice_ET",
        "val/dice_mean",
        "val/hd95_WT",
        "lr",
        "memory/peak_mib",
        "memory/peak_step_mib",
        "time/step_s",
        "hparam/dice_mean",
    }
    assert expected <= set(tags["scalars"]), expected - set(tags["scalars"])
    assert tags["images"] == ["val/slice_input_label_prediction"]
    assert "_hparams_/session_start_info" in tags["hparams"]


# a tiny variant of each model, on data it takes (the U-Nets use TINY's BraTS-like volumes)
TINY_MODEL = {"hyperbolic_blr": TINY_VIDEO}
# models on TINY's volumes whose channels follow another rule than TINY's [8, 16, 24]
TINY_CHANNELS = {"hybrid_revnet": ("model.channels=[4,32,32]",)}


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_trains(tmp_path, tiny_data_root, model):
    if model in TINY_MODEL:
        overrides = [
            *TINY_MODEL[model],
            f"data.root={tmp_path / 'data'}",
            "trainer.max_epochs=2",
            "trainer.progress_bar=false",
        ]
    else:
        has_groups = "norm_groups" in OmegaConf.load(CONFIG_DIR / "model" / f"{model}.yaml")
        tiny = TINY if has_groups else TINY_NO_GROUPS
        overrides = [*tiny, *TINY_CHANNELS.get(model, ()), f"data.root={tiny_data_root}"]
    summary = train(
        compose_train(f"model={model}", *overrides, f"paths.output_dir={tmp_path}", "~logger")
    )
    assert summary["epochs_completed"] >= 1 and summary["peak_memory_bytes"] > 0
    assert 0.0 <= summary["final_metrics"]["val/dice_mean"] <= 1.0
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    if "ranks" in summary:  # a model whose block rank adapts: its schedule is reported
        assert summary["ranks"]["current"]
        resumed = train(
            compose_train(
                f"model={model}",
                *overrides,
                "trainer.max_epochs=3",
                "trainer.resume=true",
                f"paths.output_dir={tmp_path}",
                "~logger",
            )
        )
        assert resumed["epochs_completed"] == 3
        assert (
            resumed["ranks"]["history"][: len(summary["ranks"]["history"])]
            == summary["ranks"]["history"]
        )


def test_resume_keeps_a_models_own_parameter_groups(tmp_path, tiny_data_root):
    """RevUp's Fixup scalars live in a second optimizer group (0.1x lr): resume restores both."""
    overrides = [
        *TINY_NO_GROUPS,
        f"data.root={tiny_data_root}",
        f"paths.output_dir={tmp_path}",
        "~logger",
    ]
    train(compose_train("model=revup_unet", *overrides))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    resumed = train(
        compose_train("model=revup_unet", *overrides, "trainer.max_epochs=2", "trainer.resume=true")
    )
    assert resumed["epochs_completed"] == 2
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([1e-3, 1e-4])


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_model_is_one_line():
    proc = run_cli("model=no_such_model")
    assert_one_line_error(proc, "model=no_such_model", "prev_unet", "unet_baseline")


def test_missing_data_root_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_cli("data=brats", f"data.root={missing}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, str(missing))


def test_required_data_root_is_one_line(tmp_path):
    proc = run_cli("data=brats", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "data.root")


def test_indivisible_crop_is_one_line(tmp_path):
    proc = run_cli("data.crop_size=[30,32,32]", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "data.crop_size", "16")


def test_val_before_training_records_the_untrained_metrics(tmp_path, tiny_data_root):
    """``trainer.val_before_training``: the untrained network's metrics in summary.json, kept
    across a resume, and the validation scalars at epoch 0 in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [*TINY, f"data.root={tiny_data_root}", f"paths.output_dir={tmp_path}"]
    first = train(compose_train(*common, "trainer.val_before_training=true"))
    untrained = first["initial_metrics"]
    assert set(untrained) == set(first["final_metrics"])
    assert 0.0 <= untrained["val/dice_mean"] <= 1.0
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    steps = [e.step for e in events.Scalars("val/dice_mean")]
    assert steps == [0, 1]
    assert events.Scalars("val/dice_mean")[0].value == pytest.approx(untrained["val/dice_mean"])
    resumed = train(
        compose_train(
            *common, "trainer.val_before_training=true", "trainer.resume=true",
            "trainer.max_epochs=2",
        )
    )  # fmt: skip
    assert resumed["initial_metrics"] == untrained
    assert train(compose_train(*common, "trainer.overwrite=true"))["initial_metrics"] is None
