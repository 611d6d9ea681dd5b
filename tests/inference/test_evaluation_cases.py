"""Which truth cases revseg-evaluate scores (evaluate.cases): every one by default, a case without
a prediction as Dice 0 / HD95 373 (the official rule), or only the predicted ones; the first line
printed says which; the box plot leaves the unpredicted cases out of its boxes."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from helpers import run_python
from revseg.errors import ConfigError
from revseg.inference.evaluation import evaluate, find_inputs
from revseg.inference.report_plot import box_plot

SHAPE = (16, 14, 12)


def tumour(shift=0):
    label = np.zeros(SHAPE, np.uint8)
    label[3:11, 3:10, 2:9] = 2
    label[5:9, 5:8, 4:7] = 1
    label[6:8, 5:7, 4:6] = 4  # BraTS 2018-2021 labels
    return np.roll(label, shift, axis=0)


def save(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), path)


@pytest.fixture
def half_predicted(tmp_path):
    """Five truth cases, predictions for two of them (as after ``predict.cases=val``)."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for i in range(5):
        save(truth / f"BraTS2021_0000{i}_seg.nii.gz", tumour())
    save(pred / "BraTS2021_00000.nii.gz", tumour())
    save(pred / "BraTS2021_00001.nii.gz", tumour(1))
    return truth, pred


def run_cli(*args):
    return run_python("scripts/evaluate.py", *args, timeout=180)


def test_evaluate_scores_all_truth_cases_or_the_predicted_ones(half_predicted):
    inputs = find_inputs(*reversed(half_predicted))
    every, _ = evaluate(inputs, lesion_wise=False)
    predicted, _ = evaluate(inputs, lesion_wise=False, cases="predicted")
    assert list(every) == [f"BraTS2021_0000{i}" for i in range(5)]
    assert list(predicted) == ["BraTS2021_00000", "BraTS2021_00001"]
    for case in predicted:
        assert predicted[case] == every[case]
    assert every["BraTS2021_00004"]["dice_WT"] == 0.0
    with pytest.raises(ConfigError, match="^evaluate.cases must be one of all, predicted"):
        evaluate(inputs, cases="val")


def test_cli_first_line_says_which_cases_were_scored(half_predicted, tmp_path):
    truth, pred = half_predicted
    common = [f"pred={pred}", f"truth={truth}", "evaluate.lesion_wise=false"]
    official = run_cli(*common, f"output={tmp_path / 'all'}")
    assert official.returncode == 0, official.stderr[-2000:]
    assert official.stdout.splitlines()[0] == (
        "scored all 5 truth case(s) (evaluate.cases=all, the official rule); 3 without a "
        "prediction scored Dice 0, HD95 373; labels brats2018-2021, convention official"
    )
    only = run_cli(*common, f"output={tmp_path / 'predicted'}", "evaluate.cases=predicted")
    assert only.returncode == 0, only.stderr[-2000:]
    assert only.stdout.splitlines()[0] == (
        "scored the 2 case(s) with a prediction only (evaluate.cases=predicted); 3 truth "
        "case(s) without one left out; labels brats2018-2021, convention official"
    )
    assert "BraTS2021_00004 has no prediction; left out" in only.stderr
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "predicted" / "metrics.csv").open())}
    assert list(rows) == ["BraTS2021_00000", "BraTS2021_00001", "mean"]
    dice = [float(rows[c]["dice_WT"]) for c in ("BraTS2021_00000", "BraTS2021_00001")]
    assert float(rows["mean"]["dice_WT"]) == pytest.approx(np.mean(dice), abs=1e-5)
    assert dice[0] == 1.0 and float(rows["mean"]["dice_WT"]) > 0.9
    report = json.loads((tmp_path / "predicted" / "metrics.json").read_text())
    assert report["cases_scored"] == "predicted"
    assert report["missing"] == [f"BraTS2021_0000{i}" for i in (2, 3, 4)]
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["cases_scored"] == "all"
    bad = run_cli(*common, f"output={tmp_path / 'bad'}", "evaluate.cases=val")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: evaluate.cases must be one of all, predicted, got 'val'")


def _cases(n_predicted: int, n_missing: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    per_case = {}
    for i in range(n_predicted + n_missing):
        missing = i >= n_predicted
        per_case[f"case{i}"] = {
            **{f"dice_{r}": 0.0 if missing else rng.uniform(0.8, 0.95) for r in "ABC"},
            **{f"hd95_{r}": 373.0 if missing else rng.uniform(2, 12) for r in "ABC"},
        }
    return per_case


def test_box_plot_draws_the_unpredicted_cases_apart():
    """13 unpredicted cases of 25 (Dice 0, HD95 373) drew boxes from 0 to 0.9 and from 5 to 373:
    now the boxes are those of the 12 predicted cases, and a line above counts the others."""
    per_case = _cases(12, 13)
    missing = [f"case{i}" for i in range(12, 25)]
    with_missing = np.asarray(box_plot(per_case, "ABC", missing))
    predicted = {c: m for c, m in per_case.items() if c not in missing}
    alone = np.asarray(box_plot(predicted, "ABC"))
    band = 30  # the line that counts the cases left out
    assert (with_missing[band:] == alone[band:]).all()
    assert (with_missing[:band] != 255).any() and (alone[:band] == 255).all()
    # the boxes of the Dice panel stay in its upper part (values 0.8 .. 0.95)
    dice = with_missing[64 : with_missing.shape[0] - 48, 60:430]
    coloured = np.nonzero((dice.max(-1).astype(int) - dice.min(-1)) > 60)[0]
    assert coloured.max() < 0.3 * dice.shape[0]


def test_box_plot_labels_sit_below_the_frame(tmp_path):
    """The region names and case counts are under the frame, apart from every box."""
    image = box_plot(_cases(6, 0), "ABC")
    pixels = np.asarray(image)
    bottom = image.height - 48
    below = pixels[bottom + 2 :, 60:430]
    assert (below < 128).any()  # names and n= are drawn there
    frame_inside = pixels[64 + 1 : bottom - 1, 60 + 1 : 430 - 1]
    dark = frame_inside.max(-1) < 100  # text is black or dark grey; boxes are coloured
    assert not dark.any()
    image.save(tmp_path / "boxplot.png")
    assert Image.open(tmp_path / "boxplot.png").size == (900, 440)


def test_nnunet_truth_scores_the_predicted_cases_only(tmp_path):
    """The same option for a dataset.json truth folder (labels named by the dataset)."""
    import shutil

    from revseg.data.synthetic_nnunet import make_task

    root = make_task(tmp_path / "Dataset904_SynthHippocampus", "hippocampus", 2, num_test=3)
    truth, pred = root / "labelsTs", tmp_path / "pred"
    pred.mkdir()
    first = sorted(truth.iterdir())[0]
    shutil.copy(first, pred / first.name)  # a perfect prediction of one case of three
    common = [f"pred={pred}", f"truth={truth}"]
    only = run_cli(*common, f"output={tmp_path / 'predicted'}", "evaluate.cases=predicted")
    assert only.returncode == 0, only.stderr[-2000:]
    assert only.stdout.splitlines()[0] == (
        "scored the 1 case(s) with a prediction only (evaluate.cases=predicted); 2 truth "
        f"case(s) without one left out; dataset {root.name}"
    )
    report = json.loads((tmp_path / "predicted" / "metrics.json").read_text())
    assert list(report["cases"]) == [first.name.removesuffix(".nii.gz")]
    assert report["mean"]["dice_mean"] == 1.0 and len(report["missing"]) == 2
    official = run_cli(*common, f"output={tmp_path / 'all'}")
    assert official.stdout.splitlines()[0].startswith(
        "scored all 3 truth case(s) (evaluate.cases=all, the official rule); 2 without a "
        "prediction scored Dice 0"
    )
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["mean"]["dice_mean"] < 0.5
