"""Predict the peak training memory of a config before training it.

    revseg-plan [train.py overrides ...] [budget_gb=12] [max_depth=16]

Takes the same overrides as ``train.py`` (``model=unet_baseline data.crop_size=[128,128,128]``),
prints the planner's breakdown (parameters, gradients, optimizer state, batch, states kept by
reversible parts, activations kept by non-reversible parts, workspace) and, with ``budget_gb=``,
the largest field of view (a cube, and the configured crop scaled) and the deepest encoder that
fit the budget. With ``trainer.device=cuda`` the plan is for a GPU: the traced peak, what a CUDA
run adds (computed) and an allowance for what cannot be traced (estimated), whose total is what
the budget, the card's memory, must hold. See :mod:`revseg.memory.trace` for the method.
"""

from __future__ import annotations

from revseg.cli import run_main
from revseg.errors import ConfigError

OWN_KEYS = ("budget_gb", "max_depth")


def _split_args(argv: list[str]) -> tuple[list[str], dict[str, float]]:
    overrides, own = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OWN_KEYS:
            try:
                own[key] = float(value)
            except ValueError as err:
                raise ConfigError(f"{key} must be a number, got {value!r}") from err
            if own[key] <= 0:
                raise ConfigError(f"{key} must be positive, got {value!r}")
        else:
            overrides.append(arg)
    return overrides, own


def main(argv: list[str]) -> int:
    from revseg.memory.measure import format_bytes
    from revseg.memory.plan import compose_train_config, fit_budget, plan_from_config

    overrides, own = _split_args(argv)
    cfg = compose_train_config(overrides)
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
