"""Evaluation of label maps against the ground truth: Dice and HD95 per region and case.

Regions WT, TC, ET are taken from both label maps in the dataset's convention. Following the
BraTS challenge: a region empty in both prediction and truth scores Dice 1 and HD95 0; empty in
exactly one, Dice 0 and HD95 :data:`HD95_EMPTY` mm. HD95 is in millimetres (voxel spacing from
the truth's header), computed by MONAI.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from revseg.data.layouts import LabelConvention
from revseg.data.transforms import REGIONS, label_to_regions
from revseg.errors import DataError

__all__ = ["HD95_EMPTY", "case_metrics", "evaluate_files", "summarize", "write_reports"]

HD95_EMPTY = 373.13
"""HD95 (mm) that BraTS gives a region empty in only one of prediction and truth."""


def _regions(path: str | os.PathLike, convention: LabelConvention) -> tuple[np.ndarray, Any]:
    try:
        image = nib.load(os.fspath(path))
        label = np.asanyarray(image.dataobj)
    except Exception as error:  # noqa: BLE001 - any unreadable file
        raise DataError(f"{path}: cannot read: {' '.join(str(error).split())}") from None
    if label.ndim != 3:
        raise DataError(f"{path}: label map must be 3D, got shape {label.shape}")
    try:
        regions = label_to_regions(
            np.rint(label), convention.enhancing, convention.necrotic, convention.oedema
        )
    except DataError as error:
        raise DataError(f"{path}: {str(error).split(': ', 1)[-1]}") from None
    return regions.astype(bool), image


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """Dice and HD95 per region of one case.

    Args:
        pred, truth: ``(3, X, Y, Z)`` bool regions WT, TC, ET.
        spacing: voxel size in mm.

    Returns:
        ``{"dice_WT", "dice_TC", "dice_ET", "dice_mean", "hd95_WT", ..., "hd95_mean"}``.
    """
    out: dict[str, float] = {}
    for index, name in enumerate(REGIONS):
        p, t = pred[index], truth[index]
        if not p.any() and not t.any():
            dice, hd95 = 1.0, 0.0
        elif not p.any() or not t.any():
            dice, hd95 = 0.0, HD95_EMPTY
        else:
            dice = 2.0 * float(np.logical_and(p, t).sum()) / float(p.sum() + t.sum())
            hd95 = float(
                compute_hausdorff_distance(
                    torch.from_numpy(p)[None, None],
                    torch.from_numpy(t)[None, None],
                    include_background=True,
                    percentile=95,
                    spacing=[float(s) for s in spacing],
                )[0, 0]
            )
        out[f"dice_{name}"], out[f"hd95_{name}"] = dice, hd95
    out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in REGIONS]))
    out["hd95_mean"] = float(np.mean([out[f"hd95_{r}"] for r in REGIONS]))
    return out


def evaluate_files(
    pred: str | os.PathLike, truth: str | os.PathLike, convention: LabelConvention
) -> dict[str, float]:
    """:func:`case_metrics` of two label map files of the same grid.

    Raises:
        DataError: a file cannot be read, holds labels outside ``convention``, or the two differ
            in shape or affine (naming the prediction file).
    """
    pred_regions, pred_image = _regions(pred, convention)
    truth_regions, truth_image = _regions(truth, convention)
    if pred_regions.shape != truth_regions.shape:
        raise DataError(
            f"{pred}: shape {pred_regions.shape[1:]} differs from {truth_regions.shape[1:]} of "
            f"{truth}"
        )
    if not np.allclose(pred_image.affine, truth_image.affine, atol=1e-3):
        raise DataError(f"{pred}: affine differs from that of {truth}")
    return case_metrics(pred_regions, truth_regions, truth_image.header.get_zooms()[:3])


def summarize(per_case: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over the cases."""
    keys = next(iter(per_case.values())).keys() if per_case else []
    return {k: float(np.mean([m[k] for m in per_case.values()])) for k in keys}


def write_reports(
    per_case: dict[str, dict[str, float]], output: str | os.PathLike, extra: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (a row per case, then ``mean``) and ``metrics.json`` into ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    mean = summarize(per_case)
    columns = [f"dice_{r}" for r in REGIONS] + ["dice_mean"]
    columns += [f"hd95_{r}" for r in REGIONS] + ["hd95_mean"]
    csv_path = output / "metrics.csv"
    with csv_path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["case", *columns])
        for case, metrics in per_case.items():
            writer.writerow([case, *(f"{metrics[c]:.6g}" for c in columns)])
        writer.writerow(["mean", *(f"{mean[c]:.6g}" for c in columns)])
    json_path = output / "metrics.json"
    content = {**extra, "hd95_empty_mm": HD95_EMPTY, "mean": mean, "cases": per_case}
    json_path.write_text(
        json.dumps(content, indent=2, default=lambda v: None if math.isnan(v) else v) + "\n"
    )
    return csv_path, json_path
