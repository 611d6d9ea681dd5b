"""The box plot of an evaluation report (``boxplot.png``): Dice and HD95 per region over the
cases, drawn with Pillow (no matplotlib needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from revseg.data.figures import font

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


def _ticks(top: float) -> list[float]:
    """0 and round multiples (1, 2, 2.5 or 5 times a power of ten) of a step, the last one at
    ``top`` or just above it: 3 to 6 ticks."""
    if not top > 0:
        return [0.0, 1.0]
    power = 10 ** math.floor(math.log10(top / 4))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if top / (m * power) <= 5)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _panel(draw, box, title, columns, top_value) -> None:
    left, top, right, bottom = box
    scale = top_value if top_value > 0 else 1.0
    small = font(12)

    def y(v: float) -> float:
        return bottom - (bottom - top) * min(max(v / scale, 0.0), 1.0)

    def centred(x: float, y_top: float, text: str, fill, type_face) -> None:
        x0, _, x1, _ = draw.textbbox((0, 0), text, font=type_face)
        draw.text((x - (x1 - x0) / 2, y_top), text, fill=fill, font=type_face)

    for v in _ticks(scale):
        draw.line([(left, y(v)), (right, y(v))], fill=(225, 225, 225))
        text = f"{v:g}"
        x0, _, x1, _ = draw.textbbox((0, 0), text, font=small)
        draw.text((left - 6 - (x1 - x0), y(v) - 7), text, fill="black", font=small)
    draw.rectangle([left, top, right, bottom], outline="black")
    centred((left + right) / 2, top - 22, title, "black", font(14))
    width = (right - left) / max(len(columns), 1)
    for i, (name, stats) in enumerate(columns):
        colour = _COLOURS[i % len(_COLOURS)]
        cx = left + width * (i + 0.5)
        half = min(width * 0.25, 40)
        centred(cx, bottom + 6, name, "black", font(13))
        n = stats["n"] if stats else 0
        centred(cx, bottom + 24, f"n={n}", (90, 90, 90), small)
        if stats is None:
            centred(cx, (top + bottom) / 2, "n/a", (120, 120, 120), small)
            continue
        draw.line([(cx, y(stats["low"])), (cx, y(stats["q1"]))], fill=colour, width=2)
        draw.line([(cx, y(stats["q3"])), (cx, y(stats["high"]))], fill=colour, width=2)
        for end in ("low", "high"):
            draw.line([(cx - half / 2, y(stats[end])), (cx + half / 2, y(stats[end]))], fill=colour)
        draw.rectangle([cx - half, y(stats["q3"]), cx + half, y(stats["q1"])], outline=colour)
        draw.line(
            [(cx - half, y(stats["median"])), (cx + half, y(stats["median"]))],
            fill=colour,
            width=2,
        )
        for v in stats["outliers"]:
            draw.ellipse([cx - 3, y(v) - 3, cx + 3, y(v) + 3], outline=colour)


def box_plot(
    per_case: Mapping[str, Mapping[str, float]],
    regions: Sequence[str],
    missing: Sequence[str] = (),
    size: tuple[int, int] = (440, 900),
) -> Image.Image:
    """Box plots of ``dice_<region>`` (left) and ``hd95_<region>`` (right) over the cases.

    Args:
        per_case: case id -> metrics.
        regions: the regions drawn, a box each.
        missing: cases of ``per_case`` that had no prediction (scored Dice 0, HD95 at its
            maximum): left out of the boxes and counted in a line above them, so that they do
            not flatten the boxes of the predicted cases.
        size: ``(height, width)`` in pixels.

    NaN cells (a region empty in both, official convention) are left out; ``n`` under each box
    counts the cases drawn.
    """
    height, width = size
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left_out = set(missing)
    drawn = [m for case, m in per_case.items() if case not in left_out]
    if left_out:
        note = (
            f"{len(drawn)} case(s) with a prediction; {len(left_out)} without one (scored Dice 0 "
            "and the largest HD95 in the report's means) are not drawn"
        )
        draw.text((16, 8), note, fill=(160, 0, 0), font=font(13))
    for index, metric in enumerate(("dice", "hd95")):
        columns = [(r, box_statistics([float(m[f"{metric}_{r}"]) for m in drawn])) for r in regions]
        highs = [s["high"] for _, s in columns if s] + [
            v for _, s in columns if s for v in s["outliers"]
        ]
        top_value = 1.0 if metric == "dice" else _ticks(max(highs, default=1.0))[-1]
        half = width // 2
        left = index * half + 60
        title = "Dice per region" if metric == "dice" else "HD95 (mm) per region"
        box = (left, 64, index * half + half - 20, height - 48)
        _panel(draw, box, title, columns, top_value)
    return image
