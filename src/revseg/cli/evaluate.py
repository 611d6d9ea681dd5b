"""Evaluate predicted label maps: Dice and HD95 per region (WT, TC, ET) per case, and means.

Usage::

    revseg-evaluate pred=<folder of <case>.nii.gz | file> \
        truth=<dataset root | case folder> output=<folder> [data.layout=...]

Predictions are matched to the truth's cases by file name (``<case>.nii.gz``, as
``revseg-predict`` writes them); both are read in the truth dataset's label convention.
Writes ``<output>/metrics.csv`` and ``<output>/metrics.json``. Exits with status 2 and one line on
stderr for a bad argument or file.
"""

from __future__ import annotations

from pathlib import Path

from revseg.cli import run_main
from revseg.config import compose_config
from revseg.errors import DataError


def _pairs(pred: Path, found, single: bool) -> list[tuple[str, Path, str]]:
    if single:
        case = found.cases[0]
        path = pred / f"{case.case}.nii.gz" if pred.is_dir() else pred
        if not path.is_file():
            raise DataError(f"pred: no prediction file {path}")
        return [(case.case, path, case.label)]
    if not pred.is_dir():
        raise DataError(f"pred: {pred} must be a folder of <case>.nii.gz files for a dataset root")
    by_id = {case.case: case for case in found.cases}
    pairs = []
    for path in sorted(pred.iterdir()):
        name = path.name
        if name.startswith(".") or not name.endswith((".nii.gz", ".nii")):
            continue
        case_id = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
        if case_id not in by_id:
            raise DataError(f"{path}: no case {case_id} in the truth dataset {found.root}")
        pairs.append((case_id, path, by_id[case_id].label))
    if not pairs:
        raise DataError(f"pred: no <case>.nii.gz files in {pred}")
    return pairs


def main(argv: list[str]) -> int:
    from revseg.inference.evaluation import evaluate_files, summarize, write_reports
    from revseg.inference.prediction import resolve_input

    cfg = compose_config("evaluate", argv)
    found, single = resolve_input(cfg.truth, str(cfg.data.layout))
    convention = found.layout.convention
    per_case = {}
    for case_id, path, truth in _pairs(Path(cfg.pred), found, single):
        if truth is None:
            raise DataError(f"truth: case {case_id} has no segmentation file")
        per_case[case_id] = evaluate_files(path, truth, convention)
    extra = {
        "pred": str(cfg.pred),
        "truth": str(cfg.truth),
        "layout": found.layout.name,
        "label_convention": convention.name,
    }
    csv_path, json_path = write_reports(per_case, cfg.output, extra)
    mean = summarize(per_case)
    print(f"{len(per_case)} case(s), convention {convention.name}")
    print("        " + "  ".join(f"{r:>6}" for r in ("WT", "TC", "ET", "mean")))
    for metric in ("dice", "hd95"):
        values = [mean[f"{metric}_{r}"] for r in ("WT", "TC", "ET", "mean")]
        print(f"{metric:>6}  " + "  ".join(f"{v:6.3f}" for v in values))
    print(f"wrote {csv_path} and {json_path}")
    return 0


def run() -> None:
    """The ``revseg-evaluate`` command (and ``python scripts/evaluate.py``)."""
    run_main(main)
