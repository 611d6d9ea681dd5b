"""Train a revseg model: ``python train.py [group=option ...] [key=value ...]``.

A thin Hydra entry over :func:`revseg.training.trainer.train`; see README.md for examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from revseg.cli import check_run_dir, exit_on_error, removing_unused_run_dir, search_dirs
from revseg.config import check_group_overrides, check_key_overrides

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from revseg.training.trainer import train

    with exit_on_error(), removing_unused_run_dir(HydraConfig.get().runtime.output_dir):
        summary = train(cfg)
    return summary["best_metric"]["value"]


if __name__ == "__main__":
    with exit_on_error():
        args = sys.argv[1:]
        search = search_dirs(args)
        check_group_overrides(args, CONFIG_DIR, search)
        check_key_overrides("train", args, CONFIG_DIR, search)
        check_run_dir(args)
    main()
