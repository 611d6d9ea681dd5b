"""Evaluation of label map files against the ground truth: finding and matching the files, and
the reports. The metrics themselves are :mod:`revseg.metrics.brats` (the same as validation).

Truth: a dataset root of any layout of :mod:`revseg.data.layouts`, one case folder, a flat folder
of label maps (``<case>-seg.nii.gz``, ``<case>_seg.nii.gz`` or ``<case>.nii.gz``, as the
official tool reads them), or one label map file. Predictions: a folder of NIfTI files, each
matched to the truth case whose id its name is or contains (``<case>.nii.gz`` as
``revseg-predict`` writes them, ``BraTS-GLI-00000-000-pred.nii.gz``, ...), or one file. A truth
case without a prediction is listed as missing and, by the official rule (``cases="all"``),
scored as Dice 0, HD95 373; ``cases="predicted"`` scores only the cases that have a prediction
(e.g. the validation cases ``revseg-predict predict.cases=val`` wrote). A prediction that
matches no case is listed as unmatched and skipped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from revseg.data.layouts import LAYOUTS, LabelConvention, discover, find_case, get_layout
from revseg.errors import ConfigError, DataError
from revseg.files import write_atomic, write_text_atomic
from revseg.metrics.brats import (
    DICE_MEAN,
    HD95_MAX,
    HD95_MAX_STRICT,
    HD95_MEAN,
    LESION_KEYS,
    REGIONS,
    case_metrics,
    label_regions,
    missing_case_metrics,
    summarize,
)

__all__ = [
    "CASE_SETS",
    "LABEL_SETS",
    "EvaluationInputs",
    "check_cases",
    "evaluate",
    "evaluate_files",
    "find_inputs",
    "write_reports",
]

LABEL_SETS: dict[str, LabelConvention] = dict(
    sorted(
        (name, layout.truth_convention)
        for layout in LAYOUTS.values()
        for name in (layout.convention.name, layout.truth_convention.name)
    )
)
"""Values of ``evaluate.labels`` (besides ``auto``): the truth's label convention, by the name of
a layout's convention (read as the layout's truth convention: ``brats2023`` as ``brats2024``,
whose labels are 2023's and the resection cavity)."""

CASE_SETS = ("all", "predicted")
"""Values of ``evaluate.cases``: score every truth case (the official rule: one without a
prediction counts as Dice 0, HD95 373), or only the cases that have a prediction."""

_SUFFIXES = (".nii.gz", ".nii")
_SEG_SUFFIXES = ("-seg", "_seg")


def _stem(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _niftis(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith(_SUFFIXES) and not p.name.startswith(".")
    )


def _flat_case_id(path: Path) -> str:
    stem = _stem(path)
    for suffix in _SEG_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _labels_from_ids(ids: Sequence[str], where: Path) -> LabelConvention:
    """The label convention of a flat folder, from its case ids: the truth convention of the
    layouts whose case ids (:attr:`~revseg.data.layouts.Layout.case_id`) they all are."""
    told = [
        {layout.truth_convention for layout in LAYOUTS.values() if re.match(layout.case_id, i)}
        for i in ids
    ]
    common = set.intersection(*told) if told else set()
    if len(common) == 1:
        return common.pop()
    raise ConfigError(
        f"evaluate.labels: cannot tell the label convention of {where} from its file names; "
        f"set evaluate.labels to one of {', '.join(LABEL_SETS)}"
    )


@dataclass
class EvaluationInputs:
    """Truth cases, the prediction matched to each, and what did not match.

    Attributes:
        truth: case id -> truth label map.
        pred: case id -> prediction file (cases without one are missing).
        unmatched: prediction files that match no truth case.
        convention: the label convention both are read in.
        layout: how the truth was found (a layout name, ``flat`` or ``file``).
    """

    truth: dict[str, Path]
    pred: dict[str, Path]
    convention: LabelConvention
    layout: str
    unmatched: list[Path] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [case for case in self.truth if case not in self.pred]


def _find_truth(truth: Path, layout: str) -> tuple[dict[str, Path], LabelConvention | None, str]:
    if not truth.exists():
        raise DataError(f"truth: not found: {truth}")
    if truth.is_file():
        return {_flat_case_id(truth): truth}, None, "file"
    found = None
    try:
        found = discover(truth, layout)
    except DataError:
        try:
            found = find_case(truth, layout)
        except DataError:
            found = None
    if found is not None:
        cases = {c.case: Path(c.label) for c in found.cases if c.label}
        if not cases:
            raise DataError(f"truth: no segmentation file in {truth}")
        return cases, found.layout.truth_convention, found.layout.name
    files = [p for p in _niftis(truth)]
    if not files:
        raise DataError(
            f"truth: {truth} holds no case folders and no label maps (<case>-seg.nii.gz, "
            "<case>_seg.nii.gz or <case>.nii.gz)"
        )
    cases: dict[str, Path] = {}
    for path in files:
        case = _flat_case_id(path)
        if case in cases:
            raise DataError(f"truth: case {case} has two label maps, {cases[case]} and {path}")
        cases[case] = path
    return cases, None, "flat"


def _match(pred: Path, truth: Mapping[str, Path]) -> tuple[dict[str, Path], list[Path]]:
    if not pred.exists():
        raise DataError(f"pred: not found: {pred}")
    if pred.is_file():
        if len(truth) == 1:
            return {next(iter(truth)): pred}, []
        files = [pred]
    else:
        files = _niftis(pred)
        if not files:
            raise DataError(f"pred: no NIfTI files (.nii.gz, .nii) in {pred}")
    matched: dict[str, Path] = {}
    unmatched = []
    ids = sorted(truth, key=len, reverse=True)  # the longest id a name contains wins
    for path in files:
        stem = _stem(path)
        case = stem if stem in truth else next((i for i in ids if i in stem), None)
        if case is None:
            unmatched.append(path)
            continue
        if case in matched:
            raise DataError(f"pred: {matched[case]} and {path} are both predictions of {case}")
        matched[case] = path
    if not matched:
        raise DataError(
            f"pred: no file in {pred} names a truth case (e.g. {files[0].name}; truth cases "
            f"such as {next(iter(truth))})"
        )
    return matched, unmatched


def find_inputs(
    pred: str | os.PathLike, truth: str | os.PathLike, layout: str = "auto", labels: str = "auto"
) -> EvaluationInputs:
    """Find the truth cases and match the predictions to them (module docstring).

    Args:
        pred: a folder of predictions or one file.
        truth: a dataset root, a case folder, a flat folder of label maps, or one file.
        layout: the truth's ``data.layout`` (``auto``: detected).
        labels: ``auto`` (the layout's convention, BraTS 2023+ read as 2024 with label 4 the
            resection cavity) or one of :data:`LABEL_SETS`.

    Raises:
        DataError: a path is missing or holds no cases; no prediction names a truth case; a
            case has two predictions.
        ConfigError: unknown ``labels``, or ``auto`` cannot tell the convention.
    """
    if labels != "auto" and labels not in LABEL_SETS:
        raise ConfigError(
            f"evaluate.labels must be auto or one of {', '.join(LABEL_SETS)}, got {labels!r}"
        )
    truth_path = Path(truth)
    cases, convention, found_layout = _find_truth(truth_path, layout)
    if labels != "auto":
        convention = LABEL_SETS[labels]
    elif convention is None and layout != "auto":
        convention = get_layout(layout).truth_convention
    elif convention is None:
        convention = _labels_from_ids(list(cases), truth_path)
    matched, unmatched = _match(Path(pred), cases)
    return EvaluationInputs(
        dict(sorted(cases.items())), matched, convention, found_layout, unmatched
    )


def _read(path: Path, convention: LabelConvention) -> tuple[np.ndarray, Any]:
    try:
        image = nib.load(os.fspath(path))
        label = np.asanyarray(image.dataobj)
    except Exception as error:  # noqa: BLE001 - any unreadable file
        raise DataError(f"{path}: cannot read: {' '.join(str(error).split())}") from None
    if label.ndim != 3:
        raise DataError(f"{path}: label map must be 3D, got shape {label.shape}")
    try:
        return label_regions(label, convention), image
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def evaluate_files(
    pred: str | os.PathLike | None,
    truth: str | os.PathLike,
    convention: LabelConvention,
    metric_convention: str = "official",
    regions: Sequence[str] = REGIONS,
    lesion_wise: bool = False,
) -> dict[str, float]:
    """Metrics of a prediction file against a truth file of the same grid (None: missing).

    HD95 is in mm, with the truth header's voxel spacing along the array axes.

    Raises:
        DataError: a file cannot be read, holds labels outside ``convention``, or the two differ
            in shape or affine (naming the prediction file).
    """
    truth_regions, truth_image = _read(Path(truth), convention)
    truth_regions = truth_regions[: len(regions)]
    if pred is None:
        return missing_case_metrics(truth_regions, metric_convention, regions, lesion_wise)
    pred_regions, pred_image = _read(Path(pred), convention)
    pred_regions = pred_regions[: len(regions)]
    if pred_regions.shape != truth_regions.shape:
        raise DataError(
            f"{pred}: shape {pred_regions.shape[1:]} differs from {truth_regions.shape[1:]} of "
            f"{truth}"
        )
    if not np.allclose(pred_image.affine, truth_image.affine, atol=1e-3):
        raise DataError(f"{pred}: affine differs from that of {truth}")
    spacing = tuple(float(s) for s in truth_image.header.get_zooms()[:3])
    return case_metrics(
        pred_regions, truth_regions, spacing, metric_convention, regions, lesion_wise=lesion_wise
    )


def _has_resection(convention: LabelConvention, truth: Sequence[Path]) -> bool:
    value = convention.resection
    if value is None:
        return False
    return any(bool((np.asanyarray(nib.load(os.fspath(p)).dataobj) == value).any()) for p in truth)


def check_cases(cases: str) -> str:
    """``cases`` if it is one of :data:`CASE_SETS`.

    Raises:
        ConfigError: another value (one line naming ``evaluate.cases``).
    """
    if cases not in CASE_SETS:
        raise ConfigError(f"evaluate.cases must be one of {', '.join(CASE_SETS)}, got {cases!r}")
    return cases


def evaluate(
    inputs: EvaluationInputs,
    convention: str = "official",
    lesion_wise: bool = True,
    regions: Sequence[str] | None = None,
    cases: str = "all",
) -> tuple[dict[str, dict[str, float]], tuple[str, ...]]:
    """Score the truth cases.

    Args:
        inputs: from :func:`find_inputs`.
        convention: ``official`` or ``strict`` (:mod:`revseg.metrics.brats`).
        lesion_wise: add the lesion-wise metrics.
        regions: the regions scored; None: WT, TC, ET, and RC when a truth case has label 4
            (the resection cavity) in a convention that has it.
        cases: ``all`` (every truth case; one without a prediction is scored as missing, Dice 0
            and HD95 373, as the official tool does) or ``predicted`` (only the cases that have
            a prediction).

    Returns:
        ``(per_case, regions)``: case id -> metrics, in case order.

    Raises:
        ConfigError: ``cases`` is neither ``all`` nor ``predicted``.
    """
    scored = inputs.truth
    if check_cases(cases) == "predicted":
        scored = {case: truth for case, truth in scored.items() if case in inputs.pred}
    if regions is None:
        has_rc = _has_resection(inputs.convention, list(scored.values()))
        regions = REGIONS + (("RC",) if has_rc else ())
    per_case = {
        case: evaluate_files(
            inputs.pred.get(case), truth, inputs.convention, convention, regions, lesion_wise
        )
        for case, truth in scored.items()
    }
    return per_case, tuple(regions)


# -- reports -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """The CSV file, written atomically like every other output (never half-written)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    write_text_atomic(text.getvalue(), path)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _statistics(per_case: Mapping[str, Mapping[str, float]], key: str) -> dict[str, float]:
    values = np.array([float(m[key]) for m in per_case.values()], dtype=np.float64)
    finite = values[~np.isnan(values)]
    if not finite.size:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    std = float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan
    return {
        "mean": float(finite.mean()),
        "std": std,
        "median": float(np.median(finite)),
        "n": int(finite.size),
    }


def write_reports(
    per_case: Mapping[str, Mapping[str, float]],
    output: str | os.PathLike,
    extra: Mapping[str, Any],
    regions: Sequence[str] = REGIONS,
    missing: Sequence[str] = (),
    plot: bool = True,
) -> list[Path]:
    """Write the reports into ``output`` (created).

    - ``metrics.csv``: ``case, dice_<region>..., dice_mean, hd95_<region>..., hd95_mean``, a row
      per case of ``per_case`` (every truth case, missing ones included, unless only the
      predicted ones were scored; ``dice_mean`` the case's mean over WT, TC, ET),
      then ``mean``: :func:`~revseg.metrics.brats.summarize`, as validation reports it (each
      region's mean over the cases, NaN cells left out; ``dice_mean`` and ``hd95_mean`` the
      mean of the region means);
    - ``lesionwise.csv``: ``case, tp_<region>, fp_<region>, fn_<region>, lesion_dice_<region>,
      lesion_hd95_<region>, lesion_nsd_<region>...`` (when computed), then ``mean`` (counts
      summed);
    - ``summary.csv``: ``metric, mean, std, median, n`` over the cases, NaN cells left out
      (``dice_mean``, ``hd95_mean``: ``mean`` as in ``metrics.csv``, the other columns over the
      cases' own means);
    - ``metrics.json``: ``extra``, the conventions, ``missing``, ``mean``, ``summary``, ``cases``
      (NaN and infinity as null);
    - ``boxplot.png``: Dice and HD95 per region over the cases that have a prediction, the
      missing ones scored in ``per_case`` counted apart (when ``plot``).

    Returns:
        The paths written.
    """
    from revseg.inference.report_plot import box_plot

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    mean = summarize(per_case, regions)
    cases = list(per_case)
    legacy = [f"dice_{r}" for r in regions] + [DICE_MEAN]
    legacy += [f"hd95_{r}" for r in regions] + [HD95_MEAN]
    lesion = [f"{k}_{r}" for r in regions for k in LESION_KEYS]
    lesion = [k for k in lesion if cases and k in per_case[cases[0]]]
    written = [output / "metrics.csv"]
    rows = [[c, *(per_case[c][k] for k in legacy)] for c in cases]
    _write_csv(written[-1], ["case", *legacy], rows + [["mean", *(mean[k] for k in legacy)]])
    if lesion:
        written.append(output / "lesionwise.csv")
        rows = [[c, *(per_case[c][k] for k in lesion)] for c in cases]
        _write_csv(written[-1], ["case", *lesion], rows + [["mean", *(mean[k] for k in lesion)]])
    summary = {k: _statistics(per_case, k) for k in legacy + lesion}
    for key in (DICE_MEAN, HD95_MEAN):  # the summary's mean, as in metrics.csv's mean row
        summary[key]["mean"] = mean[key]
    written.append(output / "summary.csv")
    _write_csv(
        written[-1],
        ["metric", "mean", "std", "median", "n"],
        [[k, *s.values()] for k, s in summary.items()],
    )
    content = {
        **extra,
        "regions": list(regions),
        "hd95_undefined_mm": HD95_MAX if extra.get("convention") != "strict" else HD95_MAX_STRICT,
        "missing": list(missing),
        "mean": mean,
        "summary": summary,
        "cases": per_case,
    }
    written.append(output / "metrics.json")
    write_text_atomic(json.dumps(_json_value(content), indent=2) + "\n", written[-1])
    if plot and cases:
        written.append(output / "boxplot.png")
        unpredicted = [case for case in missing if case in per_case]
        image = box_plot(per_case, regions, unpredicted)
        write_atomic(written[-1], lambda f: image.save(f, format="PNG"))
    return written
