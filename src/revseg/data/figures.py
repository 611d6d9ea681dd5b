"""The labelled validation figure a run shows besides its scalars (TensorBoard's
``val/slice_input_label_prediction`` and ``val_slice.png`` in the run directory), drawn by each
data module's ``preview``.

The figure puts input, truth and prediction side by side under their titles, enlarged to a
readable size, with a legend of the colour of each region or label. Overlapping regions (BraTS
WT, TC, ET) are drawn in order, each opaque over the last, so a pixel takes the colour of the
innermost region that holds it and colours never mix. Drawn with Pillow (no matplotlib).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from revseg.files import write_atomic
from revseg.metrics.brats import REGIONS
from revseg.metrics.video import VOID, overlay_frame

__all__ = [
    "PALETTE",
    "figure",
    "font",
    "frame_figure",
    "label_index",
    "save_png",
    "slice_figure",
    "slice_panel",
]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermilion
    (204, 121, 167),  # reddish purple
    (255, 255, 255),  # white
)
"""Colour of the k-th region or label (Okabe and Ito's colour-blind-safe set, then white)."""

_VOID_COLOUR = (128, 128, 128)
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def font(size: int = 14) -> ImageFont.ImageFont:
    """Pillow's own scalable font at ``size`` pixels (its small bitmap font before Pillow 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, ImportError, OSError):
        return ImageFont.load_default()


def _colour(k: int) -> tuple[int, int, int]:
    return PALETTE[k % len(PALETTE)]


def label_index(masks: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` masks -> ``(H, W)`` long: 0 where none holds, else ``c + 1`` for the last
    channel ``c`` that holds the pixel (channels drawn in order; for nested regions listed from
    the outermost, the innermost)."""
    index = torch.zeros(masks.shape[1:], dtype=torch.long)
    for c in range(masks.shape[0]):
        index[masks[c].bool()] = c + 1
    return index


def _normalise(image: torch.Tensor) -> torch.Tensor:
    image = image.detach().float().cpu()
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)


def _paint(base: torch.Tensor, index: torch.Tensor, void: torch.Tensor | None = None):
    """``base`` ``(3, H, W)`` in [0, 1] with each labelled pixel in its label's opaque colour."""
    out = base.clone()
    for k in index.unique().tolist():
        if k:
            out[:, index == k] = torch.tensor(_colour(k - 1), dtype=out.dtype).view(3, 1) / 255
    if void is not None:
        out[:, void] = torch.tensor(_VOID_COLOUR, dtype=out.dtype).view(3, 1) / 255
    return out


def _pil(image: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` RGB tensor in [0, 1] as an 8-bit Pillow image."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")


def _text_width(draw: ImageDraw.ImageDraw, text: str, type_face) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=type_face)
    return int(right - left)


def figure(
    panels: Sequence[tuple[str, torch.Tensor]],
    legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
    caption: str = "",
    min_size: int = 192,
) -> torch.Tensor:
    """Panels side by side under their titles, a legend and a caption below.

    Args:
        panels: ``(title, (3, H, W) image in [0, 1])``, all of one size.
        legend: ``(name, RGB colour)`` swatches, in rows as wide as the panels.
        caption: a line of text under the legend.
        min_size: panels are enlarged by a whole factor (nearest neighbour, so voxels stay
            sharp) until their longer side reaches this many pixels.

    Returns:
        A ``(3, H', W')`` RGB image in [0, 1], as ``SummaryWriter.add_image`` takes it.
    """
    height, width = panels[0][1].shape[-2:]
    scale = max(1, math.ceil(min_size / max(height, width, 1)))
    ph, pw = height * scale, width * scale
    gap, band = 8, 24
    type_face = font(14)
    total_w = gap + len(panels) * (pw + gap)
    # legend rows: swatch, name, spacing; wrapped at the figure's width
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    used = gap
    for name, colour in legend:
        item = 16 + 6 + _text_width(probe, name, type_face) + 18
        if rows[-1] and used + item > total_w:
            rows.append([])
            used = gap
        rows[-1].append((name, colour, used))
        used += item
    rows = [row for row in rows if row]
    total_h = band + ph + gap + 22 * len(rows) + (22 if caption else 0) + gap
    canvas = Image.new("RGB", (total_w, total_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (title, image) in enumerate(panels):
        left = gap + i * (pw + gap)
        canvas.paste(_pil(image).resize((pw, ph), Image.NEAREST), (left, band))
        text_w = _text_width(draw, title, type_face)
        draw.text((left + (pw - text_w) / 2, 4), title, fill=_TEXT, font=type_face)
    top = band + ph + gap
    for r, row in enumerate(rows):
        y = top + 22 * r
        for name, colour, x in row:
            draw.rectangle([x, y + 1, x + 15, y + 16], fill=colour, outline=_TEXT)
            draw.text((x + 22, y), name, fill=_TEXT, font=type_face)
    if caption:
        draw.text((gap, top + 22 * len(rows)), caption, fill=(80, 80, 80), font=type_face)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def slice_figure(
    image: torch.Tensor,
    label: torch.Tensor,
    pred: torch.Tensor,
    names: Sequence[str] = REGIONS,
    channel: int = -1,
    channel_name: str | None = None,
    background: bool = False,
) -> torch.Tensor:
    """The middle slice of a volume: input, truth and prediction, one colour per region or label.

    Args:
        image: ``(C, D, H, W)`` input (or ``(C, H, W)``, one slice); ``channel`` picks the one
            shown (default the last: FLAIR in BraTS order t1, t1ce, t2, flair).
        label: ``(K, D, H, W)`` region masks (WT, TC, ET: nested, listed from the outermost) or
            one-hot labels.
        pred: the predicted masks, in ``label``'s layout.
        names: the name of each channel of ``label`` (without the background).
        channel_name: the input's name in its panel title.
        background: channel 0 of ``label`` and ``pred`` is the background (one-hot labels) and
            is not drawn.

    The slice is the middle one along the last spatial axis (axial for BraTS volumes).

    Returns:
        A labelled ``(3, H', W')`` RGB figure in [0, 1] (:func:`figure`).
    """
    first = 1 if background else 0
    if image.dim() == 3:  # one 2D slice
        image, label, pred = image[..., None], label[..., None], pred[..., None]
    z, depth = image.shape[-1] // 2, image.shape[-1]
    gray = _normalise(image[channel, :, :, z]).expand(3, -1, -1)
    truth = label_index(label[first:, :, :, z].detach().cpu() > 0.5)
    guess = label_index(pred[first:, :, :, z].detach().cpu() > 0.5)
    title = f"input ({channel_name})" if channel_name else "input"
    panels = [(title, gray), ("truth", _paint(gray, truth)), ("prediction", _paint(gray, guess))]
    legend = [(name, _colour(k)) for k, name in enumerate(names)]
    return figure(panels, legend, f"slice {z} of {depth} along the last axis")


def slice_panel(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The trainer's figure for the BraTS data (:func:`slice_figure` of WT, TC, ET and FLAIR)."""
    names = REGIONS + tuple(f"region {k}" for k in range(len(REGIONS), label.shape[0]))
    return slice_figure(image, label, pred, names[: label.shape[0]], -1, "FLAIR")


def frame_figure(
    image: torch.Tensor,
    label: torch.Tensor,
    pred: torch.Tensor,
    names: Sequence[str],
    frame: int | None = None,
) -> torch.Tensor:
    """One frame of a video: input, truth, prediction (one colour per object) and errors.

    Args:
        image: ``(3, T, H, W)`` RGB video (any scale: the frame is min-max normalised).
        label: ``(C, T, H, W)`` objects in {0, 1}, :data:`~revseg.metrics.video.VOID` on void.
        pred: ``(C, T, H, W)`` binary prediction.
        names: the name of each object channel.
        frame: the frame shown; None = the middle one.

    Returns:
        A labelled ``(3, H', W')`` RGB figure in [0, 1] (:func:`figure`); the errors panel is
        :func:`~revseg.metrics.video.overlay_frame`.
    """
    t = image.shape[1] // 2 if frame is None else frame
    rgb = _normalise(image[:, t])
    lab = label[:, t].detach().cpu()
    void = (lab == VOID).any(0)
    truth = label_index((lab == 1) & ~void)
    guess = label_index(pred[:, t].detach().cpu() > 0.5)
    panels = [
        ("input", rgb),
        ("truth", _paint(rgb, truth, void)),
        ("prediction", _paint(rgb, guess)),
        ("errors", overlay_frame(image, label, pred, t)),
    ]
    legend = [(name, _colour(k)) for k, name in enumerate(names)]
    legend.append(("void", _VOID_COLOUR))
    caption = (
        f"frame {t} of {image.shape[1]}; errors: green hit, red false positive, blue missed, "
        "grey void"
    )
    return figure(panels, legend, caption)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a ``(3, H, W)`` RGB image in [0, 1] as a PNG file, atomically (a reader sees the
    previous figure or the new one, never half of one)."""
    png = _pil(image)
    return write_atomic(path, lambda f: png.save(f, format="PNG"))
