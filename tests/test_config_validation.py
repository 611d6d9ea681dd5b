"""Impossible config values fail before any data is read, naming the key."""

from __future__ import annotations

import re

import pytest

from revseg.config import (
    TrainerConfig,
    build,
    check_group_overrides,
    check_input_sizes,
    compose_config,
    trainer_config,
    validate_config,
)
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
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
    ("seed=abc", "seed"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ("model.memory_saving=maybe", "model.memory_saving"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.compile=inductr", "trainer.compile"),
    ("trainer.compile=3", "trainer.compile"),
    # types and bounds of the schema (revseg.config.TrainerConfig, MetricsConfig)
    ("trainer.max_epochs=abc", "trainer.max_epochs"),
    ("trainer.log_images=maybe", "trainer.log_images"),
    ("trainer.plan_memory=1", "trainer.plan_memory"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches"),
    ("trainer.log_every_n_steps=0.5", "trainer.log_every_n_steps"),
    ("trainer.strategy=fsdp", "trainer.strategy"),
    ("trainer.resume=3", "trainer.resume"),
    ("metrics.hd95=yes", "metrics.hd95"),
    ("metrics.lesion_wise=null", "metrics.lesion_wise"),
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


@pytest.mark.parametrize("option", ["default", "ddp"])
def test_the_schema_types_every_key_of_the_trainer_options(option, tmp_path):
    cfg = compose_train(f"trainer={option}", f"paths.output_dir={tmp_path}")
    typed = trainer_config(cfg)
    assert isinstance(typed, TrainerConfig)
    assert {f for f in vars(typed)} == set(cfg.trainer)  # the YAML's keys are the schema's
    assert typed.accumulate_grad_batches == 1 and typed.tf32 is False and typed.compile is False
    assert typed.strategy == ("ddp" if option == "ddp" else "single")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+trainer.max_epoch=3"], r"^trainer\.max_epoch: no such key \(configs/trainer/ lists"),
        (["~trainer.tf32"], r"^trainer\.tf32 is required \(configs/trainer/default\.yaml\)$"),
        (["+trainer.hd95=false"], r"^trainer\.hd95 is now metrics\.hd95 \(configs/metrics/\)"),
        (["~metrics"], r"^config section 'metrics' is missing$"),
    ],
)
def test_unknown_missing_and_moved_trainer_keys(overrides, message, tmp_path):
    cfg = compose_train(*overrides, f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


@pytest.mark.parametrize("key", ["hd95", "lesion_wise"])
def test_old_metric_keys_on_the_command_line_name_the_new_key(key):
    with pytest.raises(ConfigError, match=rf"^trainer\.{key} is now metrics\.{key} .*: use "):
        compose_config("train", [f"trainer.{key}=false"])


@pytest.mark.parametrize("model", ["prev_unet", "unet_baseline", "revnet_unet"])
def test_norm_groups_that_do_not_divide_the_channels_name_the_key(model, tmp_path):
    """``model.norm_groups=7`` became gcd(30, 7) = 1 group in silence (issue 22, item 6)."""
    cfg = compose_train(f"model={model}", "model.norm_groups=7", f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"^model: norm_groups=7 must divide the \d+ channels"):
        build(cfg.model, "model")
    build(compose_train(f"model={model}", "model.norm_groups=15").model, "model")


def test_a_sweep_key_one_swept_model_lacks_names_that_model():
    """Hydra's five lines for the README's sweep over two models (issue 22, item 8)."""
    from revseg.config import check_key_overrides

    sweep = ["-m", "model=prev_unet,unet_baseline", "model.encoder_depth=1,2"]
    with pytest.raises(ConfigError) as err:
        check_key_overrides("train", sweep)
    assert str(err.value) == (
        "model.encoder_depth: no such config key with model=unet_baseline in this sweep; sweep the "
        "options that have it in a -m command of their own"
    )
    check_key_overrides("train", ["-m", "model=prev_unet,revnet_unet", "model.encoder_depth=1,2"])
    with pytest.raises(ConfigError, match=r"^model.encoder_dept: no such config key; did you"):
        check_key_overrides(
            "train", ["-m", "model=prev_unet,unet_baseline", "model.encoder_dept=1"]
        )
