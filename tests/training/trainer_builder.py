"""A :class:`~revseg.training.trainer.Trainer` on the tiny data, built as ``train()`` builds it,
and a TensorBoard writer stand-in that keeps the scalars (importable as ``trainer_builder``)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

from helpers import Writer
from revseg.training.callbacks import Callback
from revseg.training.distributed import DistInfo
from revseg.training.trainer import Trainer

from conftest import TINY, compose_train


def make_trainer(
    tmp_path: Path,
    data_root: Path,
    *overrides: str,
    callbacks: dict[str, Callback] | None = None,
    dist_info: DistInfo | None = None,
) -> Trainer:
    """The tiny model on the tiny data on the CPU, one batch per epoch, with ``overrides``."""
    cfg = compose_train(
        *TINY,
        f"data.root={data_root}",
        f"paths.output_dir={tmp_path}",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        *overrides,
    )
    model = instantiate(cfg.model, _convert_="all")
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    data = instantiate(cfg.data, _convert_="all")
    data.setup()
    loss = instantiate(cfg.loss)
    device = torch.device("cpu")
    return Trainer(
        cfg, model, data, loss, optimizer, None, callbacks or {}, Writer(), tmp_path, device,
        dist_info,
    )  # fmt: skip
