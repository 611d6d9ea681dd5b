"""Evaluate a folder of DAVIS results (palette PNG masks) against a DAVIS dataset, with the figures
and the two CSV files of the DAVIS 2017 semi-supervised evaluation (``davis2017-evaluation``).

Usage (``revseg-evaluate`` sends a ``truth`` that is a DAVIS root here)::

    revseg-evaluate pred=<results> truth=<DAVIS root> [output=<folder>] [evaluate.split=val] \
        [evaluate.sequences=[bear,dog]] [evaluate.resolution=480p] \
        [evaluate.convention=official|revseg]

The folders::

    <truth>/Annotations/<resolution>/<sequence>/00000.png ...   # 0 background, k object k, 255 void
    <truth>/JPEGImages/<resolution>/<sequence>/00000.jpg ...
    <truth>/ImageSets/2017/<split>.txt                          # the sequences, one a line
    <pred>/<sequence>/00000.png ...                             # palette PNGs (mode P), same size

Every object of every sequence is scored (:func:`revseg.metrics.video.score_sequence`, in the
convention ``evaluate.convention``; ``official``: frames ``1 .. T-2``, whose result files must
exist, void counted as background). Writes, into ``output`` (default: ``pred``, where the toolkit
writes them), ``global_results-<split>.csv`` (``J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean,
F-Recall, F-Decay``: means over all objects) and ``per-sequence_results-<split>.csv``
(``Sequence, J-Mean, F-Mean``, one row ``<sequence>_<object id>`` per object), numbers with three
decimals, as the toolkit does. See ``docs/video_evaluation.md`` for where revseg and the toolkit
differ (objects with non-contiguous ids, objects that appear after the first frame).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from revseg.errors import ConfigError, DataError
from revseg.metrics.video import CONVENTIONS, SequenceScores, score_sequence, summarize_objects

__all__ = [
    "GLOBAL_COLUMNS",
    "SEQUENCE_COLUMNS",
    "evaluate_results",
    "format_csvs",
    "is_davis_root",
    "main",
    "names_davis_truth",
    "read_result",
    "read_split",
    "write_csvs",
]

GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
"""The columns of ``global_results-<split>.csv``."""

SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
"""The columns of ``per-sequence_results-<split>.csv``."""

_GLOBAL_KEYS = ("jf_mean", "j_mean", "j_recall", "j_decay", "f_mean", "f_recall", "f_decay")


def is_davis_root(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder in the DAVIS layout (``Annotations/`` and ``JPEGImages/``)."""
    path = Path(path)
    return (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir()


def names_davis_truth(argv: Sequence[str]) -> bool:
    """Whether the command line's last ``truth=`` (or ``+truth=``, ``++truth=``) is a DAVIS root."""
    values = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("truth=")]
    return bool(values) and is_davis_root(values[-1])


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    """The sequences of ``<root>/ImageSets/2017/<split>.txt``, in the file's order.

    Raises:
        DataError: the file is missing or lists no sequence.
    """
    path = Path(root) / "ImageSets" / "2017" / f"{split}.txt"
    if not path.is_file():
        raise DataError(
            f"evaluate.split={split}: {path} not found (or list the sequences with "
            f"evaluate.sequences=[...])"
        )
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"evaluate.split={split}: {path} lists no sequence")
    return names


def read_result(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """One result mask as ``(H, W)`` uint8 palette indices.

    Raises:
        DataError: missing or unreadable file, not a palette PNG, or a size other than
            ``shape`` (the message names the file).
    """
    if not path.is_file():
        raise DataError(f"{path}: result mask not found (one palette PNG per annotated frame)")
    try:
        with Image.open(path) as image:
            image.load()
            mode, size = image.mode, image.size
            array = np.array(image)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the result mask ({err})") from None
    if mode != "P":
        raise DataError(
            f"{path}: a {mode} image, not a palette PNG (mode P) of object indices "
            f"(0 background, k object k)"
        )
    if array.shape != tuple(shape):
        raise DataError(
            f"{path}: size {size[0]}x{size[1]} differs from the annotation's {shape[1]}x{shape[0]}"
        )
    return array.astype(np.uint8)


def _read_truth(root: Path, sequence: str, resolution: str) -> tuple[np.ndarray, list[Path]]:
    from revseg.data.davis import list_frames, read_mask

    _, mask_files = list_frames(root, sequence, resolution)
    masks = [read_mask(mask_files[0])]
    for path in mask_files[1:]:
        mask = read_mask(path)
        if mask.shape != masks[0].shape:
            raise DataError(
                f"{path}: size {mask.shape[1]}x{mask.shape[0]} differs from the sequence's "
                f"first annotation, {masks[0].shape[1]}x{masks[0].shape[0]}"
            )
        masks.append(mask)
    return np.stack(masks), mask_files


def evaluate_results(
    pred: str | os.PathLike,
    truth: str | os.PathLike,
    sequences: Sequence[str],
    resolution: str = "480p",
    convention: str = "official",
) -> list[SequenceScores]:
    """Score the results folder ``pred`` against the DAVIS dataset ``truth``.

    Args:
        pred: the results folder, ``<pred>/<sequence>/<frame>.png``.
        truth: the DAVIS root.
        sequences: the sequences to score, in order.
        resolution: the annotations' folder (``480p`` or ``Full-Resolution``).
        convention: ``official`` or ``revseg`` (:data:`~revseg.metrics.video.CONVENTIONS`).

    Returns:
        One :class:`~revseg.metrics.video.SequenceScores` per sequence.

    Raises:
        DataError: a folder or file is missing or malformed, or a result holds an index that is
            no object of its sequence (the message names the file).
    """
    pred, truth = Path(pred), Path(truth)
    if not pred.is_dir():
        raise DataError(f"pred: results folder not found: {pred}")
    scores = []
    for sequence in sequences:
        masks, mask_files = _read_truth(truth, sequence, resolution)
        folder = pred / sequence
        if not folder.is_dir():
            raise DataError(f"{folder}: no results folder for sequence {sequence}")
        objects = [int(k) for k in np.unique(masks) if k not in (0, 255)]
        count = len(masks)
        scored = range(1, count - 1) if convention == "official" else range(count)
        result = np.zeros_like(masks)
        for t in scored:
            path = folder / f"{mask_files[t].stem}.png"
            result[t] = read_result(path, masks.shape[1:])
            extra = sorted(set(np.unique(result[t]).tolist()) - {0, *objects})
            if extra:
                raise DataError(
                    f"{path}: index {extra[0]} is no object of {sequence} (its annotations hold "
                    f"{', '.join(map(str, objects)) or 'none'})"
                )
        scores.append(score_sequence(result, masks, convention, sequence, objects))
    return scores


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3f}"


def format_csvs(scores: Sequence[SequenceScores]) -> tuple[str, str]:
    """The texts of the global and the per-sequence CSV files (module docstring)."""
    summary = summarize_objects(scores)
    global_text, sequence_text = io.StringIO(), io.StringIO()
    writer = csv.writer(global_text, lineterminator="\n")
    writer.writerow(GLOBAL_COLUMNS)
    writer.writerow([_number(summary[key]) for key in _GLOBAL_KEYS])
    writer = csv.writer(sequence_text, lineterminator="\n")
    writer.writerow(SEQUENCE_COLUMNS)
    for s in scores:
        for row in s.per_object():
            writer.writerow([row["object"], _number(row["j_mean"]), _number(row["f_mean"])])
    return global_text.getvalue(), sequence_text.getvalue()


def write_csvs(
    scores: Sequence[SequenceScores], output: str | os.PathLike, split: str
) -> list[Path]:
    """Write ``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` into
    ``output`` (created); returns their paths."""
    from revseg.files import write_text_atomic

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    global_text, sequence_text = format_csvs(scores)
    return [
        write_text_atomic(global_text, output / f"global_results-{split}.csv"),
        write_text_atomic(sequence_text, output / f"per-sequence_results-{split}.csv"),
    ]


def _name(value: object, key: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
        raise ConfigError(f"{key} must be a folder or file name, got {value!r}")
    return value


def main(argv: list[str]) -> int:
    """``revseg-evaluate`` for video (``configs/evaluate_video.yaml``); returns the exit status."""
    from revseg.config import compose_config

    cfg = compose_config("evaluate_video", argv)
    options = cfg.evaluate
    if options.convention not in CONVENTIONS:
        raise ConfigError(
            f"evaluate.convention must be one of {', '.join(CONVENTIONS)} for video, "
            f"got {options.convention!r}"
        )
    split = _name(options.split, "evaluate.split")
    resolution = _name(options.resolution, "evaluate.resolution")
    if options.sequences is None:
        sequences = read_split(cfg.truth, split)
    else:
        if isinstance(options.sequences, str) or not len(options.sequences):
            raise ConfigError(
                f"evaluate.sequences must be a list of sequence names, got {options.sequences!r}"
            )
        sequences = [_name(s, "evaluate.sequences") for s in options.sequences]
    scores = evaluate_results(cfg.pred, cfg.truth, sequences, resolution, options.convention)
    output = cfg.pred if cfg.output is None else cfg.output
    written = write_csvs(scores, output, split)
    summary = summarize_objects(scores)
    objects = sum(len(s.object_ids) for s in scores)
    print(
        f"{len(scores)} sequence(s), {objects} object(s), DAVIS {options.convention} "
        f"convention ({split}, {resolution})"
    )
    print(
        "  ".join(
            f"{c} {_number(summary[k]) or 'nan'}" for c, k in zip(GLOBAL_COLUMNS, _GLOBAL_KEYS)
        )
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
