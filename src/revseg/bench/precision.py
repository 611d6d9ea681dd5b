"""Section g of the benchmark: mixed precision, fp32 / bf16 / fp16 side by side.

The question a GPU user brings: under the autocast they train with, does the reversible net still
need less memory than gradient checkpointing at the same precision? Every configuration runs one
training step (Adam, Dice loss, batch 1; autocast and, for fp16, a gradient scaler, as the
trainer runs them) in its own process at the measured sizes, with the autocast rules of the
machine (CPU here), and is planned by :mod:`revseg.memory.plan` at the full field of view with
**CUDA's** autocast rules (``trainer.device=cuda``; :mod:`revseg.memory.autocast_rules`), the
figure a GPU user sizes a run with. Configurations and goals are data (:data:`CONFIGS`,
:data:`GOALS`), as in :mod:`revseg.bench.fov`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from revseg.bench.fov import TINY_UNET
from revseg.bench.specs import QUICK_HYP, NetSpec, gib, result_value, size_name
from revseg.device import PRECISIONS

__all__ = ["CONFIGS", "GOALS", "PRECISIONS", "report", "specs"]

SECTION = "g"
REFERENCE = "unet_baseline, checkpointing"
REFERENCE_4 = "unet_baseline 4 encoder blocks, checkpointing"
LOW_STATES = "model.state_dtype=autocast"
FAST_NORM = "model.norm_dtype=autocast"
VIDEO = ("model=hyperbolic_blr", "data=synthetic_video")


@dataclass(frozen=True)
class Config:
    """One row: a label, its ``train.py`` overrides, the tiny variant's (``--quick``), and whether
    it is the video model (sizes ``(T, H, W)``)."""

    label: str
    overrides: tuple[str, ...]
    tiny: tuple[str, ...] = TINY_UNET
    video: bool = False


CONFIGS: tuple[Config, ...] = (
    Config("prev_unet depth 1", ("model=prev_unet",)),
    Config("prev_unet depth 1, low-precision states", ("model=prev_unet", LOW_STATES)),
    Config("prev_unet depth 4", ("model=prev_unet", "model.encoder_depth=4")),
    Config(
        "prev_unet depth 4, low-precision states",
        ("model=prev_unet", "model.encoder_depth=4", LOW_STATES),
    ),
    Config("unet_baseline", ("model=unet_baseline",)),
    Config(REFERENCE, ("model=unet_baseline", "model.checkpointing=true")),
    Config(
        "unet_baseline, checkpointing, low-precision GroupNorm",
        ("model=unet_baseline", "model.checkpointing=true", FAST_NORM),
    ),
    Config(
        REFERENCE_4, ("model=unet_baseline", "model.encoder_blocks=4", "model.checkpointing=true")
    ),
    Config(
        "unet_baseline 4 encoder blocks, checkpointing, low-precision GroupNorm",
        ("model=unet_baseline", "model.encoder_blocks=4", "model.checkpointing=true", FAST_NORM),
    ),
    Config("hybrid_revnet", ("model=hybrid_revnet",), tiny=("model.channels=[4,32,32]",)),
    Config("hyperbolic_blr", VIDEO, tiny=tuple(QUICK_HYP), video=True),
)


@dataclass(frozen=True)
class Goal:
    """``key(numerator at precision) / key(denominator at denominator_precision)`` (or
    ``/ scale`` without a denominator), planned (CUDA rules, full FOV) or at the largest measured
    size; met when ``<= target``."""

    name: str
    numerator: str
    precision: str
    denominator: str | None
    target: float
    denominator_precision: str | None = None
    key: str = "peak"
    planned: bool = True
    scale: float = 1.0


GIB = 2.0**30
P1, P1_LOW = "prev_unet depth 1", "prev_unet depth 1, low-precision states"
P4, P4_LOW = "prev_unet depth 4", "prev_unet depth 4, low-precision states"
GOALS: tuple[Goal, ...] = (
    Goal("prev_unet depth 1 bf16 peak, GiB", P1, "bf16", None, 3.0, scale=GIB),
    Goal("prev_unet depth 1 bf16, low-precision states, peak, GiB", P1_LOW, "bf16", None, 3.0,
         scale=GIB),
    Goal("prev_unet depth 1 / checkpointed baseline, bf16", P1, "bf16", REFERENCE, 0.85),
    Goal("prev_unet depth 1, low-precision states / checkpointed baseline, bf16", P1_LOW, "bf16",
         REFERENCE, 0.85),
    Goal("prev_unet depth 4 bf16 peak, GiB", P4, "bf16", None, 3.3, scale=GIB),
    Goal("prev_unet depth 4 bf16, low-precision states, peak, GiB", P4_LOW, "bf16", None, 3.3,
         scale=GIB),
    Goal("prev_unet depth 4 / 4-block checkpointed baseline, bf16", P4, "bf16", REFERENCE_4, 0.65),
    Goal("prev_unet depth 4, low-precision states / 4-block checkpointed baseline, bf16", P4_LOW,
         "bf16", REFERENCE_4, 0.65),
    Goal("prev_unet depth 1 bf16 / fp32", P1, "bf16", P1, 0.7, "fp32", planned=False),
    Goal("prev_unet depth 1 bf16, low-precision states / fp32", P1_LOW, "bf16", P1, 0.7, "fp32",
         planned=False),
    Goal("prev_unet depth 1 / checkpointed baseline, bf16", P1, "bf16", REFERENCE, 1.0,
         planned=False),
    Goal("prev_unet depth 1, low-precision states / checkpointed baseline, bf16", P1_LOW, "bf16",
         REFERENCE, 1.0, planned=False),
    Goal("prev_unet step time / checkpointed baseline, bf16", P1, "bf16", REFERENCE, 1.3,
         key="time", planned=False),
)  # fmt: skip


def _video_size(side: int) -> list[int]:
    """A ``(T, H, W)`` with the voxels of a ``side`` cube: ``side / 4`` frames of ``2 side``."""
    return [max(8, side // 4 // 8 * 8), 2 * side, 2 * side]


def specs(
    measured: Sequence[int],
    planned: Sequence[Sequence[int]],
    steps: int,
    threads: int | None,
    tiny: bool = False,
    video_planned: Sequence[int] = (72, 240, 424),
    labels: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
) -> list[NetSpec]:
    """Every config (or those named in ``labels``) at every precision (or ``precisions``):
    measured at each cube side (the video model at a ``(T, H, W)`` of the same voxels) and,
    planner only with CUDA's rules, at each planned ``(D, H, W)`` (the video model at
    ``video_planned``, the paper's DAVIS size).

    Raises:
        ValueError: a label or precision that is not one of :data:`CONFIGS` / :data:`PRECISIONS`.
    """
    known = {c.label for c in CONFIGS}
    unknown = [x for x in labels or () if x not in known] + [
        p for p in precisions or () if p not in PRECISIONS
    ]
    if unknown:
        raise ValueError(f"section g: unknown config or precision {unknown}; configs: {known}")
    out = []
    for config in CONFIGS:
        if labels and config.label not in labels:
            continue
        for precision in precisions or PRECISIONS:
            label = f"{config.label} | {precision}"
            base = [*config.overrides, *(config.tiny if tiny else ()),
                    f"trainer.precision={precision}"]  # fmt: skip
            sizes = [((_video_size(s) if config.video else [s] * 3), False) for s in measured]
            if config.video:  # planned at the paper's DAVIS size, whatever the cubes planned
                sizes += [(list(video_planned), True)] if planned else []
            else:
                sizes += [(list(p), True) for p in planned]
            for size, plan_only in sizes:
                overrides = [*base, "trainer.device=cuda"] if plan_only else base
                out.append(NetSpec(SECTION, label, overrides, size, steps, threads,
                                   plan_only=plan_only, video=config.video))  # fmt: skip
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def _size(n: float | None) -> str:
    """GiB with two decimals, or MiB below a tenth of a GiB (the tiny ``--quick`` sizes)."""
    if n is None:
        return "–"
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def report(
    results: list[dict[str, Any]],
) -> tuple[list[str], list[tuple[str, str, float | None, bool | None]]]:
    """Section g's Markdown lines and its goals as ``(name, target, value, met)``."""
    runs = [r for r in results if r["spec"]["section"] == SECTION]
    measured = [r for r in runs if not r["spec"].get("plan_only")]
    # the i-th video size stands beside the i-th cube (the same voxels, see specs)
    sides = sorted({r["spec"]["size"][0] for r in measured if not r["spec"].get("video")})
    videos = sorted({tuple(r["spec"]["size"]) for r in measured if r["spec"].get("video")})
    column = {video: str(side) for video, side in zip(videos, sides)}
    planned_name = next(
        (size_name(r["spec"]["size"]) for r in runs
         if r["spec"].get("plan_only") and not r["spec"].get("video")), None,
    )  # fmt: skip
    get: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in runs:
        label, precision = r["spec"]["label"].split(" | ")
        if r["spec"].get("plan_only"):
            size = "planned"
        elif r["spec"].get("video"):
            size = column.get(tuple(r["spec"]["size"]), "?")
        else:
            size = str(r["spec"]["size"][0])
        get[(label, precision, size)] = r["result"]
    sizes = [str(s) for s in sides]
    lines = [
        "## g. Mixed precision: fp32, bf16 and fp16 side by side",
        "",
        "One training step (Adam, Dice loss, batch 1) of each config under `trainer.precision` "
        "(autocast; fp16 with a gradient scaler). Measured: peak tensor memory on this "
        "machine with its autocast rules, and the planner's figure for it, at cubes of "
        f"{', '.join(sizes) or 'no'}³ (hyperbolic_blr: a video of the same voxels); planned: "
        f"the planner at {planned_name or 'no size'} (hyperbolic_blr: 72x240x424) with CUDA's "
        "autocast rules (`trainer.device=cuda`: GroupNorm in float32 unless "
        "`model.norm_dtype=autocast`). `vs ckpt`: peak / the peak of unet_baseline with "
        "checkpointing at the same precision, input and rules. `low-precision states`: "
        "`model.state_dtype=autocast`; `low-precision GroupNorm`: `model.norm_dtype=autocast`.",
        "",
    ]
    header = ["config", "precision"]
    for size in sizes:
        header += [f"{size}³ peak", f"{size}³ planned", f"{size}³ vs ckpt", f"{size}³ step s"]
    header += ["full FOV planned GiB (CUDA rules)", "vs ckpt"]
    rows = []
    for config in CONFIGS:
        for precision in PRECISIONS:
            row = [config.label, precision]
            for size in sizes:
                res = get.get((config.label, precision, size))
                ref = get.get((REFERENCE, precision, size))
                peak = result_value(res, "peak")
                row += [
                    _size(peak),
                    _size((res or {}).get("planned_peak_bytes")),
                    "–" if config.video else _ratio(peak, result_value(ref, "peak")),
                    f"{res['step_time_s']:.2f}" if res and res.get("step_time_s") else "–",
                ]
            res = get.get((config.label, precision, "planned"))
            ref = get.get((REFERENCE, precision, "planned"))
            peak = result_value(res, "peak")
            row += [gib(peak), "–" if config.video else _ratio(peak, result_value(ref, "peak"))]
            rows.append(row)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    goals = []
    largest = sizes[-1] if sizes else None
    for goal in GOALS:
        size = "planned" if goal.planned else largest
        num = (
            result_value(get.get((goal.numerator, goal.precision, size)), goal.key)
            if size
            else None
        )
        if goal.denominator is None:
            value = None if num is None else num / goal.scale
        else:
            den_precision = goal.denominator_precision or goal.precision
            den = get.get((goal.denominator, den_precision, size)) if size else None
            den_value = result_value(den, goal.key)
            value = None if num is None or not den_value else num / den_value
        where = f"{planned_name}, CUDA rules, planner" if goal.planned else f"{largest}³ measured"
        met = None if value is None else value <= goal.target
        goals.append((f"g. {goal.name} at {where}", f"<= {goal.target:g}", value, met))
    return lines, goals
