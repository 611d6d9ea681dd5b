"""Validation metrics per region: Dice and HD95 (MONAI), with the BraTS conventions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

__all__ = ["RegionMetrics", "REGIONS"]

REGIONS = ("WT", "TC", "ET")


class RegionMetrics:
    """Accumulates Dice and HD95 per region over a validation pass.

    Predictions are ``sigmoid(logits) > threshold``. An empty region in both prediction and label
    counts as Dice 1 (the BraTS convention, MONAI ``ignore_empty=False``). HD95 is undefined when
    either is empty: such cases are left out of the HD95 mean (and counted in ``hd95_undefined``).

    Args:
        regions: names of the output channels, in order.
        threshold: probability threshold.
        hd95: compute the 95th-percentile Hausdorff distance (costs a distance transform).
    """

    def __init__(
        self, regions: Sequence[str] = REGIONS, threshold: float = 0.5, hd95: bool = True
    ) -> None:
        self.regions = tuple(regions)
        self.threshold = threshold
        self.hd95 = hd95
        self.dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        self.hausdorff = HausdorffDistanceMetric(
            include_background=True, percentile=95, reduction="none"
        )

    def reset(self) -> None:
        self.dice.reset()
        self.hausdorff.reset()

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, C, ...)`` logits -> ``(B, C, ...)`` float {0, 1} region masks."""
        return (torch.sigmoid(logits) > self.threshold).float()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns the binary prediction ``(B, C, D, H, W)``."""
        pred = self.predict(logits)
        self.dice(pred, target)
        if self.hd95:
            self.hausdorff(pred, target)
        return pred

    def compute(self) -> dict[str, float]:
        """``{"dice_WT": ..., "dice_mean": ..., "hd95_WT": ..., "hd95_mean": ...}``."""
        out: dict[str, float] = {}
        dice = self.dice.aggregate().float()  # (N, C)
        for i, name in enumerate(self.regions):
            out[f"dice_{name}"] = float(dice[:, i].mean())
        out["dice_mean"] = float(dice.mean())
        if self.hd95:
            hd = self.hausdorff.aggregate().float()  # (N, C), inf/nan where undefined
            finite = torch.isfinite(hd)
            for i, name in enumerate(self.regions):
                col = hd[:, i][finite[:, i]]
                out[f"hd95_{name}"] = float(col.mean()) if col.numel() else math.nan
            out["hd95_mean"] = float(hd[finite].mean()) if finite.any() else math.nan
            out["hd95_undefined"] = int((~finite).sum())
        return out
