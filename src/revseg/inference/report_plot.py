"""The box plot of an evaluation report (``boxplot.png``): Dice and HD95 per region over the
cases, drawn with Pillow (no matplotlib needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["box_plot", "box_statistics"]

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def box_statistics(values: Sequence[float]) -> dict[str, float] | None:
    """Tukey box of the finite values: quartiles, whiskers at the furthest values within
    1.5 IQR of the box, and the outliers beyond; None when there is no finite value."""
    data = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not data.size:
        return None
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    reach = 1.5 * (q3 - q1)
    inside = data[(data >= q1 - reach) & (data <= q3 + reach)]
    return {
        "q1": float(q1),
        "median": float(median),
        "q3": float(q3),
        "low": float(inside.min()),
        "high": float(inside.max()),
        "outliers": [float(v) for v in data[(data < q1 - reach) | (data > q3 + reach)]],
        "n": int(data.size),
    }


def _panel(draw, box, title, columns, top_value) -> None:
    left, top, right, bottom = box
    scale = top_value if top_value > 0 else 1.0

    def y(v: float) -> float:
        return bottom - (bottom - top) * min(max(v / scale, 0.0), 1.0)

    for step in range(5):
        v = scale * step / 4
        draw.line([(left, y(v)), (right, y(v))], fill=(225, 225, 225))
        draw.text((left - 44, y(v) - 6), f"{v:.3g}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, top - 16), title, fill="black")
    width = (right - left) / max(len(columns), 1)
    for i, (name, stats) in enumerate(columns):
        colour = _COLOURS[i % len(_COLOURS)]
        cx = left + width * (i + 0.5)
        half = width * 0.25
        draw.text((cx - 3 * len(name), bottom + 6), name, fill="black")
        if stats is None:
            draw.text((cx - 9, (top + bottom) / 2), "n/a", fill=(120, 120, 120))
            continue
        draw.line([(cx, y(stats["low"])), (cx, y(stats["q1"]))], fill=colour, width=2)
        draw.line([(cx, y(stats["q3"])), (cx, y(stats["high"]))], fill=colour, width=2)
        for end in ("low", "high"):
            draw.line([(cx - half / 2, y(stats[end])), (cx + half / 2, y(stats[end]))], fill=colour)
        draw.rectangle([cx - half, y(stats["q3"]), cx + half, y(stats["q1"])], outline=colour)
        draw.line([(cx - half, y(stats["median"])), (cx + half, y(stats["median"]))], fill=colour)
        for v in stats["outliers"]:
            draw.ellipse([cx - 2, y(v) - 2, cx + 2, y(v) + 2], outline=colour)
        draw.text((cx - half, top + 4), f"n={stats['n']}", fill=(90, 90, 90))


def box_plot(
    per_case: Mapping[str, Mapping[str, float]],
    regions: Sequence[str],
    size: tuple[int, int] = (360, 720),
) -> Image.Image:
    """Box plots of ``dice_<region>`` (left) and ``hd95_<region>`` (right) over the cases.

    NaN cells (a region empty in both, official convention) are left out; ``n`` above each box
    counts the cases drawn.
    """
    height, width = size
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for index, metric in enumerate(("dice", "hd95")):
        columns = [
            (r, box_statistics([float(m[f"{metric}_{r}"]) for m in per_case.values()]))
            for r in regions
        ]
        highs = [s["high"] for _, s in columns if s] + [
            v for _, s in columns if s for v in s["outliers"]
        ]
        top_value = 1.0 if metric == "dice" else max(highs, default=1.0) * 1.05
        half = width // 2
        left = index * half + 56
        title = "Dice per region" if metric == "dice" else "HD95 (mm) per region"
        _panel(draw, (left, 30, index * half + half - 14, height - 30), title, columns, top_value)
    return image
