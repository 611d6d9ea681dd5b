"""BraTS metrics per region: Dice and HD95 ("legacy"), and lesion-wise Dice, HD95, surface Dice
and TP/FP/FN; the one implementation behind validation, ``evaluate.py`` and TensorBoard.

Definitions follow the official BraTS evaluation (``brats-evaluation`` on ``panoptica``):

- **surface**: a mask's border voxels, the mask minus its erosion by the 6-neighbourhood (voxels
  on the volume's edge are border voxels). Distances are between the border voxels of the two
  masks, in mm (voxel spacing along the array axes).
- **HD95**, ``convention="official"``: the 95th percentile (linear interpolation) of the
  distances of both directions pooled. ``"strict"``: the larger of the two one-way 95th
  percentiles (MONAI's ``HausdorffDistanceMetric``): not lower
  but for the percentile's interpolation, and not blind to a small distant false positive.
- **edge cases of the legacy metrics**:

  ==========================  ======================  ==================================
  region in pred / truth      official                strict
  ==========================  ======================  ==================================
  both empty                  Dice NaN, HD95 NaN      Dice 1, HD95 0
                              (left out of the means)
  only one empty              Dice 0, HD95 373        Dice 0, HD95 373.13
  both present, no overlap    Dice 0, HD95 373        Dice 0, HD95 the distance
  missing prediction file     Dice 0, HD95 373        Dice 0, HD95 373.13
  ==========================  ======================  ==================================

- **lesion-wise** (per region): lesions are the 26-connected components of each mask;
  prediction and truth lesions are matched one to one by maximum bipartite matching on their
  Dice (pairs with Dice > 1e-6). ``tp`` = matched pairs, ``fp`` = unmatched predicted lesions,
  ``fn`` = unmatched true lesions; ``lesion_dice``, ``lesion_hd95``, ``lesion_nsd`` are means over
  the matched pairs. Surface Dice (NSD) of a pair: the mean over both directions of the fraction
  of border voxels within ``min(spacing)`` mm of the other border. With no match: NaN when
  neither mask has a lesion, else Dice 0, NSD 0, HD95 373.

Deliberate differences from the official package (each shown by a test in
``tests/metrics/test_brats_metrics.py``): its legacy (global) HD95 ignores the voxel spacing, revseg
uses it; its lesion-wise HD95 and NSD read the spacing in reversed axis order (SimpleITK's
x, y, z against the z, y, x array), revseg uses each axis's own spacing; it reports lesion-wise
HD95 ``inf`` with no matched lesion, revseg 373. On isotropic 1 mm data (all published BraTS
sets) the numbers are the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from revseg.errors import ConfigError, DataError
from revseg.metrics.regions import REGIONS, LabelConvention

__all__ = [
    "CONVENTIONS",
    "DICE_MEAN",
    "HD95_MEAN",
    "HD95_MAX",
    "HD95_MAX_STRICT",
    "LESION_KEYS",
    "REGIONS",
    "RegionMetrics",
    "case_metrics",
    "hd95",
    "label_regions",
    "lesion_metrics",
    "missing_case_metrics",
    "region_names",
    "summarize",
    "surface_distances",
]

CONVENTIONS = ("official", "strict")
DICE_MEAN = "dice_mean"
"""Mean Dice over WT, TC, ET: a case's own mean, and over cases the mean of the region means
(:func:`summarize`); validation logs it as ``val/dice_mean``, the default ``trainer.monitor``."""
HD95_MEAN = "hd95_mean"
"""Mean HD95 over WT, TC, ET, aggregated as :data:`DICE_MEAN`."""
"""Values of ``evaluate.convention``: the HD95 definition and edge cases (module docstring)."""
HD95_MAX = 373.0
"""HD95 (mm) of an undefined distance under the official convention: the diagonal of the SRI-24
atlas box, the largest distance in a BraTS volume."""
HD95_MAX_STRICT = 373.13
"""The same under the strict convention, to two decimals: ``sqrt(240² + 240² + 155²)`` mm."""
LESION_KEYS = ("tp", "fp", "fn", "lesion_dice", "lesion_hd95", "lesion_nsd")
"""Lesion-wise metrics per region: keys ``<key>_<region>``."""
_MATCH_THRESHOLD = 1e-6
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"evaluate.convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}"
        )


def _spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    values = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if values.shape != (ndim,):
        raise ValueError(f"spacing must have {ndim} values, got {spacing!r}")
    return values


def _border(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each border voxel of ``a`` to the border of ``b``, and back.

    Args:
        a, b: bool masks of the same shape, both non-empty.
        spacing: voxel size per array axis (None: 1).

    Returns:
        ``(a_to_b, b_to_a)``: 1D arrays, one distance per border voxel.
    """
    sampling = _spacing(spacing, a.ndim)
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]  # exact: both borders lie inside
    border_a, border_b = _border(a[box]), _border(b[box])
    return _to_nearest(border_a, border_b, sampling), _to_nearest(border_b, border_a, sampling)


def _to_nearest(source: np.ndarray, target: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Distance (mm) from each ``source`` voxel to the nearest ``target`` voxel: the index
    difference to it times the spacing, as the official tool computes it (so that distances
    equal to the surface Dice tolerance compare the same way)."""
    nearest = ndimage.distance_transform_edt(
        ~target, sampling=sampling, return_distances=False, return_indices=True
    )
    where = np.nonzero(source)
    steps = np.stack([nearest[axis][where] - where[axis] for axis in range(source.ndim)])
    return np.sqrt(((steps.astype(np.float64) * sampling[:, None]) ** 2).sum(axis=0))


def _hd95_of(a_to_b: np.ndarray, b_to_a: np.ndarray, convention: str) -> float:
    if convention == "official":
        return float(np.percentile(np.concatenate([a_to_b, b_to_a]), 95))
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    convention: str = "official",
) -> float:
    """95th-percentile Hausdorff distance (mm) of two non-empty masks (module docstring)."""
    _check_convention(convention)
    return _hd95_of(*surface_distances(pred, truth, spacing), convention)


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(pred & truth)) / float(pred.sum() + truth.sum())


def _legacy(
    pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray, convention: str, hd: bool
) -> tuple[float, float]:
    """(Dice, HD95) of one region with the convention's edge cases."""
    official = convention == "official"
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return (math.nan, math.nan) if official else (1.0, 0.0)
    if not has_pred or not has_truth:
        return 0.0, HD95_MAX if official else HD95_MAX_STRICT
    dice = _dice(pred, truth)
    if not hd:
        return dice, math.nan
    if official and dice == 0.0:
        return 0.0, HD95_MAX
    return dice, hd95(pred, truth, spacing, convention)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=_CONNECTIVITY_26)


def _nsd(a_to_b: np.ndarray, b_to_a: np.ndarray, tolerance: float) -> float:
    return float(((a_to_b <= tolerance).mean() + (b_to_a <= tolerance).mean()) / 2.0)


def lesion_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    convention: str = "official",
) -> dict[str, float]:
    """Lesion-wise metrics of one region (module docstring).

    Args:
        pred, truth: bool masks of the same shape.
        spacing: voxel size per array axis in mm (None: 1).
        convention: the HD95 definition, ``official`` or ``strict``.

    Returns:
        ``{"tp", "fp", "fn", "lesion_dice", "lesion_hd95", "lesion_nsd"}``.
    """
    _check_convention(convention)
    sampling = _spacing(spacing, pred.ndim)
    pred_lesions, n_pred = _components(pred)
    truth_lesions, n_truth = _components(truth)
    pairs: list[tuple[int, int]] = []
    if n_pred and n_truth:
        overlap = pred & truth
        keys, counts = np.unique(
            truth_lesions[overlap].astype(np.int64) * (n_pred + 1) + pred_lesions[overlap],
            return_counts=True,
        )
        truth_sizes = np.bincount(truth_lesions.ravel(), minlength=n_truth + 1)
        pred_sizes = np.bincount(pred_lesions.ravel(), minlength=n_pred + 1)
        cost = np.full((n_truth, n_pred), 2.0)  # 2: no candidate pair
        for key, count in zip(keys, counts):
            t, p = divmod(int(key), n_pred + 1)
            dice = 2.0 * count / (truth_sizes[t] + pred_sizes[p])
            if dice > _MATCH_THRESHOLD:
                cost[t - 1, p - 1] = 1.0 - dice
        rows, cols = linear_sum_assignment(cost)
        pairs = [(r + 1, c + 1) for r, c in zip(rows, cols) if cost[r, c] < 2.0]
    tp = len(pairs)
    out: dict[str, float] = {"tp": tp, "fp": n_pred - tp, "fn": n_truth - tp}
    if tp == 0:
        none = n_pred == 0 and n_truth == 0
        out["lesion_dice"] = math.nan if none else 0.0
        out["lesion_hd95"] = math.nan if none else HD95_MAX
        out["lesion_nsd"] = math.nan if none else 0.0
        return out
    dices, distances, nsds = [], [], []
    tolerance = float(sampling.min())
    for t, p in pairs:
        a, b = pred_lesions == p, truth_lesions == t
        dices.append(_dice(a, b))
        a_to_b, b_to_a = surface_distances(a, b, sampling)
        distances.append(_hd95_of(a_to_b, b_to_a, convention))
        nsds.append(_nsd(a_to_b, b_to_a, tolerance))
    out["lesion_dice"] = float(np.mean(dices))
    out["lesion_hd95"] = float(np.mean(distances))
    out["lesion_nsd"] = float(np.mean(nsds))
    return out


def region_names(convention: LabelConvention | None = None) -> tuple[str, ...]:
    """The scored regions: WT, TC, ET, and RC where the labels have a resection cavity."""
    has_rc = convention is not None and convention.resection is not None
    return REGIONS + (("RC",) if has_rc else ())


def label_regions(label: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """A label map in ``convention`` -> ``(R, ...)`` bool masks of :func:`region_names`.

    Raises:
        DataError: the map holds a value outside the convention (the message lists it).
    """
    label = np.rint(np.asarray(label))
    allowed = np.isin(label, convention.values)
    if not allowed.all():
        shown = ", ".join(f"{v:g}" for v in np.unique(label[~allowed])[:5])
        raise DataError(
            f"label values {shown} not in {convention.describe()} (labels {convention.name}; "
            "BraTS 2018-2021: 0/1/2/4, 2023: 0/1/2/3, 2024: 0/1/2/3/4 with 4 = resection "
            "cavity, MSD: 0/1/2/3 with 1 = oedema)"
        )
    et = label == convention.enhancing
    tc = et | (label == convention.necrotic)
    wt = tc | (label == convention.oedema)
    masks = [wt, tc, et]
    if convention.resection is not None:
        masks.append(label == convention.resection)
    return np.stack(masks)


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    convention: str = "official",
    regions: Sequence[str] = REGIONS,
    hd: bool = True,
    lesion_wise: bool = False,
) -> dict[str, float]:
    """Metrics of one case.

    Args:
        pred, truth: ``(R, X, Y, Z)`` bool region masks, in the order of ``regions``.
        spacing: voxel size per spatial array axis in mm (None: 1).
        convention: ``official`` or ``strict`` (module docstring).
        regions: the region names.
        hd: compute HD95 (else it is NaN).
        lesion_wise: add the lesion-wise metrics (:data:`LESION_KEYS`).

    Returns:
        ``dice_<region>``, ``hd95_<region>``, their means over WT, TC, ET (``dice_mean``,
        ``hd95_mean``; NaN cells left out; the resection cavity is not tumour), and
        ``<key>_<region>`` of the lesion-wise metrics.
    """
    _check_convention(convention)
    if pred.shape != truth.shape or pred.shape[0] != len(regions):
        raise ValueError(
            f"pred and truth must both be ({len(regions)}, ...) for regions {tuple(regions)}, "
            f"got {pred.shape} and {truth.shape}"
        )
    sampling = _spacing(spacing, pred.ndim - 1)
    out: dict[str, float] = {}
    for index, name in enumerate(regions):
        p, t = pred[index].astype(bool), truth[index].astype(bool)
        out[f"dice_{name}"], out[f"hd95_{name}"] = _legacy(p, t, sampling, convention, hd)
        if lesion_wise:
            for key, value in lesion_metrics(p, t, sampling, convention).items():
                out[f"{key}_{name}"] = value
    _add_means(out, regions)
    return out


def missing_case_metrics(
    truth: np.ndarray,
    convention: str = "official",
    regions: Sequence[str] = REGIONS,
    lesion_wise: bool = False,
) -> dict[str, float]:
    """Metrics of a truth case with no prediction: Dice 0 and HD95 373 (373.13 strict) in every
    region, as the official tool scores it; lesion-wise: every true lesion a false negative,
    Dice 0, NSD 0, HD95 373."""
    _check_convention(convention)
    penalty = HD95_MAX if convention == "official" else HD95_MAX_STRICT
    out: dict[str, float] = {}
    for index, name in enumerate(regions):
        out[f"dice_{name}"], out[f"hd95_{name}"] = 0.0, penalty
        if lesion_wise:
            fn = _components(truth[index].astype(bool))[1]
            values = (0, 0, fn, 0.0, HD95_MAX, 0.0)
            out.update({f"{k}_{name}": v for k, v in zip(LESION_KEYS, values)})
    _add_means(out, regions)
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _tumour(regions: Sequence[str]) -> list[str]:
    """The regions of the means: WT, TC, ET (RC is not tumour); any regions if none of them."""
    return [r for r in regions if r in REGIONS] or list(regions)


def _add_means(out: dict[str, float], regions: Sequence[str]) -> None:
    """A case's own means over its tumour regions (``metrics.csv``'s per-case columns)."""
    tumour = _tumour(regions)
    for mean, metric in ((DICE_MEAN, "dice"), (HD95_MEAN, "hd95")):
        out[mean] = _nanmean([out[f"{metric}_{r}"] for r in tumour])


def summarize(
    per_case: Mapping[str, Mapping[str, float]], regions: Sequence[str] | None = None
) -> dict[str, float]:
    """The summary over the cases: the one aggregation behind validation (``val/*``, TensorBoard,
    ``summary.json``) and ``revseg-evaluate``'s ``mean`` row and ``metrics.json``.

    Every per-region metric is its mean over the cases, NaN cells left out (a region empty in
    both prediction and truth), as the official BraTS tool summarises each label; counts
    (``tp``, ``fp``, ``fn``) are summed. :data:`DICE_MEAN` and :data:`HD95_MEAN` are then the
    mean of the tumour regions' means (WT, TC, ET; NaN ones left out), as a BraTS leaderboard's
    mean Dice is read, not the mean of each case's own mean (that weighs a case with empty
    regions more) nor the mean of all region cells pooled. Example: case A with WT Dice 2/3 and
    TC, ET empty in both, case B with Dice 0.4 in every region: WT ``(2/3 + 0.4) / 2``, TC 0.4,
    ET 0.4, ``dice_mean`` ``(8/15 + 0.4 + 0.4) / 3 = 4/9``.

    Args:
        per_case: case id -> :func:`case_metrics` (or :func:`missing_case_metrics`).
        regions: the scored regions (None: those with a ``dice_<region>`` key). The resection
            cavity (RC) is not tumour and is left out of the two means.
    """
    keys: list[str] = []
    for metrics in per_case.values():
        keys += [k for k in metrics if k not in keys]
    out = {}
    for key in keys:
        values = [float(m[key]) for m in per_case.values() if key in m]
        counts = key.split("_", 1)[0] in ("tp", "fp", "fn")
        out[key] = float(np.sum(values)) if counts else _nanmean(values)
    if regions is None:
        regions = [k[len("dice_") :] for k in keys if k.startswith("dice_") and k != DICE_MEAN]
    tumour = _tumour(regions)
    for mean, metric in ((DICE_MEAN, "dice"), (HD95_MEAN, "hd95")):
        cells = [out[f"{metric}_{r}"] for r in tumour if f"{metric}_{r}" in out]
        if cells:
            out[mean] = _nanmean(cells)
    return out


class RegionMetrics:
    """Accumulates the metrics of :func:`case_metrics` over a validation pass.

    Predictions are ``sigmoid(logits) > threshold``; each batch item is a case, scored with the
    official convention by default (an empty region in both prediction and truth is left out of
    the means, as in ``evaluate.py``). Spacing is 1 (the validation grid).

    Args:
        regions: names of the output channels, in order.
        threshold: probability threshold.
        hd95: compute HD95 (costs distance transforms).
        convention: ``official`` or ``strict``.
        lesion_wise: add the lesion-wise metrics.
    """

    def __init__(
        self,
        regions: Sequence[str] = REGIONS,
        threshold: float = 0.5,
        hd95: bool = True,
        convention: str = "official",
        lesion_wise: bool = False,
    ) -> None:
        _check_convention(convention)
        self.regions = tuple(regions)
        self.threshold = threshold
        self.hd95 = hd95
        self.convention = convention
        self.lesion_wise = lesion_wise
        self.reset()

    def reset(self) -> None:
        self._cases: list[dict[str, float]] = []

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, C, ...)`` logits -> ``(B, C, ...)`` float {0, 1} region masks."""
        return (torch.sigmoid(logits) > self.threshold).float()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns the binary prediction ``(B, C, D, H, W)``."""
        pred = self.predict(logits)
        pred_np = pred.detach().cpu().numpy() > 0.5
        target_np = target.detach().cpu().numpy() > 0.5
        for p, t in zip(pred_np, target_np):
            self._cases.append(
                case_metrics(
                    p,
                    t,
                    None,
                    self.convention,
                    self.regions,
                    hd=self.hd95,
                    lesion_wise=self.lesion_wise,
                )
            )
        return pred

    def compute(self) -> dict[str, float]:
        """``{"dice_WT": ..., "dice_mean": ..., "hd95_WT": ..., "hd95_mean": ...,
        "hd95_undefined": ...}`` and the lesion-wise metrics: :func:`summarize` of the cases
        (so ``dice_mean`` is the mean of the region means, as ``revseg-evaluate`` reports it);
        ``hd95_undefined`` counts the NaN HD95 cells (region empty in both)."""
        out: dict[str, Any] = {f"dice_{r}": math.nan for r in self.regions}
        out[DICE_MEAN] = math.nan
        if self.hd95:
            out.update({f"hd95_{r}": math.nan for r in self.regions})
            out[HD95_MEAN] = math.nan
        summary = summarize({str(i): c for i, c in enumerate(self._cases)}, self.regions)
        if not self.hd95:
            summary = {k: v for k, v in summary.items() if not k.startswith("hd95_")}
        out.update(summary)
        if self.hd95:
            cells = [c[f"hd95_{r}"] for c in self._cases for r in self.regions]
            out["hd95_undefined"] = sum(math.isnan(v) for v in cells)
        return out
