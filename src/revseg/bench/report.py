"""The benchmark's report: ``README.md`` from the results, with the goals as data.

The results are the records of ``results.json``: ``{"spec": <spec as_dict>, "result": {...},
"load": ...}``, so a report can be made again from the file alone (:func:`regenerate`, ``python
scripts/bench.py --report-from results.json``) and reads the same from a run or from the file.
The goals of sections a-d are :data:`GOALS` (section f's are :data:`revseg.bench.fov.GOALS`): a
name, the target as the table shows it, and the limit a value must not exceed to be met.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revseg.bench import fov, precision
from revseg.bench.specs import ok, zoo_key

__all__ = ["GOALS", "Goal", "regenerate", "report", "write_report", "zoo_report"]


@dataclass(frozen=True)
class Goal:
    """A row of the goals table: ``name`` (a template: ``{s}`` a size, ``{peer}`` a peer) and
    ``target`` as shown; met when the value is at most ``limit`` (``None``: information only)."""

    name: str
    target: str
    limit: float | None = None


GOALS: dict[str, Goal] = {
    "a_peak": Goal("a. peak reversible / baseline at {s}³", "<= 0.45 (paper 0.62)", 0.45),
    "a_time": Goal("a. step time memory saving on / off at {s}³", "<= 1.35 (paper 1.5)", 1.35),
    "a_peak_on_off": Goal("a. peak memory saving on / off at {s}³", "(info)"),
    "a_time_vs_baseline": Goal("a. step time reversible / baseline at {s}³", "(info; paper 1.5)"),
    "plan_error": Goal("planner |error| vs measured (a, b, d)", "<= 0.15", 0.15),
    "b_depth": Goal("b. peak depth 4 / depth 1 (memory saving)", "<= 1.03 (paper 1.029)", 1.03),
    "b_depth_plain": Goal("b. peak depth 4 / depth 1, plain autograd", "(info)"),
    # met only when revseg is also below every peer at every depth
    "c_states": Goal("c. revseg peak, every depth (states)", "<= 7, below every peer", 7),
    "c_time_vs_checkpoint": Goal("c. revseg time / {peer} time (summed over depths)", "<= 1.05",
                                 1.05),
    "c_time_vs_memcnn": Goal("c. revseg time / {peer} time (summed over depths)", "<= 0.8", 0.8),
    "c_time_vs_revlib": Goal("c. revseg time / {peer} time (summed over depths)", "<= 0.6", 0.6),
    "d_doubled_depth": Goal("d. hyperbolic_blr peak, 54 / 27 layers", "flat (params only)"),
    "a_planned_peak": Goal("a. peak reversible / baseline at {s} (planner)",
                           "<= 0.45 (paper 0.62)", 0.45),
    "b_planned_depth": Goal("b. peak depth 4 / depth 1 at {s} (planner)",
                            "<= 1.03 (paper 1.029)", 1.03),
}  # fmt: skip
PLAN_ERROR_SECTIONS = ("a", "b", "d")


# --------------------------------------------------------------------------------------------
# cells


def mib(n: float | None) -> str:
    """Bytes as MiB with one decimal (``–`` for none)."""
    return "–" if n is None else f"{n / 2**20:,.1f}"


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def status(r: dict[str, Any]) -> str:
    """Why a result is missing: the skip note or the error's first 120 characters."""
    return r.get("skipped") or ("error: " + r["error"][:120] if "error" in r else "")


def _plan_error(res: dict[str, Any]) -> str:
    """The planner's error against the measured peak, as a table cell."""
    if not ok(res) or not res.get("planned_peak_bytes"):
        return "–"
    return f"{100 * (res['planned_peak_bytes'] / res['peak_bytes'] - 1):+.2f}%"


def _params(res: dict[str, Any]) -> str:
    return f"{res['params']:,}" if ok(res) else status(res)


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    x, y = (r.get(key) if r and ok(r) else None for r in (a, b))
    return x / y if x and y else None


class _Goals:
    """The goals table's rows and the goal values (``results.json``'s ``goals``) as they come."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.values: dict[str, Any] = {}

    def row(self, name: str, target: str, value: float | None, met: bool | None) -> None:
        verdict = "–" if met is None else ("met" if met else "**missed**")
        self.rows.append([name, target, fmt(value, 3), verdict])

    def add(self, goal: str, value: float, key: str | None = None, also: bool = True,
            suffix: str = "", **where: Any) -> None:  # fmt: skip
        """The row of ``GOALS[goal]`` (``where`` fills its name) for ``value``, stored under
        ``key`` in the values; met when within the limit and ``also``."""
        g = GOALS[goal]
        if key is not None:
            self.values[key] = value
        met = None if g.limit is None else value <= g.limit and also
        self.row(g.name.format(**where) + suffix, g.target, value, met)


# --------------------------------------------------------------------------------------------
# the sections


def _header(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    v = m["versions"]
    lines = [
        "# revseg benchmarks: memory and speed",
        "",
        f"Made by `{meta['command']}` on {meta['date']} in {meta['wall_s']:.0f} s.",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, "
        f"{m.get('ram_gib', '?')} GiB RAM; device: **{m['device']}**; {m['platform']}; "
        f"{meta['threads']} torch thread(s) per configuration",
        f"- versions: Python {m['python']}, torch {v['torch']}, revseg {v['revseg']}, "
        f"memcnn {v['memcnn']}, revlib {v['revlib']}",
        f"- 1-minute load average: {fmt(meta['load_start'])} at the start, "
        f"{fmt(meta['load_end'])} at the end (other jobs share the machine; times are noisy, "
        "memory figures are deterministic)",
        f"- memory: `PeakMemoryMeter` ({meta['memory_method']}) of one training step after a "
        "warm-up step: every tensor live at the peak (parameters, gradients, optimizer state, "
        "input); time: median of the following steps in the same process; one fresh process per "
        "configuration",
        "- also generated: [planned memory on the CT task](nnunet_ct.md) (nnU-Net format, "
        "`scripts/plan_nnunet_ct.py`); [the demos' time and Dice](demo.md) "
        "(`scripts/demo_report.py`)",
    ]
    if meta.get("note"):
        lines.append(f"- note: {meta['note']}")
    for run in meta.get("runs", []):
        lines.append(
            f"- section {', '.join(run['sections'])} from a later run: `{run['command']}` on "
            f"{run['date']} in {run.get('wall_s', 0):.0f} s, 1-minute load average "
            f"{fmt(run['load_start'])} at the start, {fmt(run.get('load_end'))} at the end; "
            f"device {run['device']}, {run['threads']} torch thread(s) per configuration"
            + (f"; note: {run['note']}" if run.get("note") else ""),
        )
    return [*lines, ""]


def _net_table(runs: list[dict[str, Any]], size: str, time: str) -> list[str]:
    """Sections a and d: input, model, params, peak, planned, plan error, bytes/voxel, time."""
    header = [size, "model", "params", "peak MiB", "planned MiB", "plan error", "bytes/voxel"]
    return _table([*header, time], map(_net_row, runs)) + [""]


def _net_row(r: dict[str, Any]) -> list[str]:
    res = r["result"]
    return [
        "x".join(map(str, r["spec"]["size"])),
        r["spec"]["label"],
        _params(res),
        mib(res.get("peak_bytes")),
        mib(res.get("planned_peak_bytes")),
        _plan_error(res),
        fmt(res["peak_bytes"] / res["voxels"], 0) if ok(res) else "–",
        fmt(res.get("step_time_s")),
    ]


def _section_a(runs: list[dict[str, Any]], goals: _Goals) -> list[str]:
    lines = [
        "## a. Partially reversible U-Net vs the baseline",
        "",
        "Training step (Adam, Dice loss, batch 1) of the full models at the same input. "
        "`planned` is `scripts/memory_plan.py`'s prediction for the same config.",
        "",
    ]
    lines += _net_table(runs, "input", "median step s")
    for s in sorted({r["spec"]["size"][0] for r in runs}):
        get = {r["spec"]["label"]: r["result"] for r in runs if r["spec"]["size"][0] == s}
        rev, off = get.get("prev_unet"), get.get("prev_unet (memory saving off)")
        base = get.get("unet_baseline")
        if rev and base and ok(rev) and ok(base):
            goals.add("a_peak", rev["peak_bytes"] / base["peak_bytes"], f"a_peak_ratio_{s}", s=s)
        if rev and off and ok(rev) and ok(off):
            goals.add("a_time", rev["step_time_s"] / off["step_time_s"], f"a_time_ratio_{s}", s=s)
            ratio = rev["peak_bytes"] / off["peak_bytes"]
            goals.add("a_peak_on_off", ratio, f"a_peak_on_off_{s}", s=s)
        if rev and base and ok(rev) and ok(base):
            goals.add("a_time_vs_baseline", rev["step_time_s"] / base["step_time_s"], s=s)
    return lines


def _plan_errors(by: dict[str, list[dict[str, Any]]], goals: _Goals) -> None:
    errors = [
        abs(r["result"]["planned_peak_bytes"] / r["result"]["peak_bytes"] - 1)
        for sec in PLAN_ERROR_SECTIONS
        for r in by.get(sec, [])
        if ok(r["result"]) and r["result"].get("planned_peak_bytes")
    ]
    if errors:
        goals.add("plan_error", max(errors), "plan_max_abs_error")


def _section_b(runs: list[dict[str, Any]], goals: _Goals) -> list[str]:
    s = runs[0]["spec"]["size"][0]
    lines = [
        f"## b. Encoder depth at {s}³",
        "",
        "`model.encoder_depth` = reversible blocks per encoder sequence (decoder depth 1). "
        "Memory saving off is plain autograd on the same net: the growth a non-reversible net "
        "of that depth has.",
        "",
    ]
    rows, first = [], {}
    for r in runs:
        res, spec = r["result"], r["spec"]
        key = spec.get("memory_saving")
        if ok(res) and spec.get("depth") == 1:
            first[key] = res["peak_bytes"]
        rel = res["peak_bytes"] / first[key] if ok(res) and key in first else None
        rows.append(
            [
                spec["label"],
                _params(res),
                mib(res.get("peak_bytes")),
                fmt(rel, 3),
                mib(res.get("planned_peak_bytes")),
                _plan_error(res),
                fmt(res.get("step_time_s")),
            ]
        )
        if spec.get("depth") == 4 and rel is not None:
            name = f"b_depth4_over_1_{'on' if key else 'off'}"
            goals.add("b_depth" if key else "b_depth_plain", rel, name)
    header = ["model", "params", "peak MiB", "vs depth 1", "planned MiB", "plan error", "step s"]
    return lines + _table(header, rows) + [""]


def _section_c(runs: list[dict[str, Any]], goals: _Goals, memory_method: str) -> list[str]:
    spec0 = runs[0]["spec"]
    s, c = spec0["size"][0], spec0["channels"]
    state = next((r["result"]["state_bytes"] for r in runs if ok(r["result"])), None)
    lines = [
        f"## c. One reversible sequence, {s}³, C = {c}",
        "",
        "Blocks of PRevUNet's top level: additive coupling, F = G = GroupNorm-LeakyReLU-"
        f"Conv3d(C/2, C/2, 3). Forward + backward of `seq(x).square().mean()`, x requiring "
        f"grad. Peak memory in **states** (one state = B*C*D*H*W*4 bytes = "
        f"{mib(state)} MiB; the input itself is one), time relative to plain autograd at "
        "the same depth.",
        "",
    ]
    impls = list(dict.fromkeys(r["spec"]["impl"] for r in runs))
    depths = sorted({r["spec"]["depth"] for r in runs})
    get = {(r["spec"]["impl"], r["spec"]["depth"]): r["result"] for r in runs}
    mem_rows, time_rows = [], []
    for d in depths:
        plain = get.get(("plain", d))
        cells = [fmt(get[i, d].get("states")) if ok(get[i, d]) else status(get[i, d]) or "–"
                 for i in impls]  # fmt: skip
        mem_rows.append([d, *cells])
        row = [d]
        for i in impls:
            r = get[i, d]
            if ok(r) and plain and ok(plain):
                row.append(
                    f"{r['step_time_s'] / plain['step_time_s']:.2f} ({r['step_time_s']:.2f} s)"
                )
            else:
                row.append(status(r) or "–")
        time_rows.append(row)
    lines += ["Peak memory (states):", ""] + _table(["depth", *impls], mem_rows)
    lines += ["", "Step time relative to plain (seconds):", ""]
    lines += _table(["depth", *impls], time_rows) + [""]
    if "memcnn" in impls and memory_method == "cpu_tensor_tracker":
        lines += [
            "memcnn frees each block's input with `storage().resize_(0)`, outside the "
            "dispatcher: the CPU tracker does not see those frees, so memcnn's CPU figures "
            "are upper bounds (its growth of one state per block here is most likely that); "
            "CUDA's `max_memory_allocated` sees them.",
            "",
        ]
    skipped = {r["result"]["skipped"] for r in runs if "skipped" in r["result"]}
    lines += [f"Skipped: {s}." for s in sorted(skipped)]
    rs = [get["revseg", d] for d in depths if ("revseg", d) in get and ok(get["revseg", d])]
    if not rs:
        return lines
    worst = max(r["states"] for r in rs)
    goals.values["c_revseg_max_states"] = worst
    below = all(
        get["revseg", d]["states"] < get[i, d]["states"]
        for d in depths
        for i in impls
        if i != "revseg" and (i, d) in get and ok(get[i, d]) and ok(get["revseg", d])
    )
    goals.values["c_revseg_below_every_peer"] = below
    suffix = "; below every peer at every depth" if below else "; NOT below every peer"
    goals.add("c_states", worst, also=below, suffix=suffix)
    for peer in ("checkpoint", "memcnn", "revlib"):
        pairs = [
            (get["revseg", d], get[peer, d])
            for d in depths
            if (peer, d) in get and ok(get[peer, d]) and ok(get.get(("revseg", d), {"error": 1}))
        ]
        if not pairs:
            continue
        # summed over depths: the total time of the depth sweep, less noisy than one depth
        ratio = sum(a["step_time_s"] for a, _ in pairs) / sum(b["step_time_s"] for _, b in pairs)
        goals.add(f"c_time_vs_{peer}", ratio, f"c_time_vs_{peer}", peer=peer)
        goals.values[f"c_states_min_{peer}"] = min(b["states"] for _, b in pairs)
    return [*lines, ""]


def _section_d(runs: list[dict[str, Any]], goals: _Goals) -> list[str]:
    lines = [
        "## d. hyperbolic_blr",
        "",
        "Fully reversible hyperbolic network (Peters et al.), video input (B, 3, T, H, W), "
        "Dice loss, Adam. Rank `null` = full n x n kernels.",
        "",
    ]
    lines += _net_table(runs, "T x H x W", "step s")
    deep = [r for r in runs if r["spec"].get("layers") == 54 and ok(r["result"])]
    ref = [
        r
        for r in runs
        if deep
        and r["spec"].get("layers") == 27
        and r["spec"].get("rank") == "4"
        and r["spec"]["size"] == deep[0]["spec"]["size"]
        and ok(r["result"])
    ]
    if deep and ref:
        ratio = deep[0]["result"]["peak_bytes"] / ref[0]["result"]["peak_bytes"]
        goals.add("d_doubled_depth", ratio, "d_doubled_depth_ratio")
    return lines


def _predicted(predicted: list[dict[str, Any]], goals: _Goals) -> list[str]:
    lines = [
        "## Predicted by the planner at sizes too large for this machine",
        "",
        "`scripts/memory_plan.py` for the same configs (tensor bytes, what "
        "`max_memory_allocated` counts; cuDNN workspaces not included). Not measured here: "
        "the planner's error against measurement is in the tables above.",
        "",
    ]
    rows = [
        [
            "x".join(map(str, r["spec"]["size"])),
            r["spec"]["label"],
            f"{r['result']['params']:,}",
            mib(r["result"]["planned_peak_bytes"]),
            fmt(r["result"]["planned_peak_bytes"] / r["result"]["voxels"], 0),
        ]
        for r in predicted
    ]
    lines += _table(["input", "model", "params", "planned MiB", "bytes/voxel"], rows) + [""]
    get = {
        (r["spec"]["section"], r["spec"]["label"], tuple(r["spec"]["size"])): r["result"][
            "planned_peak_bytes"
        ]
        for r in predicted
    }
    for shape in dict.fromkeys(tuple(r["spec"]["size"]) for r in predicted):
        name = "x".join(map(str, shape))
        rev, base = get.get(("a", "prev_unet", shape)), get.get(("a", "unet_baseline", shape))
        if rev and base:
            goals.add("a_planned_peak", rev / base, f"a_planned_peak_ratio_{name}", s=name)
        d1 = get.get(("b", "prev_unet depth 1", shape))
        d4 = get.get(("b", "prev_unet depth 4", shape))
        if d1 and d4:
            goals.add("b_planned_depth", d4 / d1, f"b_planned_depth4_over_1_{name}", s=name)
    return lines


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the goal values.

    Args:
        results: the records of ``results.json`` (``spec``, ``result``).
        meta: its ``meta`` (the run's command, machine, load; ``plots``: the PNG files to show).
    """
    lines = _header(meta)
    head = len(lines)
    goals = _Goals()
    by: dict[str, list] = {}
    for r in results:
        if not r["spec"].get("plan_only"):
            by.setdefault(r["spec"]["section"], []).append(r)
    predicted = [
        r
        for r in results
        if r["spec"].get("plan_only") and r["spec"]["section"] not in "fg" and ok(r["result"])
    ]
    if "a" in by:
        lines += _section_a(by["a"], goals)
        _plan_errors(by, goals)
    if "b" in by:
        lines += _section_b(by["b"], goals)
    if "c" in by:
        lines += _section_c(by["c"], goals, meta["memory_method"])
    if "d" in by:
        lines += _section_d(by["d"], goals)
    if "e" in by:
        lines += zoo_report(by["e"], goals.values)
    for sec, module in (("g", precision), ("f", fov)):  # f, then g, right after the goals
        if any(r["spec"]["section"] == sec for r in results):
            section_lines, section_goals = module.report(results)
            lines[head:head] = section_lines
            for name, target, value, met in section_goals:
                goals.row(name, target, value, met)
                goals.values[name] = value
    if predicted:
        lines += _predicted(predicted, goals)
    goal_table = ["## Goals", "", *_table(["goal", "target", "measured", ""], goals.rows), ""]
    lines[head:head] = goal_table
    plots = meta.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines), goals.values


# --------------------------------------------------------------------------------------------
# section e


def zoo_report(runs: list[dict[str, Any]], values: dict[str, Any]) -> list[str]:
    """Section e's Markdown: a line per design (the ratios side by side), then every
    configuration; the ratios go into ``values``."""
    size = "x".join(map(str, runs[0]["spec"]["size"]))
    get = {zoo_key(r["spec"]): r["result"] for r in runs}
    depths = sorted({r["spec"]["depth"] for r in runs if r["spec"]["depth"] is not None})
    lo, hi = (depths[0], depths[-1]) if depths else (None, None)
    setting = next((r["spec"]["zoo_setting"] for r in runs if r["spec"]["zoo_setting"]), [])
    lines = [
        f"## e. The reversible zoo at {size}",
        "",
        "Every BraTS-like model config in `configs/model/` (`in_channels: 4`; the video model is "
        "section d), one training step (Adam, Dice loss, batch 1) at the same input. "
        + (
            f"Channels: `{' '.join(setting)}` for every design that takes them (the default "
            "channels include revnet_unet with batch pooling, whose every level holds the full "
            "volume at up to 480 channels: far too slow on a CPU)"
            if setting
            else "Every design at its config's default channels"
        )
        + "; compare the parameter counts. `off` is the same model with `memory_saving=false` "
        "(plain autograd on the same modules and parameters); for unet_baseline, saving is "
        "`checkpointing=true` (torch.utils.checkpoint per block) and `off` is the plain "
        f"baseline. Depth = `encoder_depth` = `decoder_depth` (blocks per sequence), {lo} and "
        f"{hi}. `activations` = the peak over the step of the planner's activation categories "
        "alone (reversible states, other activations, workspace; not parameters, gradients, "
        "optimizer state, batch): the part memory saving and depth act on, while parameters, "
        "gradients and Adam's moments grow with depth whatever the design.",
        "",
    ]
    groups = list(dict.fromkeys((r["spec"]["design"], r["spec"]["setting"]) for r in runs))
    rows = []
    for design, kind in groups:
        spec = next(
            r["spec"] for r in runs if (r["spec"]["design"], r["spec"]["setting"]) == (design, kind)
        )
        on_value = True if spec["switch"] else None
        base = lo if spec["depth"] is not None else None
        on, off = get.get((design, kind, base, on_value)), get.get((design, kind, base, False))
        deep_on = get.get((design, kind, hi, on_value)) if base is not None else None
        deep_off = get.get((design, kind, hi, False)) if base is not None else None
        ratios = {
            "peak_on_off": _ratio(on, off, "peak_bytes"),
            "activations_on_off": _ratio(on, off, "planned_activation_peak_bytes"),
            "time_on_off": _ratio(on, off, "step_time_s"),
            f"peak_depth{hi}_over_{lo}_on": _ratio(deep_on, on, "peak_bytes"),
            f"activations_depth{hi}_over_{lo}_on": _ratio(
                deep_on, on, "planned_activation_peak_bytes"
            ),
            f"activations_depth{hi}_over_{lo}_off": _ratio(
                deep_off, off, "planned_activation_peak_bytes"
            ),
        }
        name = design + (f"_{kind}" if kind else "")
        values.update({f"e_{name}_{k}": v for k, v in ratios.items() if v is not None})
        on = on or {"error": "not run"}
        cells = [fmt(v, 3) for v in ratios.values()]
        rows.append(
            [
                design,
                kind or "–",
                {"memory_saving": "reversible", "checkpointing": "checkpointing"}.get(
                    spec["switch"], "–"
                ),
                _params(on),
                mib(on.get("peak_bytes")),
                mib(on.get("planned_peak_bytes")),
                mib(on.get("planned_activation_peak_bytes")),
                *cells[:2],
                fmt(on.get("step_time_s")),
                *cells[2:],
            ]
        )
    header = ["design", "downsample", "saving by", "params", "peak MiB", "planned MiB"]
    header += ["activations MiB", "peak / off", "activations / off", "step s", "time / off"]
    header += [f"peak depth {hi} / {lo}", f"activations depth {hi} / {lo}", "same, off"]
    lines += [
        f"Saving on, depth {lo}; ratios to the same model with saving off (`/ off`) and of depth "
        f"{hi} to depth {lo} (saving on, then off):",
        "",
    ]
    lines += _table(header, rows) + [""]

    rows = []
    for r in runs:
        spec, res = r["spec"], r["result"]
        on_value = True if spec["switch"] else None
        off = get.get((spec["design"], spec["setting"], spec["depth"], False))
        first = get.get((spec["design"], spec["setting"], lo, spec["saving"]))
        saving = {True: "on", False: "off", None: "–"}[spec["saving"]]
        if spec["switch"] == "checkpointing" and spec["saving"]:
            saving = "checkpointing"
        vs_off = spec["saving"] == on_value and spec["switch"]
        rows.append(
            [
                spec["design"],
                spec["setting"] or "–",
                spec["depth"] or "–",
                saving,
                _params(res),
                mib(res.get("peak_bytes")),
                mib(res.get("planned_peak_bytes")),
                _plan_error(res),
                mib(res.get("planned_activation_peak_bytes")),
                fmt(_ratio(res, off, "peak_bytes"), 3) if vs_off else "–",
                fmt(_ratio(res, first, "peak_bytes"), 3) if spec["depth"] != lo else "–",
                fmt(res.get("step_time_s")),
                fmt(_ratio(res, off, "step_time_s"), 3) if vs_off else "–",
            ]
        )
    header = ["design", "downsample", "depth", "saving", "params", "peak MiB", "planned MiB"]
    header += ["plan error", "activations MiB", "peak / off", f"peak / depth {lo}", "step s"]
    header += ["time / off"]
    lines += ["Every configuration:", ""] + _table(header, rows) + [""]
    notes = list(dict.fromkeys(r["spec"]["zoo_note"] for r in runs if r["spec"].get("zoo_note")))
    notes += [
        f"planner failed for {r['spec']['label']}: {r['result']['plan_failure']}"
        for r in runs
        if r["result"].get("plan_failure")
    ]
    loads = [r["load"] for r in runs if r.get("load") is not None]
    if loads:
        notes.append(
            f"1-minute load average after each configuration: {min(loads):.2f} to "
            f"{max(loads):.2f} (times are noisy; memory figures are not)"
        )
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines


# --------------------------------------------------------------------------------------------
# files


def write_report(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """``README.md``, ``results.json`` (with the goal values) and the plots in ``out``."""
    from revseg.bench.plots import plots

    meta["plots"] = plots(results, out)
    text, values = report(results, meta)
    (out / "README.md").write_text(text + "\n")
    payload = {"meta": meta, "goals": values, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out / 'README.md'}")


def regenerate(results_json: Path, out: Path) -> None:
    """The report (``README.md``, ``results.json``, plots) made again from a ``results.json``,
    nothing run."""
    saved = json.loads(results_json.read_text())
    write_report(saved["results"], saved["meta"], out)
