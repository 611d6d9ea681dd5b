"""Shared fixtures: composing the train config with tiny overrides, a tiny generated dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from revseg.config import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]

# a model and data small enough that an epoch takes about a second on a laptop CPU
TINY = (
    "model.channels=[8,16,24]",
    "model.norm_groups=2",
    "data.num_cases=4",
    "data.volume_shape=[24,24,24]",
    "data.crop_size=[16,16,16]",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "metrics.hd95=false",
    "optimizer.lr=1e-3",
)
# the same for models without normalisation groups (revup_unet, hybrid_revnet)
TINY_NO_GROUPS = tuple(o for o in TINY if not o.startswith("model.norm_groups="))

# with model=hyperbolic_blr: a tiny network with its adaptive rank, on a tiny generated video
TINY_VIDEO = (
    "data=synthetic_video",
    "data.frames=8",
    "data.size=[16,16]",
    "data.video_frames=8",
    "data.video_size=[16,16]",
    "data.steps_per_epoch=2",
    "model.layers=[1,1,1]",
    "callbacks=rank_growth",
    "callbacks.rank_growth.patience=1",
)


def compose_train(*overrides: str):
    """The composed ``train`` config, as ``python train.py <overrides>`` would see it."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A generated BraTS-2021-layout dataset matching ``TINY`` (made once per session)."""
    from revseg.data.synthetic import make_synthetic_brats

    root = tmp_path_factory.mktemp("data") / "synthetic_brats"
    make_synthetic_brats(root, num_cases=4, shape=(24, 24, 24), seed=0)
    return root


# the tiny model of TINY alone (the planner's tests give the data sizes themselves)
TINY_MODEL = [o for o in TINY if o.startswith("model.")]


def plan_config(*overrides: str, size: int = 16):
    """The composed train config of the tiny model with a ``size``³ crop."""
    return compose_train(*TINY_MODEL, *overrides, f"data.crop_size=[{size},{size},{size}]")


@pytest.fixture
def one_thread():
    """Tiny ops: one thread is faster, and much faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
