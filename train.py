"""Train a revseg model: ``python train.py [group=option ...] [key=value ...]``.

A thin Hydra entry over :func:`revseg.training.trainer.train`; see README.md for examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from revseg.cli import exit_on_error
from revseg.config import check_group_overrides

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from revseg.training.trainer import train

    with exit_on_error():
        summary = train(cfg)
    return summary["best_metric"]["value"]


if __name__ == "__main__":
    with exit_on_error():
        check_group_overrides(sys.argv[1:], CONFIG_DIR)
    main()
