"""A small DAVIS-like video generated on disk, for the video demo and the tests.

One sequence of textured objects moving over a textured, slowly panning background:

- each object is a perturbed ellipse that drifts along a smooth path and rotates, filled with a
  stripe texture that moves with it;
- the background is a smooth random colour field with fine grain, and holds a static "distractor"
  blob of the same mean colour as an object but without its stripes;
- a global brightness flicker, pixel noise and JPEG compression.

Colour alone does not separate the objects from the background (no per-channel threshold does,
see the tests); the stripe texture and the motion do, so a small 3D network learns the task.

The files follow the DAVIS 2016/2017 layout exactly::

    root/dataset.json                               # the generator's manifest
    root/JPEGImages/480p/<sequence>/00000.jpg ...   # RGB frames
    root/Annotations/480p/<sequence>/00000.png ...  # palette PNG: 0 background, k object k,
                                                    # 255 void (only with void_width > 0)

(``480p`` is the folder name DAVIS uses; the frames have the generated size.) The video depends
only on ``(seed, frames, size, num_objects, void_width)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from revseg.data.synthetic import publish_folder, read_generator_manifest
from revseg.errors import DataError

__all__ = [
    "DAVIS_PALETTE",
    "GENERATOR",
    "GENERATOR_VERSION",
    "VOID_INDEX",
    "make_synthetic_video",
    "read_video_manifest",
    "save_palette_png",
    "synthesize_video",
]

GENERATOR = "revseg.data.synthetic_video"
GENERATOR_VERSION = 2
VOID_INDEX = 255
"""Palette index of "void" pixels in DAVIS annotations (left out of the loss and the metrics)."""


def _davis_palette() -> np.ndarray:
    """The 256-colour palette of DAVIS annotations (the PASCAL VOC colour map): ``(256, 3)``."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        code, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((code >> 0) & 1) << (7 - bit)
            g |= ((code >> 1) & 1) << (7 - bit)
            b |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette[index] = (r, g, b)
    return palette


DAVIS_PALETTE = _davis_palette()
"""``(256, 3)`` uint8: index 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ..., 255 (224, 224, 192)."""


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], scale: float, channels: int = 1
) -> np.ndarray:
    """``(channels, *shape)`` zero-mean, unit-std noise smooth over about ``scale`` pixels."""
    coarse = tuple(max(2, int(np.ceil(n / scale)) + 1) for n in shape)
    out = np.empty((channels, *shape), dtype=np.float32)
    for c in range(channels):
        field = ndimage.zoom(
            rng.standard_normal(coarse).astype(np.float32),
            [n / k for n, k in zip(shape, coarse)],
            order=3,
            grid_mode=True,
            mode="nearest",
        )[tuple(slice(0, n) for n in shape)]
        field -= field.mean()
        out[c] = field / max(float(field.std()), 1e-6)
    return out


def synthesize_video(
    seed: int = 0,
    frames: int = 40,
    size: Sequence[int] = (96, 96),
    num_objects: int = 2,
    void_width: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one video in memory.

    Args:
        seed: generator seed.
        frames: number of frames, >= 1.
        size: frame size ``(H, W)``, each >= 16.
        num_objects: number of moving objects (palette indices 1..num_objects), 1 to 8.
        void_width: width in pixels of a void band (index 255) along object boundaries, as in the
            DAVIS annotations that have one; 0 = no void.

    Returns:
        ``(video, mask)``: video ``(T, H, W, 3)`` uint8 RGB; mask ``(T, H, W)`` uint8 palette
        indices (0 background, k object k, 255 void). Later objects occlude earlier ones.
    """
    height, width = (int(n) for n in size)
    frames, num_objects, void_width = int(frames), int(num_objects), int(void_width)
    if frames < 1 or height < 16 or width < 16:
        raise ValueError(f"need frames >= 1 and size >= 16x16, got {frames} of {height}x{width}")
    if not 1 <= num_objects <= 8:
        raise ValueError(f"num_objects must be 1 to 8, got {num_objects}")
    if void_width < 0:
        raise ValueError(f"void_width must be >= 0, got {void_width}")
    rng = np.random.default_rng([int(seed), frames, height, width, num_objects])
    small = float(min(height, width))

    # background: a smooth colour field larger than the frame, panned by the camera
    pan = np.array([rng.uniform(-0.15, 0.15) * height, rng.uniform(-0.25, 0.25) * width])
    margin = np.ceil(np.abs(pan)).astype(int) + 1
    big = (height + 2 * margin[0], width + 2 * margin[1])
    base = rng.uniform(0.35, 0.65, 3).astype(np.float32)
    background = (
        base[:, None, None]
        + 0.12 * _smooth_field(rng, big, small / 4, 1)  # light and shade
        + 0.07 * _smooth_field(rng, big, small / 4, 3)  # some colour
    )
    background += 0.04 * _smooth_field(rng, big, 1.5, 1)  # fine grain, all channels alike

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    time = np.linspace(0.0, 1.0, frames, dtype=np.float32)

    objects = []
    for _ in range(num_objects):
        radius = rng.uniform(0.14, 0.22, 2) * small
        centre = rng.uniform(0.3, 0.7, 2) * (height, width)
        amplitude = rng.uniform(0.1, 0.2, 2) * (height, width)
        objects.append(
            {
                "radius": radius,
                "centre": centre,
                "amplitude": amplitude,
                "phase": rng.uniform(0, 2 * np.pi, 2),
                "cycles": rng.uniform(0.5, 1.0, 2) * rng.choice([-1, 1], 2),
                "angle": rng.uniform(0, np.pi),
                "spin": rng.uniform(-1.5, 1.5),
                "harmonics": rng.normal(0.0, 0.08, (3, 2)),  # boundary wobble, orders 2..4
                "period": max(4.0, rng.uniform(4.0, 6.0) * small / 64),  # pixels per stripe
                "stripe_angle": rng.uniform(0, np.pi),
                # mean colour drawn from the background's own range: colour alone is ambiguous
                "colour": np.clip(base + rng.normal(0.0, 0.1, 3), 0.2, 0.8).astype(np.float32),
                "contrast": rng.uniform(0.12, 0.2),
            }
        )
    # a static distractor on the background: an object's mean colour, smooth, no stripes
    distractor_centre = rng.uniform(0.2, 0.8, 2) * (height, width)
    distractor_radius = rng.uniform(0.1, 0.16) * small
    distractor_colour = objects[0]["colour"]

    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    mask = np.zeros((frames, height, width), dtype=np.uint8)
    for t, s in enumerate(time):
        dy, dx = (margin + np.rint(pan * (s - 0.5))).astype(int)
        frame = background[:, dy : dy + height, dx : dx + width].copy()
        # the distractor is part of the scene: it pans with the background
        d = np.hypot(
            yy - distractor_centre[0] + pan[0] * (s - 0.5),
            xx - distractor_centre[1] + pan[1] * (s - 0.5),
        )
        weight = np.clip(distractor_radius + 0.5 - d, 0.0, 1.0)
        frame = frame * (1 - weight) + distractor_colour[:, None, None] * weight
        labels = np.zeros((height, width), dtype=np.uint8)
        for index, obj in enumerate(objects, start=1):
            cy, cx = obj["centre"] + obj["amplitude"] * np.sin(
                2 * np.pi * obj["cycles"] * s + obj["phase"]
            )
            angle = obj["angle"] + obj["spin"] * s
            u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
            v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
            theta = np.arctan2(v, u)
            wobble = 1.0 + sum(
                a * np.cos(k * theta) + b * np.sin(k * theta)
                for k, (a, b) in zip((2, 3, 4), obj["harmonics"])
            )
            rho = np.hypot(u / obj["radius"][0], v / obj["radius"][1]) / wobble
            inside = rho < 1.0
            # about one pixel of anti-aliasing at the boundary
            edge = np.clip((1.0 - rho) * obj["radius"].mean() + 0.5, 0.0, 1.0)
            phase = u * np.cos(obj["stripe_angle"]) + v * np.sin(obj["stripe_angle"])
            stripes = np.sin(2 * np.pi * phase / obj["period"]).astype(np.float32)
            texture = obj["colour"][:, None, None] + obj["contrast"] * stripes[None]
            texture[0] -= 0.5 * obj["contrast"] * stripes  # stripes shift hue, not only brightness
            frame = frame * (1 - edge) + texture * edge
            labels[inside] = index
        frame *= 1.0 + 0.04 * np.sin(2 * np.pi * 3 * s)  # flicker
        frame += rng.normal(0.0, 0.02, frame.shape).astype(np.float32)
        video[t] = np.clip(np.rint(frame.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        if void_width:
            size_ = 2 * void_width + 1
            boundary = ndimage.maximum_filter(labels, size_) != ndimage.minimum_filter(
                labels, size_
            )
            labels = labels.copy()
            labels[boundary] = VOID_INDEX
        mask[t] = labels
    return video, mask


def read_video_manifest(root: str | os.PathLike) -> dict | None:
    """The ``dataset.json`` of a video written by :func:`make_synthetic_video`, else None."""
    return read_generator_manifest(root, GENERATOR)


def _settings(sequence, frames, size, num_objects, void_width, seed) -> dict:
    return {
        "version": GENERATOR_VERSION,
        "sequence": sequence,
        "frames": frames,
        "size": list(size),
        "num_objects": num_objects,
        "void_width": void_width,
        "seed": seed,
    }


def _is_complete(root: Path, settings: dict) -> bool:
    manifest = read_video_manifest(root)
    if manifest is None or {k: manifest.get(k) for k in settings} != settings:
        return False
    sequence, frames = settings["sequence"], settings["frames"]
    return all(
        (root / folder / "480p" / sequence / f"{t:05d}.{ext}").is_file()
        for folder, ext in (("JPEGImages", "jpg"), ("Annotations", "png"))
        for t in range(frames)
    )


def save_palette_png(indices: np.ndarray, path: str | os.PathLike) -> None:
    """Write an ``(H, W)`` uint8 index map as a palette PNG with the DAVIS palette."""
    image = Image.fromarray(np.ascontiguousarray(indices, dtype=np.uint8), mode="P")
    image.putpalette(DAVIS_PALETTE.tobytes())
    image.save(path, optimize=False)


def _write_video(folder: Path, settings: dict) -> None:
    video, mask = synthesize_video(
        settings["seed"],
        settings["frames"],
        settings["size"],
        settings["num_objects"],
        settings["void_width"],
    )
    frames_dir = folder / "JPEGImages" / "480p" / settings["sequence"]
    masks_dir = folder / "Annotations" / "480p" / settings["sequence"]
    frames_dir.mkdir(parents=True)
    masks_dir.mkdir(parents=True)
    for t in range(len(video)):
        Image.fromarray(video[t]).save(frames_dir / f"{t:05d}.jpg", quality=95, subsampling=0)
        save_palette_png(mask[t], masks_dir / f"{t:05d}.png")
    manifest = {
        "generator": GENERATOR,
        **settings,
        "layout": "davis",
        "labels": {
            "0": "background",
            **{str(k): f"object {k}" for k in range(1, 9)},
            "255": "void",
        },
    }
    # written last: its presence marks a complete dataset
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")


def make_synthetic_video(
    root: str | os.PathLike,
    sequence: str = "blobs",
    frames: int = 40,
    size: Sequence[int] = (96, 96),
    seed: int = 0,
    num_objects: int = 2,
    void_width: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a one-sequence DAVIS-layout video dataset at ``root`` and return its path.

    The dataset is built in a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a half-written ``root``; asking again for the same settings keeps the
    existing files. 40 frames of 96x96 take about half a second.

    Args:
        root: dataset folder to create (its parent is created if needed).
        sequence: sequence name (the folder under ``JPEGImages/480p``).
        frames: number of frames, >= 1.
        size: frame size ``(H, W)``, each >= 16.
        seed: generator seed; the same settings give identical files.
        num_objects: moving objects, palette indices 1..num_objects (1 to 8).
        void_width: width of a void band (index 255) along object boundaries; 0 = none.
        overwrite: replace an existing video written by this generator with other settings.
            A folder not written by the generator is never replaced.

    Returns:
        ``root`` as a :class:`pathlib.Path`.

    Raises:
        DataError: ``root`` exists with other contents and ``overwrite`` is False, or ``root`` is
            a non-empty folder not written by this generator.
        ValueError: an argument is invalid.
    """
    root = Path(root)
    size = tuple(int(n) for n in size)
    if len(size) != 2:
        raise ValueError(f"size must be 2 ints (H, W), got {list(size)}")
    if not sequence or "/" in sequence or sequence.startswith("."):
        raise ValueError(f"sequence must be a plain folder name, got {sequence!r}")
    settings = _settings(sequence, int(frames), size, int(num_objects), int(void_width), int(seed))
    if settings["frames"] < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    synthesize_video(seed, 1, size, num_objects, void_width)  # validates the arguments, cheaply

    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if _is_complete(root, settings):
            return root
        manifest = read_video_manifest(root)
        if not overwrite or manifest is None:
            found = (
                "is not a video written by revseg's generator (no matching dataset.json)"
                if manifest is None
                else "holds a synthetic video of "
                + ", ".join(f"{k}={manifest.get(k)}" for k in settings)
            )
            wanted = ", ".join(f"{k}={v}" for k, v in settings.items())
            raise DataError(
                f"{root}: {found}, not {wanted}; delete it, choose another folder"
                + ("" if manifest is None else " or overwrite it (--overwrite)")
            )

    return publish_folder(
        root, lambda folder: _write_video(folder, settings), lambda: _is_complete(root, settings)
    )
