"""``revseg-train`` (and ``python train.py``): train a model, ``[group=option] [key=value] ...``.

A thin Hydra entry over :func:`revseg.training.trainer.train`. Before Hydra starts, the
command line is checked (group options, keys, the run directory), so that a typo is one line
naming the nearest key and no run directory is made. ``--config-dir DIR`` adds the user's own
config folder to the search path (new options for any group, e.g. ``DIR/model/mine.yaml``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from revseg.cli import check_run_dir, exit_on_error, removing_unused_run_dir, search_dirs
from revseg.config import CONFIG_DIR, check_group_overrides, check_key_overrides

__all__ = ["main", "run"]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from revseg.training.trainer import train

    with exit_on_error(), removing_unused_run_dir(HydraConfig.get().runtime.output_dir):
        summary = train(cfg)
    return summary["best_metric"]["value"]


def run() -> None:
    """The ``revseg-train`` command: check the command line, then run Hydra's ``main``."""
    with exit_on_error():
        args = sys.argv[1:]
        search = search_dirs(args)
        check_group_overrides(args, CONFIG_DIR, search)
        check_key_overrides("train", args, CONFIG_DIR, search)
        check_run_dir(args)
    main()
