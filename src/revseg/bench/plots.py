"""The benchmark's PNG plots: memory vs depth (sections b, c), vs field of view (a, d), the zoo (e).

Each plot is a function that draws on an axis; :func:`plots` makes, labels and saves the figures
(none without matplotlib, an optional dependency: the ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from revseg.bench.specs import ok, zoo_key

__all__ = ["plots"]

Records = list[dict[str, Any]]


def _sequence(ax, runs: Records) -> dict[str, str]:
    for impl in dict.fromkeys(r["spec"]["impl"] for r in runs):
        pts = sorted(
            (r["spec"]["depth"], r["result"]["states"]) for r in runs if r["spec"]["impl"] == impl
        )
        ax.plot(*zip(*pts), marker="o", label=impl)
    return {
        "xlabel": "blocks in the sequence",
        "ylabel": "peak memory (states)",
        "title": "c. one reversible sequence",
    }


def _depth(ax, runs: Records) -> dict[str, str]:
    for ms, label in ((True, "prev_unet"), (False, "prev_unet, memory saving off")):
        pts = sorted(
            (r["spec"]["depth"], r["result"]["peak_bytes"] / 2**20)
            for r in runs
            if r["spec"].get("memory_saving") is ms
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for r in runs:
        if r["spec"]["label"] == "unet_baseline":
            mib = r["result"]["peak_bytes"] / 2**20
            ax.axhline(mib, color="gray", ls="--", label="unet_baseline")
    return {
        "xlabel": "encoder depth (blocks per sequence)",
        "ylabel": "peak memory (MiB)",
        "title": f"b. encoder depth at {runs[0]['spec']['size'][0]}³",
    }


def _fov(ax, runs: Records) -> dict[str, str]:
    for label in dict.fromkeys(r["spec"]["label"] for r in runs):
        pts = sorted(
            (r["result"]["voxels"] / 1e6, r["result"]["peak_bytes"] / 2**20)
            for r in runs
            if r["spec"]["label"] == label
        )
        ax.plot(*zip(*pts), marker="o", label=label)
    return {
        "xlabel": "input voxels (millions)",
        "ylabel": "peak memory (MiB)",
        "title": "a. memory vs field of view",
    }


def _zoo_peaks(runs: Records) -> tuple[list[tuple[str, str]], dict[tuple, float], list[tuple]]:
    """The designs (with downsample kind), the peaks in MiB by configuration, the bars per
    design (depth, saving); a design without depth keys (unet_baseline) is drawn as the least
    depth."""
    groups = list(dict.fromkeys((r["spec"]["design"], r["spec"]["setting"]) for r in runs))
    depths = sorted({r["spec"]["depth"] for r in runs if r["spec"]["depth"] is not None})
    lo = depths[0] if depths else None
    get = {
        (*zoo_key(r["spec"])[:2], r["spec"]["depth"] or lo, r["spec"]["saving"]): r["result"][
            "peak_bytes"
        ]
        / 2**20
        for r in runs
    }
    return groups, get, list(dict.fromkeys(k[2:] for k in get))


def _zoo(ax, runs: Records) -> dict[str, str]:
    groups, get, bars = _zoo_peaks(runs)
    height = 0.8 / len(bars)
    for j, (depth, saving) in enumerate(bars):
        name = "saving " + {True: "on", False: "off", None: "–"}[saving]
        ys = [i + j * height for i in range(len(groups))]
        xs = [get.get((d, k, depth, saving), 0) for d, k in groups]
        ax.barh(ys, xs, height, label=name + (f", depth {depth}" if depth else ""))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(groups))])
    ax.set_yticklabels([d + (f"\n{k}" if k else "") for d, k in groups], fontsize=8)
    ax.invert_yaxis()
    return {
        "xlabel": "peak memory (MiB)",
        "title": f"e. the zoo at {runs[0]['spec']['size'][0]}³ (unet_baseline: checkpointing)",
    }


def _zoo_size(runs: Records) -> tuple[float, float]:
    groups, _, bars = _zoo_peaks(runs)
    return 7, 1 + 0.25 * len(groups) * len(bars)


# file, sections, draw, figure size, grid axis, legend font size
_PLOTS: tuple[tuple[str, tuple[str, ...], Callable, Any, str, Any], ...] = (
    ("memory_vs_depth_sequence.png", ("c",), _sequence, (6, 4), "both", None),
    ("memory_vs_depth_unet.png", ("b",), _depth, (6, 4), "both", None),
    ("memory_vs_fov.png", ("a", "d"), _fov, (6, 4), "both", None),
    ("memory_zoo.png", ("e",), _zoo, _zoo_size, "x", 8),
)


def plots(results: Records, out: Path) -> list[str]:
    """PNG plots of the measured results in ``out``; the file names (none without matplotlib).

    Memory vs field of view needs more than one input size in sections a and d.
    """
    if importlib.util.find_spec("matplotlib") is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    measured = [r for r in results if not r["spec"].get("plan_only") and ok(r["result"])]
    for name, sections, draw, size, grid, legend in _PLOTS:
        runs = [r for r in measured if r["spec"]["section"] in sections]
        if not runs or (draw is _fov and len({r["spec"]["size"][0] for r in runs}) < 2):
            continue
        fig, ax = plt.subplots(figsize=size(runs) if callable(size) else size)
        ax.set(**draw(ax, runs))
        ax.grid(axis=grid, alpha=0.3)
        ax.legend(fontsize=legend)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made
