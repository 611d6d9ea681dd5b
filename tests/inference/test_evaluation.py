"""evaluate.py on files: flat and per-case truth folders, predictions matched by case id, missing
predictions scored and listed, label 4 (resection cavity), the voxel spacing from the header,
the reports (metrics.csv columns kept, lesionwise.csv, summary.csv, metrics.json, boxplot.png)."""

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from helpers import run_python
from revseg.errors import ConfigError, DataError
from revseg.inference.evaluation import find_inputs
from revseg.inference.report_plot import box_statistics
from revseg.metrics.brats import HD95_MAX

REPO = Path(__file__).resolve().parents[2]
SHAPE = (16, 14, 12)


def tumour(shift=0):
    label = np.zeros(SHAPE, np.uint8)
    label[3:11, 3:10, 2:9] = 2
    label[5:9, 5:8, 4:7] = 1
    label[6:8, 5:7, 4:6] = 3
    return np.roll(label, shift, axis=0)


def save(path, label, spacing=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.diag([*spacing, 1.0])), path)


@pytest.fixture
def flat(tmp_path):
    """Flat truth (<case>-seg.nii.gz) of four cases; predictions named with a prefix or suffix
    around the case id; one case without a prediction, one file that is no case."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    with_cavity = tumour()
    with_cavity[12:15, 1:4, 1:4] = 4
    cases = {
        "BraTS-GLI-00001-000": (tumour(), tumour()),
        "BraTS-GLI-00002-000": (tumour(), tumour(1)),
        "BraTS-GLI-00003-000": (with_cavity, with_cavity),
        "BraTS-GLI-00004-000": (tumour(), None),
    }
    for case, (t, p) in cases.items():
        save(truth / f"{case}-seg.nii.gz", t, (1.0, 1.0, 2.0))
        if p is not None:
            save(pred / f"team_{case}_pred.nii.gz", p, (1.0, 1.0, 2.0))
    save(pred / "notes.nii.gz", tumour())
    return truth, pred


def run_cli(*args):
    return run_python("scripts/evaluate.py", *args, timeout=180)


def test_flat_truth_with_missing_and_unmatched_predictions(flat, tmp_path):
    truth, pred = flat
    report = tmp_path / "report"
    done = run_cli(f"pred={pred}", f"truth={truth}", f"output={report}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BraTS-GLI-00004-000 has no prediction" in done.stderr
    assert "notes.nii.gz matches no truth case" in done.stderr
    rows = list(csv.DictReader((report / "metrics.csv").open()))
    columns = ["case"] + [f"dice_{r}" for r in ("WT", "TC", "ET", "RC")] + ["dice_mean"]
    columns += [f"hd95_{r}" for r in ("WT", "TC", "ET", "RC")] + ["hd95_mean"]
    assert list(rows[0]) == columns  # the legacy columns, RC as the truth has label 4
    by_case = {r["case"]: r for r in rows}
    assert list(by_case) == [f"BraTS-GLI-0000{i}-000" for i in (1, 2, 3, 4)] + ["mean"]
    missing = by_case["BraTS-GLI-00004-000"]
    assert float(missing["dice_WT"]) == 0.0 and float(missing["hd95_ET"]) == HD95_MAX
    assert float(by_case["BraTS-GLI-00001-000"]["dice_mean"]) == 1.0
    assert math.isnan(float(by_case["BraTS-GLI-00001-000"]["dice_RC"]))  # empty in both
    assert float(by_case["BraTS-GLI-00003-000"]["dice_RC"]) == 1.0
    # shifted by one voxel along the first axis (1 mm): Dice and HD95 by hand
    wt = tumour() > 0
    moved = np.roll(wt, 1, axis=0)
    expected = 2 * (wt & moved).sum() / (wt.sum() + moved.sum())
    assert float(by_case["BraTS-GLI-00002-000"]["dice_WT"]) == pytest.approx(expected, abs=1e-5)
    assert float(by_case["BraTS-GLI-00002-000"]["hd95_WT"]) == pytest.approx(1.0)
    dice_wt = [1.0, expected, 1.0, 0.0]
    assert float(by_case["mean"]["dice_WT"]) == pytest.approx(np.mean(dice_wt), abs=1e-5)
    report_json = json.loads((report / "metrics.json").read_text())
    assert report_json["missing"] == ["BraTS-GLI-00004-000"]
    assert report_json["unmatched"] == [str(pred / "notes.nii.gz")]
    assert (
        report_json["label_convention"] == "brats2024" and report_json["convention"] == "official"
    )
    assert report_json["cases"]["BraTS-GLI-00001-000"]["dice_RC"] is None  # NaN as null
    lesion = {r["case"]: r for r in csv.DictReader((report / "lesionwise.csv").open())}
    assert lesion["BraTS-GLI-00004-000"]["fn_WT"] == "1"
    assert lesion["mean"]["tp_WT"] == "3"  # counts are summed
    summary = {r["metric"]: r for r in csv.DictReader((report / "summary.csv").open())}
    assert summary["dice_WT"]["n"] == "4" and summary["dice_RC"]["n"] == "2"
    assert Image.open(report / "boxplot.png").size == (900, 440)


def test_spacing_from_the_header_along_the_right_axis(tmp_path):
    """A shift of one voxel along the third axis, 2 mm there: HD95 2 mm (the official tool's
    legacy HD95 would say 1, ignoring the spacing)."""
    truth, pred = tmp_path / "truth" / "a-seg.nii.gz", tmp_path / "pred" / "a.nii.gz"
    save(truth, tumour(), (1.0, 1.0, 2.0))
    save(pred, np.roll(tumour(), 1, axis=2), (1.0, 1.0, 2.0))
    report = tmp_path / "report"
    done = run_cli(
        f"pred={pred}", f"truth={truth}", f"output={report}", "evaluate.labels=brats2023"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(csv.DictReader((report / "metrics.csv").open()))
    assert float(row["hd95_WT"]) == pytest.approx(2.0)
    strict = tmp_path / "strict"
    args = [f"pred={pred}", f"truth={truth}", f"output={strict}", "evaluate.labels=brats2023"]
    assert run_cli(*args, "evaluate.convention=strict").returncode == 0
    assert json.loads((strict / "metrics.json").read_text())["convention"] == "strict"


def test_dataset_root_and_case_folders(tmp_path):
    root = tmp_path / "root"
    for case in ("BraTS-GLI-00005-000", "BraTS-GLI-00006-000"):
        for name in ("t1n", "t1c", "t2w", "t2f"):
            save(root / case / f"{case}-{name}.nii.gz", np.zeros(SHAPE))
        save(root / case / f"{case}-seg.nii.gz", tumour())
    save(tmp_path / "pred" / "BraTS-GLI-00005-000.nii.gz", tumour())
    inputs = find_inputs(tmp_path / "pred", root)
    assert inputs.layout == "brats2023" and inputs.convention.name == "brats2024"
    assert list(inputs.truth) == ["BraTS-GLI-00005-000", "BraTS-GLI-00006-000"]
    assert inputs.missing == ["BraTS-GLI-00006-000"]
    one = find_inputs(tmp_path / "pred", root / "BraTS-GLI-00005-000")
    assert list(one.truth) == ["BraTS-GLI-00005-000"] and not one.missing


def test_bad_input_is_one_line(flat, tmp_path):
    truth, pred = flat
    done = run_cli(f"pred={pred}", f"truth={truth}", f"output={tmp_path}", "evaluate.convention=x")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: evaluate.convention must be one of official, strict")
    )
    with pytest.raises(DataError, match=f"^truth: not found: {tmp_path / 'none'}$"):
        find_inputs(pred, tmp_path / "none")
    with pytest.raises(ConfigError, match="^evaluate.labels: cannot tell"):
        save(tmp_path / "odd" / "case1.nii.gz", tumour())
        find_inputs(pred, tmp_path / "odd")
    odd = find_inputs(tmp_path / "odd" / "case1.nii.gz", tmp_path / "odd", layout="brats2021")
    assert odd.convention.name == "brats2018-2021" and odd.layout == "flat"
    with pytest.raises(DataError, match="^pred: no file in .* names a truth case"):
        find_inputs(pred / "notes.nii.gz", truth)
    bad = tmp_path / "bad"
    save(bad / "BraTS-GLI-00001-000-seg.nii.gz", tumour() * 3)  # label 9
    done = run_cli(f"pred={pred}", f"truth={bad}", f"output={tmp_path / 'r'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {bad / 'BraTS-GLI-00001-000-seg.nii.gz'}: label values 6, 9 not in 0/1/2/3/4 "
        "(labels brats2024; BraTS 2018-2021: 0/1/2/4, 2023: 0/1/2/3, 2024: 0/1/2/3/4 with "
        "4 = resection cavity, MSD: 0/1/2/3 with 1 = oedema)"
    )


def test_box_statistics():
    stats = box_statistics([1.0, 2.0, 3.0, 4.0, 100.0, math.nan])
    assert (stats["q1"], stats["median"], stats["q3"]) == (2.0, 3.0, 4.0)
    assert (stats["low"], stats["high"], stats["outliers"], stats["n"]) == (1.0, 4.0, [100.0], 5)
    assert box_statistics([math.nan]) is None
