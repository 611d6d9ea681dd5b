"""Bad input a new user gives: one line naming the file, key or checkpoint, before training."""

from __future__ import annotations

import pytest

from revseg.errors import ConfigError
from revseg.training.trainer import train

from conftest import TINY, compose_train


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
        f"trainer.resume: {run / 'checkpoints' / 'last.pt'} holds prev_unet, not unet_baseline: resume "
        "with model=prev_unet, or start a new run in another directory"
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
        f"trainer.resume: {run / 'checkpoints' / 'last.pt'} does not fit this "
        "prev_unet model (prev_unet with model.channels=[8, 16, 24]): "
    )
