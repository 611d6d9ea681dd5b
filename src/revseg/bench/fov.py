"""Section f of the benchmark: the full field of view, the headline table.

The question a user brings: how much less memory than the strongest alternative (a plain U-Net
with gradient checkpointing) does the reversible net need at the whole volume, and at what cost
in time? Every configuration below runs one training step (Adam, Dice loss, batch 1) in its own
process at the measured sizes, and is planned by :mod:`revseg.memory.plan` at the sizes too large
for the machine (160x192x160, the BraTS full field of view). The configurations and the goals
are data (:data:`CONFIGS`, :data:`GOALS`); :func:`specs` makes the runner's specs
(:class:`~revseg.bench.specs.NetSpec`) and :func:`report` the Markdown section and the goals'
rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from revseg.bench.specs import NetSpec, gib, result_value, size_name

__all__ = ["CONFIGS", "GOALS", "Config", "Goal", "report", "specs"]

SECTION = "f"
REFERENCE = "unet_baseline, checkpointing"


TINY_UNET = ("model.channels=[8,16,24]", "model.norm_groups=2")


@dataclass(frozen=True)
class Config:
    """One row: a label, the ``train.py`` overrides that make it, and those that make a tiny
    variant of it (``--quick``: the same code paths in seconds)."""

    label: str
    overrides: tuple[str, ...]
    tiny: tuple[str, ...] = TINY_UNET


CONFIGS: tuple[Config, ...] = (
    Config("prev_unet depth 1", ("model=prev_unet",)),
    Config("prev_unet depth 1, chunks off", ("model=prev_unet", "model.chunks=null")),
    Config(
        "prev_unet depth 1, chunks off, no checkpointing",
        ("model=prev_unet", "model.chunks=null", "model.checkpointing=false"),
    ),
    Config("prev_unet depth 4", ("model=prev_unet", "model.encoder_depth=4")),
    Config(
        "prev_unet depth 4, chunks off",
        ("model=prev_unet", "model.encoder_depth=4", "model.chunks=null"),
    ),
    Config("unet_baseline", ("model=unet_baseline",)),
    Config(REFERENCE, ("model=unet_baseline", "model.checkpointing=true")),
    Config(
        "unet_baseline 4 encoder blocks, checkpointing",
        ("model=unet_baseline", "model.encoder_blocks=4", "model.checkpointing=true"),
    ),
    Config("hybrid_revnet", ("model=hybrid_revnet",), tiny=("model.channels=[4,32,32]",)),
)


@dataclass(frozen=True)
class Goal:
    """``value = key(numerator) / key(denominator)`` (or ``key(numerator) / scale`` without a
    denominator) at the planned size (``planned=True``) or the smallest measured one, met when
    ``value <= target``."""

    name: str
    numerator: str
    denominator: str | None
    target: float
    key: str = "peak"  # "peak" (bytes) or "time" (median step seconds)
    planned: bool = True
    scale: float = 1.0
    paper: str = ""


GOALS: tuple[Goal, ...] = (
    Goal("prev_unet depth 1, chunks off / checkpointed baseline", "prev_unet depth 1, chunks off",
         REFERENCE, 1.15),
    Goal("prev_unet depth 1 (chunks auto) / checkpointed baseline", "prev_unet depth 1", REFERENCE,
         1.0),
    Goal("prev_unet depth 4 / baseline with 4 encoder blocks, checkpointing", "prev_unet depth 4",
         "unet_baseline 4 encoder blocks, checkpointing", 0.7),
    Goal("prev_unet depth 4 peak, GB", "prev_unet depth 4", None, 5.5, scale=1e9,
         paper="paper 9.7"),
    Goal("prev_unet peak depth 4 / depth 1", "prev_unet depth 4", "prev_unet depth 1", 1.03,
         paper="paper 1.029"),
    Goal("prev_unet step time / checkpointed baseline", "prev_unet depth 1", REFERENCE, 1.15,
         key="time", planned=False, paper="paper 1.5 vs plain"),
)  # fmt: skip


def specs(
    measured: Sequence[int],
    planned: Sequence[Sequence[int]],
    steps: int,
    threads: int | None,
    tiny: bool = False,
) -> list[NetSpec]:
    """The runner's specs: every config at each measured cube side and, planner only, at each
    planned ``(D, H, W)``; ``tiny``: the configs' tiny variants."""
    out = []
    for config in CONFIGS:
        sizes = [([s] * 3, False) for s in measured] + [(list(p), True) for p in planned]
        for size, plan_only in sizes:
            overrides = [*config.overrides, *(config.tiny if tiny else ())]
            out.append(
                NetSpec(SECTION, config.label, overrides, size, steps, threads, plan_only=plan_only)
            )
    return out


def report(
    results: list[dict[str, Any]],
) -> tuple[list[str], list[tuple[str, str, float | None, bool | None]]]:
    """Section f's Markdown lines and its goals as ``(name, target, value, met)``."""
    runs = [r for r in results if r["spec"]["section"] == SECTION]
    get = {(r["spec"]["label"], size_name(r["spec"]["size"])): r["result"] for r in runs}
    measured = sorted(
        {size_name(r["spec"]["size"]) for r in runs if not r["spec"].get("plan_only")},
        key=lambda s: int(s.split("x")[0]),
    )
    planned = list(
        dict.fromkeys(size_name(r["spec"]["size"]) for r in runs if r["spec"].get("plan_only"))
    )
    lines = [
        "## f. The full field of view: reversible vs gradient checkpointing",
        "",
        "One training step (Adam, Dice loss, batch 1) of each config, fp32. Measured: peak tensor "
        "memory (GiB) and median step time; planned: `scripts/memory_plan.py`'s prediction, "
        f"for {', '.join(planned) or 'no'} too large for this machine. `vs ckpt`: peak / the "
        "peak of unet_baseline with gradient checkpointing at the same input. prev_unet's "
        "defaults are `model.chunks=auto` (F and G in slabs of at most 64 MiB) and "
        "`model.checkpointing=true` (the resampling between its sequences checkpointed).",
        "",
    ]
    header = ["config"]
    for size in measured:
        header += [f"{size} GiB", f"{size} planned", f"{size} vs ckpt", f"{size} step s"]
    for size in planned:
        header += [f"{size} planned GiB", f"{size} vs ckpt"]
    rows = []
    for config in CONFIGS:
        row = [config.label]
        for size in measured:
            res, ref = get.get((config.label, size)), get.get((REFERENCE, size))
            peak, base = result_value(res, "peak"), result_value(ref, "peak")
            row += [
                gib(peak),
                gib((res or {}).get("planned_peak_bytes")),
                f"{peak / base:.3f}" if peak and base else "–",
                f"{res['step_time_s']:.2f}" if res and res.get("step_time_s") else "–",
            ]
        for size in planned:
            peak = result_value(get.get((config.label, size)), "peak")
            base = result_value(get.get((REFERENCE, size)), "peak")
            row += [gib(peak), f"{peak / base:.3f}" if peak and base else "–"]
        rows.append(row)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    goals = []
    for goal in GOALS:
        size = planned[-1] if goal.planned and planned else (measured[0] if measured else None)
        num = result_value(get.get((goal.numerator, size)), goal.key) if size else None
        if goal.denominator is None:
            value = None if num is None else num / goal.scale
        else:
            den = result_value(get.get((goal.denominator, size)), goal.key) if size else None
            value = None if num is None or not den else num / den
        target = f"<= {goal.target:g}" + (f" ({goal.paper})" if goal.paper else "")
        met = None if value is None else value <= goal.target
        goals.append((f"f. {goal.name} at {size}" + (" (planner)" if goal.planned else ""),
                      target, value, met))  # fmt: skip
    return lines, goals
