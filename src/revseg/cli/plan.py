"""Predict the peak training memory of a config before training it; plan a dataset.

    revseg-plan [train.py overrides ...] [budget_gb=12] [max_depth=16]
    revseg-plan data=nnunet data.root=DIR [budget_gb=8] [plan_dir=revseg_configs] [zoo=false]

Takes the same overrides as ``train.py`` (``model=unet_baseline data.crop_size=[128,128,128]``),
prints the planner's breakdown (parameters, gradients, optimizer state, batch, states kept by
reversible parts, activations kept by non-reversible parts, workspace) and, with ``budget_gb=``,
the largest field of view (a cube, and the configured crop scaled) and the deepest encoder that
fit the budget. With ``trainer.device=cuda`` the plan is for a GPU: the traced peak, what a CUDA
run adds (computed) and an allowance for what cannot be traced (estimated), whose total is what
the budget, the card's memory, must hold. See :mod:`revseg.memory.trace` for the method.

With ``data=nnunet`` the dataset is planned (:mod:`revseg.memory.dataset_plan`): its report from
the headers (cases, channels, labels, median / min / max shape and spacing, the shapes at
``data.spacing``), then prev_unet and the checkpointed baseline (and their 4-block variants) at
the full field of view with the run's precision and device rules, whether each fits the budget,
the largest patch that fits where it does not, and the deepest encoder; with ``budget_gb=`` the
config's model is written as an experiment, ``<plan_dir>/experiment/plan_<dataset>.yaml``
(``plan_name=`` another name), and the command that trains it is printed:
``python train.py --config-dir <plan_dir> experiment=plan_<dataset>``. ``zoo=false`` plans the
config's model only.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from revseg.cli import run_main
from revseg.errors import ConfigError

OWN_KEYS = ("budget_gb", "max_depth")
DATASET_KEYS = ("plan_dir", "plan_name", "zoo")
DEFAULT_PLAN_DIR = "revseg_configs"


def _split_args(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    overrides, own = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in DATASET_KEYS:
            own[key] = _dataset_key(key, value)
        elif sep and key in OWN_KEYS:
            try:
                own[key] = float(value)
            except ValueError as err:
                raise ConfigError(f"{key} must be a number, got {value!r}") from err
            if own[key] <= 0:
                raise ConfigError(f"{key} must be positive, got {value!r}")
        else:
            overrides.append(arg)
    return overrides, own


def _dataset_key(key: str, value: str) -> Any:
    if key == "zoo":
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"zoo must be true or false, got {value!r}")
        return value.lower() == "true"
    if not value:
        raise ConfigError(f"{key} must not be empty")
    if key == "plan_name" and not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise ConfigError(f"plan_name must be letters, digits, _ or -, got {value!r}")
    return value


def main(argv: list[str]) -> int:
    from revseg.memory.dataset_plan import is_dataset_config
    from revseg.memory.measure import format_bytes
    from revseg.memory.plan import compose_train_config, fit_budget, plan_from_config

    overrides, own = _split_args(argv)
    cfg = compose_train_config(overrides)
    if is_dataset_config(cfg):
        return _plan_dataset(cfg, overrides, own, argv)
    extra = [k for k in DATASET_KEYS if k in own]
    if extra:
        raise ConfigError(f"{extra[0]} is for a dataset's plan (data=nnunet)")
    plan = plan_from_config(cfg)
    print(plan.table())
    if "budget_gb" not in own:
        return 0
    budget = own["budget_gb"] * 2**30
    fit = fit_budget(cfg, budget, max_depth=int(own.get("max_depth", 16)))
    where = "device memory" if plan.rules == "cuda" else "CPU tensor memory"
    print(f"\nbudget {own['budget_gb']:g} GiB ({format_bytes(budget)} of {where}):")
    if plan.rules != "cuda":
        print("  planned for the CPU: for a GPU's memory add trainer.device=cuda")
    if fit.cube is None and fit.scaled_crop is None:
        print("  nothing fits: the fixed part (parameters, optimizer state) exceeds the budget")
    for key, label in (("cube", "largest cube"), ("scaled_crop", "largest scaled crop")):
        shape = getattr(fit, key)
        if shape is not None:
            print(f"  {label}: {'x'.join(map(str, shape))} ({_predicted(fit.plans[key])})")
    if fit.encoder_depth is not None:
        bound = (
            f" or more (search stops at max_depth={fit.encoder_depth})"
            if fit.encoder_depth_capped
            else ""
        )
        crop = "x".join(map(str, fit.plans["encoder_depth"].input_shape[2:]))
        print(
            f"  deepest encoder at {crop}: model.encoder_depth={fit.encoder_depth}{bound} "
            f"({_predicted(fit.plans['encoder_depth'])})"
        )
    elif "encoder_depth" in cfg.model:
        print("  deepest encoder: none fits at the configured input")
    return 0


def _plan_dataset(cfg: Any, overrides: list[str], own: dict[str, Any], argv: list[str]) -> int:
    """The dataset's report, its plans and, with a budget, the experiment written."""
    from revseg.files import write_text_atomic
    from revseg.memory.dataset_plan import (
        experiment_name,
        experiment_yaml,
        plan_dataset,
        summarize_dataset,
    )

    summary = summarize_dataset(cfg.data)
    print("\n".join(summary.lines()), flush=True)
    budget = own["budget_gb"] * 2**30 if "budget_gb" in own else None
    plan = plan_dataset(
        cfg,
        overrides,
        summary,
        budget,
        max_depth=int(own.get("max_depth", 16)),
        zoo=bool(own.get("zoo", True)),
    )
    print("\n".join(plan.lines()))
    print("\n" + plan.chosen.input_plan.table() if plan.chosen.input_plan else "")
    if budget is None:
        print("\nno experiment written: give budget_gb=N (the GPU's memory) to choose the input")
        return 0
    folder = Path(own.get("plan_dir", DEFAULT_PLAN_DIR)).resolve()
    name = own.get("plan_name") or experiment_name(summary)
    command = " ".join(["revseg-plan", *(shlex.quote(a) for a in argv)])
    text = experiment_yaml(plan, command, folder)
    path = write_text_atomic(text, folder / "experiment" / f"{name}.yaml")
    fit = plan.chosen
    what = "the full field of view" if fit.fits else "patches"
    print(
        f"\nexperiment: {fit.label} at {what} {'x'.join(map(str, fit.input))}, "
        f"{plan.precision}: {path}\ntrain it with:\n"
        f"  python train.py --config-dir {shlex.quote(str(folder))} experiment={name}\n"
        f"  (an installed revseg: revseg-train --config-dir {shlex.quote(str(folder))} "
        f"experiment={name})"
    )
    return 0


def _predicted(plan) -> str:
    """``predicted peak X`` (CPU), or the total and its parts (CUDA)."""
    from revseg.memory.measure import format_bytes

    if not (plan.added or plan.allowance):
        return f"predicted peak {format_bytes(plan.peak_bytes)}"
    added = plan.allocated_bytes - plan.peak_bytes
    allowance = plan.total_bytes - plan.allocated_bytes
    return (
        f"predicted total {format_bytes(plan.total_bytes)}: traced {format_bytes(plan.peak_bytes)}"
        f" + computed {format_bytes(added)} + estimated allowance {format_bytes(allowance)}"
    )


def run() -> None:
    """The ``revseg-plan`` command (and ``python scripts/memory_plan.py``)."""
    run_main(main)
