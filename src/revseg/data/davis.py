"""DAVIS video data: one sequence as a volume (time = depth), with sparse frame supervision.

Peters et al. train on a single DAVIS video "where only three time-slices have annotations" and
evaluate every frame. The data module :class:`DavisData` does that: it reads one sequence of a
DAVIS 2016/2017 dataset (Perazzi et al. 2016; Pont-Tuset et al. 2017)::

    root/JPEGImages/480p/<sequence>/00000.jpg ...
    root/Annotations/480p/<sequence>/00000.png ...   # palette PNG: 0 background, k object k,
                                                     # 255 void; or DAVIS 2016's 0/255 binary

resamples it to ``frames`` frames of ``size`` and yields batches::

    {"image":     (1, 3, T, H, W) float32,   # RGB, z-scored per channel over the video
     "label":     (1, C, T, H, W) float32,   # object masks (C = 1: object vs background)
     "loss_mask": (1, 1, T, 1, 1) float32,   # which voxels enter the loss, see below
     "case":      [sequence name]}

Validation scores J and F in the convention ``metrics_convention`` (see
:mod:`revseg.metrics.video`): ``official`` (the default) as the DAVIS 2017 toolkit does, against
every annotation file at its own resolution, per object, on source frames ``1 .. T-2``; the
prediction of the volume is mapped back onto the source frames first
(:meth:`DavisData.annotations`).

Training and validation use the same video. Training batches are supervised only on the
``annotated_frames``: ``loss_mask`` is 1 on those frames and 0 elsewhere, and the training label
is zeroed outside them, so nothing else of the ground truth reaches the loss. Validation batches
carry the labels of all frames, with void voxels set to :data:`~revseg.metrics.video.VOID`
(255) so that the metrics leave them out, and a ``loss_mask`` of ones. When the frames a mask
selects hold void voxels, that mask is ``(1, 1, T, H, W)`` and also 0 on them (in training the
void voxels of the label are 0). Either shape broadcasts over the label, as the loss expects.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from revseg.data.checks import Problem
from revseg.data.figures import frame_figure
from revseg.data.synthetic_video import DAVIS_PALETTE, VOID_INDEX, make_synthetic_video
from revseg.errors import ConfigError, DataError
from revseg.files import write_text_atomic
from revseg.metrics.video import (
    CONVENTIONS,
    VOID,
    Annotations,
    VideoMetrics,
    resize_indices,
    to_indices,
)
from revseg.validation import positive_ints

__all__ = [
    "DAVIS_PALETTE",
    "VOID_INDEX",
    "DavisData",
    "annotated_indices",
    "find_sequences",
    "list_frames",
    "read_mask",
    "temporal_indices",
    "volume_frames",
    "write_masks",
]

log = logging.getLogger(__name__)

_OBJECTS = ("binary", "all")


# ------------------------------------------------------------------------------ discovery


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data.root: directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"data.root: not a directory: {root}")


def find_sequences(root: str | os.PathLike, resolution: str = "480p") -> list[str]:
    """The sequence names of a DAVIS dataset: the folders of ``root/JPEGImages/<resolution>``.

    Raises:
        DataError: ``root`` is missing or is not in the DAVIS layout.
    """
    root = Path(root)
    _check_root(root)
    frames_root = root / "JPEGImages" / resolution
    if not frames_root.is_dir():
        raise DataError(
            f"data.root: {root} has no JPEGImages/{resolution} folder (expected the DAVIS layout "
            f"<root>/JPEGImages/{resolution}/<sequence>/00000.jpg)"
        )
    return sorted(p.name for p in frames_root.iterdir() if p.is_dir() and p.name[0] != ".")


def list_frames(
    root: str | os.PathLike, sequence: str, resolution: str = "480p"
) -> tuple[list[Path], list[Path]]:
    """The frame and mask files of one sequence, in frame order, one mask per frame.

    Returns:
        ``(frames, masks)``: ``root/JPEGImages/<resolution>/<sequence>/*.jpg`` and the matching
        ``root/Annotations/<resolution>/<sequence>/*.png``.

    Raises:
        DataError: unknown sequence (the message lists the available ones), no frames, no mask
            folder, or frames and masks that do not pair up (the message names the first
            unmatched file).
    """
    root = Path(root)
    sequences = find_sequences(root, resolution)
    if sequence not in sequences:
        shown = ", ".join(sequences[:40]) + (
            f", ... ({len(sequences)} in all)" if len(sequences) > 40 else ""
        )
        raise DataError(
            f"data.sequence={sequence!r}: no such sequence in {root / 'JPEGImages' / resolution}; "
            f"available: {shown or 'none'}"
        )
    frames_dir = root / "JPEGImages" / resolution / sequence
    masks_dir = root / "Annotations" / resolution / sequence
    frames = sorted(p for p in frames_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not frames:
        raise DataError(f"data.root: no .jpg frames in {frames_dir}")
    if not masks_dir.is_dir():
        raise DataError(f"data.root: mask folder not found: {masks_dir}")
    masks = sorted(p for p in masks_dir.iterdir() if p.suffix.lower() == ".png")
    if len(masks) != len(frames):
        frame_stems, mask_stems = {p.stem for p in frames}, {p.stem for p in masks}
        missing = sorted(frame_stems - mask_stems)
        extra = sorted(mask_stems - frame_stems)
        detail = (
            f"first frame without a mask: {frames_dir / missing[0]}.jpg"
            if missing
            else f"first mask without a frame: {masks_dir / extra[0]}.png"
            if extra
            else "names do not pair up"
        )
        raise DataError(
            f"data.root: {masks_dir} has {len(masks)} masks for {len(frames)} frames in "
            f"{frames_dir}; {detail}"
        )
    for frame, mask in zip(frames, masks):
        if frame.stem != mask.stem:
            raise DataError(
                f"data.root: frame {frame} has no mask {masks_dir / frame.stem}.png "
                f"(found {mask.name} instead)"
            )
    return frames, masks


# --------------------------------------------------------------------------- reading files

_PALETTE_CODES = (
    DAVIS_PALETTE[:, 0].astype(np.int64) << 16
    | DAVIS_PALETTE[:, 1].astype(np.int64) << 8
    | DAVIS_PALETTE[:, 2].astype(np.int64)
)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a DAVIS annotation as an ``(H, W)`` uint8 map of palette indices.

    0 is background, ``k`` object ``k``, 255 void. Accepted: palette PNGs (DAVIS 2017, and
    DAVIS 2016 as distributed with 2017), grey PNGs holding only 0 and 255 (DAVIS 2016: 255 is
    the object, returned as 1) or indices, and RGB(A) PNGs in the DAVIS colours.

    Raises:
        DataError: unreadable file, an index outside the file's palette or drawn in the
            background's colour, a colour not in the DAVIS palette, or an unsupported image
            mode (the message names the file).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            palette = image.getpalette() if mode == "P" else None
            array = np.array(image)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the mask ({err})") from None
    if mode == "P":
        colours = np.asarray(palette or [], dtype=np.uint8).reshape(-1, 3)
        present = np.unique(array)
        top = int(present[-1]) if present.size else 0
        if top >= len(colours):
            raise DataError(
                f"{path}: palette index {top} is outside the file's {len(colours)}-colour palette"
            )
        # a palette padded to 256 entries (PIL reports 256 for most files) draws the indices
        # past the objects' colours black: such a pixel looks like background, not an object
        for index in present.tolist():
            if index not in (0, VOID_INDEX) and (colours[index] == colours[0]).all():
                count = int((array == index).sum())
                raise DataError(
                    f"{path}: palette index {index} ({count} pixels) is drawn "
                    f"{tuple(int(c) for c in colours[0])} like the background (index 0), so it "
                    f"is no object of the sequence; fix the mask or its palette"
                )
        return array.astype(np.uint8)
    if mode == "1":
        return array.astype(np.uint8)
    if mode == "L":
        values = np.unique(array)
        if set(values.tolist()) <= {0, 255} and values.size == 2:
            return (array == 255).astype(np.uint8)  # DAVIS 2016: 255 is the object
        return array.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        if mode == "RGBA" and (array[..., 3] != 255).any():
            raise DataError(f"{path}: transparent pixels in an RGBA mask")
        rgb = array[..., :3].astype(np.int64)
        codes = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
        order = np.argsort(_PALETTE_CODES)
        position = np.clip(np.searchsorted(_PALETTE_CODES[order], codes), 0, 255)
        indices = order[position]
        unknown = _PALETTE_CODES[indices] != codes
        if unknown.any():
            y, x = (int(v[0]) for v in np.nonzero(unknown))
            raise DataError(
                f"{path}: colour {tuple(int(c) for c in rgb[y, x])} at pixel (row {y}, column "
                f"{x}) is not in the DAVIS palette"
            )
        return indices.astype(np.uint8)
    raise DataError(f"{path}: unsupported mask image mode {mode!r} (expected a palette PNG)")


def _read_frame(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the frame ({err})") from None


def temporal_indices(num_source: int, frames: int) -> np.ndarray:
    """Which source frame each of ``frames`` output frames shows: nearest, evenly spread.

    ``num_source == frames`` is the identity; fewer output frames skip source frames evenly,
    more repeat them.
    """
    return np.rint(np.linspace(0, num_source - 1, frames)).astype(np.int64)


def volume_frames(num_source: int, frames: int) -> np.ndarray:
    """For each of ``num_source`` source frames, the volume frame (of ``frames``) that predicts
    it: the first of those showing the source frame nearest in time (:func:`temporal_indices`).

    With ``frames >= num_source`` every source frame is shown and gets its first volume frame;
    with fewer, the frames skipped take their nearest shown neighbour's (nearest in time, as the
    masks are nearest in space).
    """
    shown = temporal_indices(num_source, frames)
    return np.abs(shown[None, :] - np.arange(num_source)[:, None]).argmin(axis=1)


def annotated_indices(spec: int | Sequence[int], frames: int) -> list[int]:
    """The supervised frames: ``spec`` evenly spaced ones, or the explicit list ``spec``.

    ``n`` evenly spaced frames are the centres of ``n`` equal parts of the video
    (``floor((i + 0.5) * frames / n)``): 3 of 72 are frames 12, 36 and 60.
    """
    if isinstance(spec, (int, np.integer)):
        return [int((i + 0.5) * frames / spec) for i in range(int(spec))]
    return sorted(int(t) for t in spec)


def write_masks(
    pred: torch.Tensor | np.ndarray,
    out_dir: str | os.PathLike,
    palette: np.ndarray | Sequence[int] = DAVIS_PALETTE,
    size: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write a predicted video segmentation as one palette PNG per frame (DAVIS format).

    Args:
        pred: ``(T, H, W)`` masks: bool (object = palette index 1) or integer palette indices.
        out_dir: folder to write into (created).
        palette: ``(N, 3)`` colours (or a flat list), by default the DAVIS palette.
        size: ``(H, W)`` of the written masks (nearest-neighbour resize back to the original
            frames); None keeps the prediction's size.
        names: file stems per frame; default ``00000``, ``00001``, ...

    Returns:
        The written paths, in frame order.
    """
    array = pred.detach().cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)
    if array.ndim != 3:
        raise ValueError(f"pred must be (T, H, W), got shape {array.shape}")
    if array.dtype != np.bool_ and (array.min(initial=0) < 0 or array.max(initial=0) > 255):
        raise ValueError("pred must be bool or palette indices in 0..255")
    array = array.astype(np.uint8)
    names = [f"{t:05d}" for t in range(len(array))] if names is None else list(names)
    if len(names) != len(array) or len(set(names)) != len(names):
        raise ValueError(f"need {len(array)} distinct names, got {len(names)}")
    flat = np.asarray(palette, dtype=np.uint8).reshape(-1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for frame, name in zip(array, names):
        image = Image.fromarray(frame, mode="P")
        image.putpalette(flat.tobytes())
        if size is not None and tuple(size) != frame.shape:
            image = image.resize((int(size[1]), int(size[0])), Image.Resampling.NEAREST)
        path = out_dir / f"{name}.png"
        image.save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ validation


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"data.{key} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _size(value: Any, key: str) -> tuple[int, int]:
    """``[H, W]``: two positive ints."""
    return positive_ints(value, f"data.{key}", 2)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- data module


class _VideoDataset(Dataset):
    """The one video, ``length`` times, with the training augmentations.

    ``flip_prob`` > 0: random horizontal flips. ``roll``: per axis ``(T, H, W)``, a circular shift
    by a uniform random offset (0 = that axis is not shifted), the same for image, label and loss
    mask. With labels on a few frames only, shifts keep a network from tying its answer to the
    absolute frame index or position (memorising the labelled frames) instead of to appearance and
    motion.
    """

    def __init__(
        self,
        sample: dict,
        length: int,
        flip_prob: float = 0.0,
        seed: int | None = None,
        roll: Sequence[bool] = (False, False, False),
    ) -> None:
        self.sample, self.length, self.flip_prob, self.seed = sample, length, flip_prob, seed
        self.roll = tuple(bool(r) for r in roll)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.sample)
        if self.flip_prob == 0 and not any(self.roll):
            return sample
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        keys = ("image", "label", "loss_mask")
        if self.flip_prob > 0 and float(torch.rand((), generator=generator)) < self.flip_prob:
            for key in keys:
                if sample[key].shape[-1] > 1:
                    sample[key] = sample[key].flip(-1)
        for axis, on in zip((-3, -2, -1), self.roll):
            size = sample["image"].shape[axis]
            if not on or size < 2:
                continue
            shift = int(torch.randint(size, (), generator=generator))
            for key in keys:
                if sample[key].shape[axis] > 1:  # a (1, T, 1, 1) loss mask is not rolled in H, W
                    sample[key] = sample[key].roll(shift, dims=axis)
        return sample


class DavisData:
    """Data module for one DAVIS sequence (or the generated demo video), as a volume.

    See the module docstring for the batches. Frames are resampled in time to ``frames`` (nearest
    source frame, :func:`temporal_indices`) and resized to ``size`` (bilinear with antialiasing;
    masks nearest), then each RGB channel is z-scored over the video.

    Args:
        root: dataset folder in the DAVIS layout.
        sequence: the video, a folder name under ``JPEGImages/<resolution>``.
        resolution: ``480p`` or ``Full-Resolution``.
        frames: number of frames ``T`` of the volume.
        size: frame size ``(H, W)`` of the volume. Peters et al.: 72 frames of 240x424; the
            hyperbolic network needs T, H and W divisible by 8 (three Haar coarsenings).
        annotated_frames: the frames whose labels enter the loss: a number ``n`` (``n`` evenly
            spaced frames, :func:`annotated_indices`) or a list of frame indices in ``[0, T)``.
        objects: ``binary`` (one channel: any object vs background) or ``all`` (one channel
            per object of the sequence, by palette index).
        metrics_convention: how validation scores J and F: ``official`` (the DAVIS 2017
            semi-supervised toolkit's figures: per object at the annotations' resolution, frames
            ``1 .. T-2``, void as background; a ``binary`` prediction is palette index 1, so it
            scores as object 1) or ``revseg`` (per channel on the network's grid, every frame,
            void left out).
        steps_per_epoch: how many times an epoch of training shows the video.
        flip_prob: probability of a random horizontal flip in training; 0 disables it.
        roll: random circular shifts in training along ``(T, H, W)``: three booleans, or one for
            all axes (labels on few frames are otherwise easily memorised by frame index).
        generate: if ``root`` is missing or empty, generate the synthetic demo video there.
        video_frames: frames of the generated video (``generate`` only).
        video_size: ``(H, W)`` of the generated video (``generate`` only).

    Raises:
        ConfigError: an argument is invalid; the message names the ``data.<key>``.
    """

    in_channels = 3

    def __init__(
        self,
        root: str | os.PathLike = "data/synthetic_video",
        sequence: str = "bear",
        resolution: str = "480p",
        frames: int = 72,
        size: Sequence[int] = (240, 424),
        annotated_frames: int | Sequence[int] = 3,
        objects: str = "binary",
        metrics_convention: str = "official",
        steps_per_epoch: int = 1,
        flip_prob: float = 0.0,
        roll: bool | Sequence[bool] = False,
        generate: bool = False,
        video_frames: int | None = None,
        video_size: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ConfigError(f"data.root must be a path, got {root!r}")
        self.root = Path(root)
        for key, value in (("sequence", sequence), ("resolution", resolution)):
            if not isinstance(value, str) or not value or "/" in value or value[0] == ".":
                raise ConfigError(f"data.{key} must be a folder name, got {value!r}")
        self.sequence, self.resolution = sequence, resolution
        self.frames = _int(frames, "frames", 1)
        self.size = _size(size, "size")
        if isinstance(annotated_frames, bool) or not isinstance(
            annotated_frames, (int, np.integer, Sequence)
        ):
            raise ConfigError(
                f"data.annotated_frames must be a number of frames or a list of frame indices, "
                f"got {annotated_frames!r}"
            )
        if isinstance(annotated_frames, (int, np.integer)):
            if not 1 <= annotated_frames <= self.frames:
                raise ConfigError(
                    f"data.annotated_frames must be in [1, data.frames={self.frames}], "
                    f"got {annotated_frames}"
                )
        else:
            values = list(annotated_frames)
            if (
                not values
                or not all(
                    isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
                )
                or not all(0 <= v < self.frames for v in values)
                or len(set(values)) != len(values)
            ):
                raise ConfigError(
                    f"data.annotated_frames must be distinct frame indices in "
                    f"[0, data.frames={self.frames}), got {values!r}"
                )
        self.annotated_frames = annotated_indices(annotated_frames, self.frames)
        if objects not in _OBJECTS:
            raise ConfigError(f"data.objects must be binary or all, got {objects!r}")
        self.objects = objects
        if metrics_convention not in CONVENTIONS:
            raise ConfigError(
                f"data.metrics_convention must be one of {', '.join(CONVENTIONS)}, "
                f"got {metrics_convention!r}"
            )
        self.metrics_convention = metrics_convention
        self.steps_per_epoch = _int(steps_per_epoch, "steps_per_epoch", 1)
        if (
            isinstance(flip_prob, bool)
            or not isinstance(flip_prob, (int, float))
            or not 0.0 <= flip_prob <= 1.0
        ):
            raise ConfigError(f"data.flip_prob must be in [0, 1], got {flip_prob!r}")
        self.flip_prob = float(flip_prob)
        if isinstance(roll, bool):
            rolls = [roll] * 3
        else:
            rolls = list(roll) if isinstance(roll, Sequence) and not isinstance(roll, str) else []
        if len(rolls) != 3 or not all(isinstance(r, bool) for r in rolls):
            raise ConfigError(
                f"data.roll must be true, false or three booleans for (T, H, W), got {roll!r}"
            )
        self.roll = tuple(rolls)
        if not isinstance(generate, bool):
            raise ConfigError(f"data.generate must be true or false, got {generate!r}")
        self.generate = generate
        if generate and (video_frames is None or video_size is None):
            raise ConfigError(
                "data.video_frames and data.video_size must be set when data.generate"
            )
        self.video_frames = None if video_frames is None else _int(video_frames, "video_frames", 1)
        self.video_size = None if video_size is None else _size(video_size, "video_size")
        if self.video_size is not None and min(self.video_size) < 16:
            raise ConfigError(f"data.video_size must be >= 16 per axis, got {list(video_size)}")

        self._sample: dict[str, torch.Tensor] | None = None
        self._train_sample: dict[str, Any] | None = None
        self._val_sample: dict[str, Any] | None = None
        self.object_ids: list[int] = []  # palette index of each label channel
        self.source_frames: list[Path] = []  # the frame file each volume frame shows
        self.source_indices: list[int] = []  # the index of that file among the source frames
        self.mask_files: list[Path] = []  # the annotation of every source frame
        self._annotations: Annotations | None = None
        self.source_size: tuple[int, int] | None = None  # (H, W) of the original frames

    # -- properties the trainer and scripts use ------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(T, H, W)`` of the volume fed to the network."""
        return (self.frames, *self.size)

    @property
    def out_channels(self) -> int:
        """1 for ``binary``; the sequence's number of objects for ``all`` (reads the masks)."""
        if self.objects == "binary":
            return 1
        self.setup()
        return len(self.object_ids)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Name of each label channel: ``object``, or ``object<k>`` by palette index."""
        if self.objects == "binary":
            return ("object",)
        self.setup()
        return tuple(f"object{k}" for k in self.object_ids)

    @property
    def train_cases(self) -> list[str]:
        return [self.sequence]

    @property
    def val_cases(self) -> list[str]:
        return [self.sequence]

    # -- loading -------------------------------------------------------------------------------

    def _generate_if_needed(self) -> None:
        if not self.generate:
            return
        # keeps a matching generated video, and refuses a folder holding anything else: never
        # train on other data silently
        try:
            make_synthetic_video(
                self.root, self.sequence, self.video_frames, self.video_size, seed=0
            )
        except (DataError, ValueError) as err:
            raise DataError(f"data.root: {err}") from None

    def setup(self) -> None:
        """Read (or generate) the sequence and build the training and validation samples.

        Idempotent. Only the source frames the volume shows are decoded.

        Raises:
            DataError: the dataset is missing or malformed (the message names the file).
        """
        if self._sample is not None:
            return
        self._generate_if_needed()
        frame_files, mask_files = list_frames(self.root, self.sequence, self.resolution)
        chosen = temporal_indices(len(frame_files), self.frames)
        unique = sorted(set(chosen.tolist()))
        height, width = self.size

        images, masks = {}, {}
        for index in unique:
            frame = _read_frame(frame_files[index])
            mask = read_mask(mask_files[index])
            if self.source_size is None:
                self.source_size = frame.shape[:2]
            if frame.shape[:2] != self.source_size:
                raise DataError(
                    f"{frame_files[index]}: frame size {frame.shape[1]}x{frame.shape[0]} differs "
                    f"from the sequence's {self.source_size[1]}x{self.source_size[0]}"
                )
            if mask.shape != frame.shape[:2]:
                raise DataError(
                    f"{mask_files[index]}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                    f"its frame's {frame.shape[1]}x{frame.shape[0]}"
                )
            rgb = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
            images[index] = F.interpolate(
                rgb, size=(height, width), mode="bilinear", antialias=True, align_corners=False
            )[0]
            masks[index] = F.interpolate(
                torch.from_numpy(mask)[None, None].float(),
                size=(height, width),
                mode="nearest-exact",
            )[0, 0].to(torch.uint8)
        image = torch.stack([images[i] for i in chosen.tolist()], dim=1)  # (3, T, H, W)
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        std = image.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        image = (image - mean) / std
        indices = torch.stack([masks[i] for i in chosen.tolist()])  # (T, H, W) palette indices

        void = indices == VOID_INDEX
        counts = torch.bincount(indices.flatten().long(), minlength=256)
        present = [k for k in counts.nonzero().flatten().tolist() if k not in (0, VOID_INDEX)]
        if self.objects == "binary":
            self.object_ids = present
            label = ((indices != 0) & ~void)[None].float()
        else:
            if not present:
                raise DataError(
                    f"data.objects=all: the masks of {self.sequence} in {self.root} hold no object"
                )
            self.object_ids = present
            label = torch.stack([indices == k for k in present]).float()
        if not present:
            log.warning("the masks of %s hold no object: every frame is background", self.sequence)

        self.source_frames = [frame_files[i] for i in chosen.tolist()]
        self.source_indices = chosen.tolist()
        self.mask_files = list(mask_files)
        frames = torch.zeros(self.frames, dtype=torch.bool)
        frames[self.annotated_frames] = True

        # training: only the annotated frames' labels, and void left out
        train_label = label * frames.view(1, -1, 1, 1)
        train_void = void & frames.view(-1, 1, 1)
        if train_void.any():
            train_mask = (frames.view(-1, 1, 1) & ~void)[None].float()
        else:
            train_mask = frames.view(1, -1, 1, 1).float()
        # validation: every frame, void marked in the label
        val_label = label.masked_fill(void[None], VOID)
        if void.any():
            val_mask = (~void)[None].float()
        else:
            val_mask = torch.ones(1, self.frames, 1, 1)

        self._train_sample = {
            "image": image,
            "label": train_label,
            "loss_mask": train_mask,
            "case": self.sequence,
        }
        self._val_sample = {
            "image": image,
            "label": val_label,
            "loss_mask": val_mask,
            "case": self.sequence,
        }
        self._sample = self._val_sample
        log.info(
            "%s: %d source frames of %dx%d -> %d frames of %dx%d; loss on frames %s; objects %s",
            self.sequence,
            len(frame_files),
            self.source_size[1],
            self.source_size[0],
            self.frames,
            width,
            height,
            self.annotated_frames,
            present,
        )

    def train_dataloader(self, seed: int | None = None, pin_memory: bool = False) -> DataLoader:
        """``steps_per_epoch`` batches of the video with the sparse ``loss_mask``.

        Args:
            seed: seeds the random flips and shifts; None uses torch's global RNG.
            pin_memory: batches in page-locked memory (for faster copies to a GPU that trains).
        """
        self.setup()
        dataset = _VideoDataset(
            self._train_sample, self.steps_per_epoch, self.flip_prob, seed, self.roll
        )
        return DataLoader(
            dataset, batch_size=1, shuffle=False, num_workers=0, pin_memory=pin_memory
        )

    def val_dataloader(self, pin_memory: bool = False) -> DataLoader:
        """One batch: the video with the labels of every frame (void = ``VOID``)."""
        self.setup()
        return DataLoader(
            _VideoDataset(self._val_sample, 1), batch_size=1, shuffle=False, pin_memory=pin_memory
        )

    # -- metrics, images, outputs ------------------------------------------------------------

    def annotations(self) -> Annotations:
        """Every annotation file of the sequence at its own size, for the ``official``
        convention (read once).

        Raises:
            DataError: a mask is unreadable or its size differs from the frames' (the message
                names the file).
        """
        self.setup()
        if self._annotations is not None:
            return self._annotations
        masks = []
        for path in self.mask_files:
            mask = read_mask(path)
            if mask.shape != tuple(self.source_size):
                raise DataError(
                    f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from the "
                    f"sequence's frames, {self.source_size[1]}x{self.source_size[0]}"
                )
            masks.append(mask)
        stack = np.stack(masks)
        object_ids = tuple(int(k) for k in np.unique(stack) if k not in (0, VOID_INDEX))
        channel_ids = (1,) if self.objects == "binary" else tuple(self.object_ids)
        if self.objects == "binary" and object_ids not in ((), (1,)):
            log.warning(
                "data.objects=binary: the prediction is scored as object 1 of %s, whose masks "
                "hold objects %s (set data.objects=all to predict each)",
                self.sequence,
                list(object_ids),
            )
        self._annotations = Annotations(
            sequence=self.sequence,
            masks=stack,
            volume_frames=volume_frames(len(stack), self.frames),
            channel_ids=channel_ids,
            object_ids=object_ids,
        )
        return self._annotations

    def build_metrics(self, hd95: bool = False) -> VideoMetrics:
        """IoU / Dice on the network's grid and DAVIS J, F and J&F in the convention
        ``metrics_convention`` (``hd95`` is ignored for video)."""
        if self.metrics_convention == "revseg":
            return VideoMetrics(
                self.channel_names, annotated_frames=self.annotated_frames, convention="revseg"
            )
        annotations = self.annotations()
        return VideoMetrics(
            self.channel_names,
            annotated_frames=sorted({self.source_indices[t] for t in self.annotated_frames}),
            convention="official",
            annotations=annotations,
        )

    def preview(self, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The labelled figure of the middle frame (:func:`frame_figure`): input, truth and
        prediction with one colour per object channel, and the errors."""
        return frame_figure(image, label, pred, self.channel_names)

    def write_split(self, output_dir: str | os.PathLike) -> Path:
        """Record the sequence, the source frames and the supervised frames in ``split.json``."""
        self.setup()
        path = Path(output_dir) / "split.json"
        record = {
            "train": self.train_cases,
            "val": self.val_cases,
            "root": os.fspath(self.root),
            "annotated_frames": self.annotated_frames,
            "annotated_source_frames": [self.source_frames[t].name for t in self.annotated_frames],
            "source_frames": [p.name for p in self.source_frames],
            "object_ids": self.object_ids,
        }
        return write_text_atomic(json.dumps(record, indent=2) + "\n", path)

    def write_prediction(self, pred: torch.Tensor, out_dir: str | os.PathLike) -> list[Path]:
        """Write a prediction as DAVIS palette PNGs, one per source frame, named and sized like
        the source frames (the DAVIS results layout, which the toolkit needs for every frame).

        Args:
            pred: ``(C, T, H, W)`` or ``(T, H, W)`` binary masks on the volume's grid; channel
                ``c`` becomes palette index ``object_ids[c]`` (1 for ``binary``).
            out_dir: folder to write into.

        Each source frame is written from the volume frame :func:`volume_frames` gives it (the
        first showing it, or the nearest in time when ``frames`` is below the source length),
        resized to the source size by nearest neighbour.
        """
        self.setup()
        pred = pred.detach().cpu()
        if pred.ndim == 3:
            pred = pred[None]
        ids = [1] if self.objects == "binary" else self.object_ids
        indices = to_indices(pred, ids)[volume_frames(len(self.mask_files), self.frames)]
        return write_masks(
            resize_indices(indices, self.source_size),
            out_dir,
            names=[path.stem for path in self.mask_files],
        )

    # -- checks (scripts/check_data.py) -----------------------------------------------------------

    def check_data(self, full: bool = True) -> list[Problem]:
        """Check the sequence's files: every frame and mask opens, sizes agree; with ``full``
        also every mask's indices and colours (:func:`read_mask`) and every frame's pixels.

        Returns:
            The problems, one per file (``<sequence>: <file>: <message>``).

        Raises:
            DataError: the dataset or the sequence is missing or its frames and masks do not
                pair up (one line naming the folder or file).
        """
        self._generate_if_needed()
        frame_files, mask_files = list_frames(self.root, self.sequence, self.resolution)
        problems: list[Problem] = []

        def problem(path: Path, message: str) -> None:
            problems.append(Problem(self.sequence, str(path), message.removeprefix(f"{path}: ")))

        size = None
        for frame, mask in zip(frame_files, mask_files):
            try:
                with Image.open(frame) as image:
                    frame_size = image.size
                    if full:
                        image.convert("RGB").load()
                if size is None:
                    size = frame_size
                elif frame_size != size:
                    problem(frame, f"frame size {frame_size[0]}x{frame_size[1]} differs from the "
                            f"sequence's {size[0]}x{size[1]}")  # fmt: skip
                with Image.open(mask) as image:
                    mask_size = image.size
                if mask_size != frame_size:
                    problem(mask, f"mask size {mask_size[0]}x{mask_size[1]} differs from its "
                            f"frame's {frame_size[0]}x{frame_size[1]}")  # fmt: skip
                elif full:
                    read_mask(mask)
            except DataError as error:
                problem(mask, str(error))
            except (OSError, ValueError) as error:
                problem(frame, f"cannot read ({error})")
        return problems

    def describe(self) -> str:
        """One line for reports: the sequence and its number of frames."""
        frames, _ = list_frames(self.root, self.sequence, self.resolution)
        return f"DAVIS sequence {self.sequence} ({self.resolution}), {len(frames)} frames"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={os.fspath(self.root)!r}, sequence={self.sequence!r}, "
            f"frames={self.frames}, size={list(self.size)}, "
            f"annotated_frames={self.annotated_frames}, objects={self.objects!r}, "
            f"metrics_convention={self.metrics_convention!r})"
        )
