"""Impossible config values fail before any data is read, naming the key."""

from __future__ import annotations

import re

import pytest

from revseg.config import build, check_group_overrides, check_input_sizes, validate_config
from revseg.errors import ConfigError

from conftest import compose_train

BAD = [
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("trainer.val_every=-1", "trainer.val_every"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.nan_policy=ignore", "trainer.nan_policy"),
    ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"),
    ("trainer.monitor_mode=up", "trainer.monitor_mode"),
    ("data.crop_size=[32,32]", "data.crop_size"),
    ("trainer.cudnn_benchmark=yes", "trainer.cudnn_benchmark"),
    ("trainer.channels_last=1", "trainer.channels_last"),
    ("trainer.tf32=fast", "trainer.tf32"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.compile=inductr", "trainer.compile"),
    ("trainer.compile=3", "trainer.compile"),
]


@pytest.mark.parametrize(("override", "key"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_the_key(override, key, tmp_path):
    cfg = compose_train(override, f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


SIZES = [
    ("data.crop_size=[30,32,32]", "data.crop_size"),
    ("data.patch_size=[24,24,24]", "data.patch_size"),
    ("model=hyperbolic_blr data=synthetic_video data.frames=12", "data.frames+size"),
]


@pytest.mark.parametrize(("overrides", "key"), SIZES, ids=[s[0] for s in SIZES])
def test_sizes_the_model_cannot_take_name_the_key_and_the_divisor(overrides, key, tmp_path):
    cfg = compose_train(*overrides.split(), f"paths.output_dir={tmp_path}")
    validate_config(cfg)  # well-formed sizes: the model decides
    model = build(cfg.model, "model")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(key)}=.* divisible by {model.divisor} "
    ) as err:
        check_input_sizes(cfg, model.divisor)
    assert "\n" not in str(err.value)


def test_good_config_passes(tmp_path):
    validate_config(compose_train(f"paths.output_dir={tmp_path}"))
    validate_config(compose_train("model=unet_baseline", f"paths.output_dir={tmp_path}"))


@pytest.mark.parametrize(
    "args",
    [["model=no_such_model"], ["-m", "model=prev_unet,nope"], ["scheduler=exponential"]],
)
def test_unknown_group_option(args):
    with pytest.raises(ConfigError, match="no such option; choose one of"):
        check_group_overrides(args)


def test_known_options_and_plain_keys_pass():
    check_group_overrides(
        [
            "model=unet_baseline",
            "trainer=ddp",
            "model.encoder_depth=3",
            "~logger",
            "seed=1",
            "hydra.run.dir=x",
            "experiment=demo_deep",
        ]
    )


def test_cudnn_benchmark_contradicts_deterministic(tmp_path):
    cfg = compose_train(
        "trainer.cudnn_benchmark=true", "trainer.deterministic=true", f"paths.output_dir={tmp_path}"
    )
    with pytest.raises(ConfigError, match="^trainer.cudnn_benchmark=true contradicts"):
        validate_config(cfg)
