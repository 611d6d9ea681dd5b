"""Predict a whole video with a trained run and write DAVIS palette PNG masks, one per frame.

The run is rebuilt from its checkpoint alone (:func:`revseg.inference.prediction.load_run`). The
video is read through the run's own data module (:class:`~revseg.data.davis.DavisData`): the run's
sequence, or another sequence / dataset root, resampled and normalised exactly as in training.
The masks are named and sized like the source frames (``00000.png`` ...), one per source frame,
in the DAVIS palette (``binary``: index 1 for the object; ``all``: each channel its object's
palette index), so they can be scored with the DAVIS toolkit or ``revseg-evaluate``
(:mod:`revseg.inference.video_evaluation`); the metrics returned are validation's, in the run's
``data.metrics_convention`` (by default DAVIS's official J and F, computed on those masks).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from revseg.config import build
from revseg.errors import ConfigError, DataError

__all__ = ["predict_video"]


def predict_video(
    run: str | os.PathLike,
    output: str | os.PathLike,
    root: str | os.PathLike | None = None,
    sequence: str | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Segment one video with a trained video run; write one palette PNG per source frame.

    Args:
        run: the run directory (its ``checkpoints/<checkpoint>.pt`` holds weights and config).
        output: folder for the PNG masks (created; existing masks of the same names replaced).
        root: a DAVIS-layout dataset root; None = the run's ``data.root``.
        sequence: the sequence to segment; None = the run's ``data.sequence``.
        checkpoint: ``best``, ``last`` or a path to a checkpoint file.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        threshold: probability above which a pixel belongs to an object.

    Returns:
        ``{"sequence", "output", "masks", "seconds", "metrics"}``; ``metrics`` holds the
        validation metrics of the prediction against the sequence's masks (IoU, DAVIS J, F and
        J&F), ``iou_per_frame`` and ``f_per_frame`` (J and F per scored frame, mean over
        objects) and ``scored_frames`` (their frame indices: ``1 .. T-2`` of the source frames
        in the official convention).

    Raises:
        ConfigError: ``threshold`` is not in (0, 1).
        DataError: the run is not a video run, or a file is missing or malformed.
    """
    from revseg.data.davis import DavisData
    from revseg.device import resolve_device
    from revseg.inference.prediction import load_run

    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0 < threshold < 1
    ):
        raise ConfigError(f"predict.threshold must be a probability in (0, 1), got {threshold!r}")

    torch_device = resolve_device(device)
    model, cfg = load_run(run, checkpoint, torch_device)
    if not str(cfg.data.get("_target_", "")).endswith("DavisData"):
        raise DataError(
            f"run: {run} was trained on {cfg.data.get('_target_')}, not on video; "
            "use scripts/predict.py for volumes"
        )
    if root is not None:
        cfg.data.root, cfg.data.generate = os.fspath(root), False
    if sequence is not None:
        cfg.data.sequence = sequence
    data: DavisData = build(cfg.data, "data")
    data.setup()
    batch = next(iter(data.val_dataloader()))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(batch["image"].to(torch_device)).float().cpu()
    seconds = time.perf_counter() - start
    metrics = data.build_metrics()
    metrics.threshold = float(threshold)
    pred = metrics.update(logits, batch["label"])
    paths = data.write_prediction(pred[0], output)
    scores = metrics.compute()
    scores["iou_per_frame"] = metrics.per_frame_iou().mean(dim=1).tolist()
    scores["f_per_frame"] = metrics.per_frame_f().mean(dim=1).tolist()
    scores["scored_frames"] = metrics.scored_frames()
    return {
        "sequence": data.sequence,
        "output": os.fspath(Path(output)),
        "masks": len(paths),
        "seconds": seconds,
        "metrics": scores,
    }
