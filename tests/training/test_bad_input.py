"""Bad input a new user gives: one line naming the file, key or checkpoint, before training."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import run_python
from revseg.config import check_key_overrides, compose_config
from revseg.errors import ConfigError
from revseg.training.trainer import train

from conftest import REPO, TINY, compose_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_root):
    """A finished one-epoch prev_unet run (its overrides, its directory)."""
    run = tmp_path_factory.mktemp("run")
    overrides = [*TINY, f"data.root={tiny_data_root}", f"paths.output_dir={run}", "~logger"]
    train(compose_train(*overrides))
    return overrides, run


def test_resume_with_another_model_names_the_checkpoints_model(trained, tmp_path):
    overrides, run = trained
    # checked before the data is read: a missing data root is not what is reported
    cfg = compose_train(
        *overrides,
        "model=unet_baseline",
        "trainer.resume=true",
        "trainer.max_epochs=2",
        f"data.root={tmp_path / 'nowhere'}",
    )
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert str(info.value) == (
        f"trainer.resume: {run / 'checkpoints' / 'last.pt'} holds prev_unet, not unet_baseline: "
        "resume with model=prev_unet, or start a new run in another directory"
    )


def test_resume_with_other_model_settings_names_them(trained):
    overrides, run = trained
    cfg = compose_train(
        *overrides, "model.channels=[8,16,32]", "trainer.resume=true", "trainer.max_epochs=2"
    )
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"trainer.resume: {run / 'checkpoints' / 'last.pt'} was trained with other settings: "
        "model.channels=[8, 16, 32] (was [8, 16, 24]); "
    )
    # said to be intended, the weights still cannot fit: the checkpoint's model is named
    with pytest.raises(ConfigError) as info:
        train(
            compose_train(
                *overrides,
                "model.channels=[8,16,32]",
                "trainer.resume=true",
                "trainer.max_epochs=2",
                "trainer.resume_changes=[model.channels]",
            )
        )
    assert str(info.value).startswith(
        f"trainer.resume: {run / 'checkpoints' / 'last.pt'} does not fit this "
        "prev_unet model (prev_unet with model.channels=[8, 16, 24]): "
    )


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return run_python("train.py", *args, cwd=cwd)


def assert_one_line(proc: subprocess.CompletedProcess, line: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {line}"]


def test_typo_in_a_key_names_the_nearest_key(tmp_path):
    proc = run_cli("trainer.max_epoch=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line(
        proc,
        "trainer.max_epoch: no such config key; did you mean trainer.max_epochs? "
        "(a new key is given as +trainer.max_epoch=3)",
    )
    assert not (tmp_path / "run").exists()
    # the keys are those of the chosen options; scripts compose the same way
    check_key_overrides("train", ["model=hyperbolic_blr", "model.layers=[1,1,1]"])
    with pytest.raises(ConfigError, match=r"^model.channel: .* did you mean model.channels\?"):
        compose_config("train", ["model.channel=[8,16]"])
    with pytest.raises(ConfigError, match=r"^predict.treshold: .* did you mean predict.threshold"):
        compose_config("predict", ["run=x", "input=y", "output=z", "predict.treshold=0.3"])


def test_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli(f"hydra.run.dir={blocker / 'run'}")
    assert_one_line(
        proc, f"hydra.run.dir={blocker / 'run'}: cannot make the run directory: {blocker} is a file"
    )


@pytest.mark.parametrize("root", ["/proc", "/sys"])
def test_run_dir_in_a_system_folder_is_one_line(root):
    """``os.access`` says yes to root there; making the folder fails (issue 22, item 7)."""
    if not os.path.isdir(root):
        pytest.skip(f"no {root} on this system")
    proc = run_cli(f"hydra.run.dir={root}/revseg_run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: hydra.run.dir={root}/revseg_run: cannot make the run directory")


def test_unwritable_checkpoint_directory_fails_before_training(tmp_path, tiny_data_root):
    (tmp_path / "checkpoints").write_text("")  # in the way of checkpoints/last.pt
    cfg = compose_train(*TINY, f"data.root={tiny_data_root}", f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"^the checkpoint directory: cannot write to .*"):
        train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # nothing trained


def test_a_run_failing_on_its_config_leaves_no_run_directory(tmp_path, tiny_data_root):
    run = tmp_path / "run"
    assert_one_line(
        run_cli("trainer.max_epochs=0", f"hydra.run.dir={run}"),
        "trainer.max_epochs must be a positive int, got 0",
    )
    assert not run.exists()
    missing = tmp_path / "nowhere"
    proc = run_cli(*TINY, f"data.root={missing}", "data=brats", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and not run.exists()
    # a directory holding anything else is left as it is
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    proc = run_cli("trainer.max_epochs=0", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and (run / "notes.txt").read_text() == "mine"


def test_objects_all_needs_as_many_output_channels(tmp_path):
    from conftest import TINY_VIDEO

    common = [
        "model=hyperbolic_blr",
        *TINY_VIDEO,
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
        f"data.root={tmp_path / 'video'}",
        f"paths.output_dir={tmp_path / 'run'}",
        "~logger",
        "data.objects=all",
    ]
    with pytest.raises(ConfigError) as info:
        train(compose_train(*common))
    assert str(info.value) == (
        "model.out_channels=1 but the data gives 2 label channels with data.objects=all "
        "(object1, object2): set model.out_channels=2"
    )
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert train(compose_train(*common, "model.out_channels=2"))["epochs_completed"] == 1


def test_resuming_a_finished_run_keeps_its_summary(trained):
    overrides, run = trained
    summary = run / "summary.json"
    before = summary.read_text()
    assert json.loads(before)["rss_peak_bytes"] is not None
    again = train(compose_train(*overrides, "trainer.resume=true"))
    assert summary.read_text() == before
    assert again == json.loads(before)
