"""A run directory holds one run at a time; a fresh run does not replace another's checkpoints
(issue 22, items 1 and 2)."""

from __future__ import annotations

import os
import socket

import pytest

from revseg.errors import ConfigError
from revseg.training.run_dir import check_fresh_run, claim_run_dir


def test_a_second_run_in_the_directory_is_refused_naming_the_holder(tmp_path):
    with claim_run_dir(tmp_path):
        with pytest.raises(ConfigError) as info, claim_run_dir(tmp_path):
            pass
        message = str(info.value)
        assert message.startswith(
            f"{tmp_path} is in use by process {os.getpid()} on {socket.gethostname()} since "
        )
        assert message.endswith("give this one another directory (hydra.run.dir=...)")
    with claim_run_dir(tmp_path):  # released when the first run ended
        pass


def test_a_fresh_run_does_not_replace_checkpoints(tmp_path):
    check_fresh_run(tmp_path, resume=False, overwrite=False)  # an empty directory
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds a run \\(checkpoints/last.pt\\)"):
        check_fresh_run(tmp_path, resume=False, overwrite=False)
    check_fresh_run(tmp_path, resume=True, overwrite=False)
    check_fresh_run(tmp_path, resume="other/last.pt", overwrite=False)
    check_fresh_run(tmp_path, resume=False, overwrite=True)


def one_batch_run(run_dir, data_root) -> list[str]:
    """Overrides of a tiny run in ``run_dir``: one training and one validation batch."""
    from conftest import TINY

    return [
        *TINY,
        f"data.root={data_root}",
        f"paths.output_dir={run_dir}",
        "~logger",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.plan_memory=false",
    ]


def test_train_refuses_a_fresh_run_over_checkpoints_and_a_held_directory(tmp_path, tiny_data_root):
    from revseg.training.checkpoint import CHECKSUM, load_checkpoint
    from revseg.training.run_dir import RunDirInUse
    from revseg.training.trainer import train

    from conftest import compose_train

    common = one_batch_run(tmp_path, tiny_data_root)
    train(compose_train(*common))
    last = tmp_path / "checkpoints" / "last.pt"
    assert CHECKSUM in load_checkpoint(last)
    before = last.read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(compose_train(*common))
    assert last.read_bytes() == before
    with claim_run_dir(tmp_path), pytest.raises(RunDirInUse, match="is in use by process"):
        train(compose_train(*common, "trainer.overwrite=true"))
    summary = train(compose_train(*common, "trainer.overwrite=true"))
    assert summary["epochs_completed"] == 1


def test_a_resume_with_other_settings_is_refused_unless_intended(tmp_path, tiny_data_root):
    """A resume that changed the learning rate or the crop went ahead with the new values and no
    warning (issue 22, item 4); how long it trains may change freely."""
    from revseg.training.trainer import train

    from conftest import compose_train

    common = one_batch_run(tmp_path, tiny_data_root)
    train(compose_train(*common))
    with pytest.raises(ConfigError) as info:
        train(compose_train(*common, "trainer.resume=true", "optimizer.lr=0.5", "seed=7"))
    message = str(info.value)
    assert "was trained with other settings: optimizer.lr=0.5 (was 0.001); seed=7 (was 42)" in (
        message
    )
    assert message.endswith("trainer.resume_changes=[optimizer.lr,seed]")
    summary = train(
        compose_train(
            *common,
            "trainer.resume=true",
            "trainer.max_epochs=2",
            "optimizer.lr=0.5",
            "trainer.resume_changes=[optimizer.lr]",
        )
    )
    assert summary["epochs_completed"] == 2


def test_a_failed_resume_leaves_the_runs_record_and_a_failed_start_leaves_nothing(
    tmp_path, tiny_data_root
):
    """A refused resume rewrote ``.hydra/{config,hydra,overrides}.yaml`` with its own settings,
    and a run that failed on its config or data left ``.hydra/`` behind (issue 22, item 3)."""
    from helpers import run_python

    from conftest import TINY

    run = tmp_path / "run"
    common = [
        *TINY,
        f"data.root={tiny_data_root}",
        "~logger",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.plan_memory=false",
    ]
    first = run_python("train.py", *common, f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    record = {p.name: p.read_text() for p in (run / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert "- trainer.plan_memory=false" in record["overrides.yaml"]
    for changed in ("model=unet_baseline", "optimizer.lr=0.5"):
        failed = run_python(
            "train.py", *common, f"hydra.run.dir={run}", "trainer.resume=true", changed
        )
        assert failed.returncode == 2 and failed.stderr.startswith("error: trainer.resume"), (
            failed.stderr[-3000:]
        )
        assert {p.name: p.read_text() for p in (run / ".hydra").iterdir()} == record
    fresh = tmp_path / "fresh"  # fails once the data is read: nothing of it is left
    failed = run_python("train.py", *common, f"hydra.run.dir={fresh}", "model.out_channels=2")
    assert failed.returncode == 2 and "model.out_channels=2" in failed.stderr
    assert not fresh.exists()


def test_a_run_failing_with_a_traceback_removes_what_it_wrote_before_training(tmp_path):
    from revseg.cli import removing_unused_run_dir

    (tmp_path / ".hydra").mkdir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "train.log").write_text("started\n")
    with pytest.raises(RuntimeError), removing_unused_run_dir(tmp_path):
        raise RuntimeError("a bug")
    assert not tmp_path.exists()
