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
