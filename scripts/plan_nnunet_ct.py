"""Planned memory on the CT task: prev_unet against gradient checkpointing beyond BraTS.

    python scripts/plan_nnunet_ct.py --out docs/benchmarks/nnunet_ct.md
    python scripts/plan_nnunet_ct.py --root /data/nnUNet_raw/Dataset009_Spleen --no-generate

Generates the Spleen-like CT task (``data.generate=spleen``: one CT channel, 0.8 x 0.8 x 5 mm)
unless ``--no-generate``, reads its fingerprint from the headers as ``revseg-plan data=nnunet``
does (:func:`revseg.memory.dataset_plan.summarize_dataset`) and plans every model of
:data:`~revseg.memory.dataset_plan.ZOO` (prev_unet at 1 and 4 blocks per encoder level, the
U-Net with gradient checkpointing at 1 and 4 blocks) at the task's full field of view, the
largest case padded to each model's divisor as the data module trains it, with CUDA's rules
(``trainer.device=cuda``) at each ``--precisions``; ``--fov`` adds inputs of a given size (not
the task's). Writes Markdown (``--out``) with the goals of issue 21 (prev_unet / checkpointed
baseline <= 1.0, depth 4 / 4-block checkpointed baseline <= 0.7, on the traced peak as the
benchmark's sections f and g compare) and JSON beside it. These are plans, not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from revseg.bench.runner import machine_info
from revseg.bench.specs import size_name
from revseg.cli import exit_on_error
from revseg.memory.dataset_plan import PAIRS, plan_dataset, summarize_dataset
from revseg.memory.measure import format_bytes
from revseg.memory.plan import compose_train_config

GOALS = (  # a reversible model against its checkpointed baseline (PAIRS), the target
    ("prev_unet depth 1 / checkpointed baseline", "prev_unet depth 1", 1.0),
    ("prev_unet depth 4 / 4-block checkpointed baseline", "prev_unet depth 4", 0.7),
)


def _shape(text: str) -> tuple[int, int, int]:
    sides = [int(s) for s in text.lower().split("x")]
    if len(sides) != 3 or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DxHxW, e.g. 512x512x96")
    return tuple(sides)  # type: ignore[return-value]


def plan_rows(root: Path, generate: bool, precisions: list[str], fovs: list[tuple]) -> dict:
    """Every zoo model at the task's full FOV (and each ``fovs``) at each precision."""
    rows, summary = [], None
    for precision in precisions:
        overrides = [
            "data=nnunet",
            f"data.root={root}",
            *(["data.generate=spleen"] if generate else []),
            "trainer.device=cuda",
            f"trainer.precision={precision}",
        ]
        cfg = compose_train_config(overrides)
        summary = summarize_dataset(cfg.data)
        for fov in [None, *fovs]:
            at = summary if fov is None else dataclasses.replace(summary, crop_size=fov)
            plan = plan_dataset(cfg, overrides, at, zoo=True)
            for label, fit in plan.zoo.items():
                p = fit.fov_plan
                rows.append(
                    {
                        "label": label,
                        "overrides": list(fit.overrides),
                        "precision": precision,
                        "input": list(fit.fov),
                        "task_fov": fov is None,
                        "params": p.params,
                        "traced_bytes": p.peak_bytes,
                        "allocated_bytes": p.allocated_bytes,
                        "total_bytes": p.total_bytes,
                        "peak_phase": p.peak_phase,
                        "breakdown": p.breakdown,
                    }
                )
    assert summary is not None
    return {"dataset": summary.lines(), "rows": rows}


def _ratio(rows: list[dict], row: dict, key: str) -> float | None:
    ref_label = PAIRS.get(row["label"])
    ref = next(
        (
            r
            for r in rows
            if r["label"] == ref_label
            and r["precision"] == row["precision"]
            and r["input"] == row["input"]
        ),
        None,
    )
    return None if ref is None else row[key] / ref[key]


def markdown(result: dict) -> str:
    rows = result["rows"]
    task = [r for r in rows if r["task_fov"]]
    fov = size_name(task[0]["input"]) if task else "–"
    lines = [
        "# Planned memory on the CT task: reversible vs gradient checkpointing",
        "",
        f"`{result['command']}` on {result['date']} in {result['seconds']:.0f} s; "
        f"{result['machine']['cpu']}, torch {result['machine']['torch']}.",
        "",
        "**Plans, not measurements**: revseg's planner (`revseg-plan`, "
        "[plan memory](../how-to/plan-memory.md)) traces one training step (Adam, the dataset's "
        "loss, batch 1) of each model on this CPU and plans it for a CUDA run "
        "(`trainer.device=cuda`: CUDA's autocast rules, the optimizer step with foreach). "
        "`traced`: the step's tensor bytes; `allocated`: plus the caching allocator's rounding "
        "(a predicted `max_memory_allocated`); `total`: plus the estimated allowance (cuDNN "
        "workspace, allocator slack, the 512 MiB CUDA context), what the card must hold. "
        "`vs ckpt`: the ratio to the same-depth U-Net with gradient checkpointing at the same "
        "input and precision (traced peaks, as sections f and g of the "
        "[benchmark report](README.md) compare; in brackets the totals).",
        "",
        "The task, as `revseg-plan data=nnunet` reports it (from the headers):",
        "",
        "```",
        *result["dataset"],
        "```",
        "",
        f"The full field of view: the largest case padded to the models' divisor (16), {fov}, "
        "as the data module trains it with `data.crop_size: null`.",
        "",
        "| config | precision | input | params | traced | allocated | total (device) | peak in "
        "| vs ckpt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = _ratio(rows, row, "traced_bytes")
        total = _ratio(rows, row, "total_bytes")
        shown = "–" if ratio is None else f"{ratio:.3f} ({total:.3f})"
        where = size_name(row["input"]) + ("" if row["task_fov"] else " (given, not the task's)")
        lines.append(
            f"| {row['label']} | {row['precision']} | {where} | {row['params']:,} | "
            f"{format_bytes(row['traced_bytes'])} | {format_bytes(row['allocated_bytes'])} | "
            f"{format_bytes(row['total_bytes'])} | {row['peak_phase']} | {shown} |"
        )
    lines += [
        "",
        "## Goals (issue 21), at the task's full field of view, planned with CUDA rules",
        "",
        "| goal | precision | target | traced ratio | total ratio |  |",
        "|---|---|---|---|---|---|",
    ]
    for name, num, target in GOALS:
        for precision in result["precisions"]:
            row = next((r for r in task if r["label"] == num and r["precision"] == precision), None)
            value = None if row is None else _ratio(rows, row, "traced_bytes")
            total = None if row is None else _ratio(rows, row, "total_bytes")
            met = "–" if value is None else ("met" if value <= target else "**missed**")
            lines.append(
                f"| {name} | {precision} | <= {target:g} | "
                f"{'–' if value is None else f'{value:.3f}'} | "
                f"{'–' if total is None else f'{total:.3f}'} | {met} |"
            )
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=Path("data/Dataset909_SynthSpleen"), help="the dataset"
    )
    parser.add_argument(
        "--no-generate", action="store_true", help="plan the dataset at --root as it is"
    )
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated")
    parser.add_argument(
        "--fov", type=_shape, action="append", default=[], help="another input DxHxW to plan"
    )
    parser.add_argument("--note", default="", help="a note for the report")
    parser.add_argument("--out", type=Path, help="Markdown report (JSON beside it)")
    args = parser.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    started = time.time()
    with exit_on_error():
        result = plan_rows(args.root, not args.no_generate, precisions, args.fov)
    info = machine_info()
    result.update(
        command=shlex.join(
            ["python", "scripts/plan_nnunet_ct.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        date=datetime.datetime.now().isoformat(timespec="minutes"),
        seconds=time.time() - started,
        machine={"cpu": info.get("cpu"), "torch": info["versions"].get("torch")},
        precisions=precisions,
        note=args.note,
    )
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
