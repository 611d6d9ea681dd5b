"""Per-label (or per-region) Dice, IoU and HD95 of any dataset, named by its ``dataset.json``.

The label-based networks of nnU-Net-format datasets (Isensee et al. 2021) predict a softmax over
every label, background first: the prediction is the arg max, each foreground label a mask. The
region-based ones predict one sigmoid channel per region: each thresholded at 0.5. Every mask is
scored with :func:`revseg.metrics.brats.case_metrics` (the official BraTS edge cases: a label
empty in both prediction and truth is left out of the means; one empty: Dice 0, HD95 373 mm), in
mm with each case's voxel spacing; IoU is ``Dice / (2 - Dice)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from revseg.metrics.brats import case_metrics

__all__ = ["LabelMetrics", "label_case_metrics", "metric_name", "summarize_labels"]

_METRICS = ("dice", "iou", "hd95")


def metric_name(name: str) -> str:
    """A label name as a metric / TensorBoard tag part: runs of other characters than letters,
    digits, ``.`` and ``-`` become ``_`` (``"whole tumor"`` -> ``whole_tumor``)."""
    return re.sub(r"[^0-9A-Za-z.-]+", "_", name).strip("_") or "label"


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def label_case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    names: Sequence[str],
    spacing: Sequence[float] | None = None,
    hd: bool = True,
) -> dict[str, float]:
    """Metrics of one case.

    Args:
        pred, truth: ``(L, X, Y, Z)`` bool masks, one per name.
        names: the label (or region) names, in channel order.
        spacing: voxel size per spatial axis in mm (None: 1).
        hd: compute HD95 (else NaN).

    Returns:
        ``{dice,iou,hd95}_<name>`` (names through :func:`metric_name`) and ``{dice,iou,hd95}_mean``
        over the labels, NaN cells left out.
    """
    keys = [metric_name(n) for n in names]
    raw = case_metrics(pred, truth, spacing, "official", keys, hd=hd)
    out: dict[str, float] = {}
    for key in keys:
        dice = raw[f"dice_{key}"]
        out[f"dice_{key}"] = dice
        out[f"iou_{key}"] = dice / (2.0 - dice) if not math.isnan(dice) else math.nan
        out[f"hd95_{key}"] = raw[f"hd95_{key}"]
    for metric in _METRICS:
        out[f"{metric}_mean"] = _nanmean([out[f"{metric}_{k}"] for k in keys])
    return out


def summarize_labels(per_case: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The summary over the cases, behind validation and ``revseg-evaluate`` alike: each label's
    metric is its mean over the cases (NaN cells left out), and ``{dice,iou,hd95}_mean`` the mean
    of the labels' means, as nnU-Net's ``foreground_mean`` and BraTS's mean Dice
    (:func:`revseg.metrics.brats.summarize`) are read; not the mean of each case's own mean, which
    weighs a case with labels empty in both more. Example: case A with label 1 at Dice 2/3 and
    label 2 empty in both, case B at 0.4 in both labels: label 1 ``(2/3 + 0.4) / 2 = 8/15``,
    label 2 0.4, ``dice_mean`` ``(8/15 + 0.4) / 2 = 7/15``."""
    keys: list[str] = []
    for metrics in per_case.values():
        keys += [k for k in metrics if k not in keys]
    out = {k: _nanmean([float(m[k]) for m in per_case.values() if k in m]) for k in keys}
    for metric in _METRICS:
        labels = [k for k in keys if k.startswith(f"{metric}_") and k != f"{metric}_mean"]
        if labels:
            out[f"{metric}_mean"] = _nanmean([out[k] for k in labels])
    return out


class LabelMetrics:
    """Validation metrics per label of a label-based (softmax) or region-based (sigmoid) network.

    Args:
        names: the scored names: the foreground labels (label-based: the output channels but
            the first, background) or the regions.
        region_based: sigmoid channels thresholded at 0.5 instead of an arg max.
        hd95: compute HD95.
        spacings: the voxel spacing of the validation cases, in the order the validation loader
            yields them (None: 1 mm).

    ``update(logits (B, C, ...), target (B, C, ...))`` returns the prediction in the target's
    layout (one-hot with background, or region masks).
    """

    def __init__(
        self,
        names: Sequence[str],
        region_based: bool = False,
        hd95: bool = True,
        spacings: Sequence[Sequence[float]] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.region_based = region_based
        self.hd95 = hd95
        self.spacings = [tuple(s) for s in spacings] if spacings else None
        self.reset()

    def reset(self) -> None:
        self._cases: list[dict[str, float]] = []

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, C, ...)`` logits -> ``(B, C, ...)`` float {0, 1} masks."""
        if self.region_based:
            return (torch.sigmoid(logits) > 0.5).float()
        index = logits.argmax(1)
        return torch.nn.functional.one_hot(index, logits.shape[1]).movedim(-1, 1).float()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = self.predict(logits)
        first = 0 if self.region_based else 1
        pred_np = pred[:, first:].detach().cpu().numpy() > 0.5
        target_np = target[:, first:].detach().cpu().numpy() > 0.5
        for p, t in zip(pred_np, target_np):
            spacing = None
            if self.spacings:
                spacing = self.spacings[len(self._cases) % len(self.spacings)]
            self._cases.append(label_case_metrics(p, t, self.names, spacing, hd=self.hd95))
        return pred

    def compute(self) -> dict[str, float]:
        """``{"dice_<name>", "iou_<name>", ["hd95_<name>"], "dice_mean", ...}``: means over the
        cases (NaN cells left out)."""
        out = summarize_labels({str(i): c for i, c in enumerate(self._cases)})
        if not self.hd95:
            out = {k: v for k, v in out.items() if not k.startswith("hd95_")}
        return out
