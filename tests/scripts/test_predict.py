"""Prediction round trip (shape, affine, header, labels in each dataset's convention), the
predict / evaluate command lines."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import load_script, run_python, untrained_run
from revseg.data.layouts import discover, find_case
from revseg.data.synthetic import make_synthetic_brats
from revseg.data.transforms import build_transforms
from revseg.errors import ConfigError, DataError
from revseg.inference.prediction import Predictor, write_label_map

SHAPE = (28, 26, 20)  # not cubic, larger than the crop in x: the crop/pad must be undone exactly


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pred")
    return {
        layout: make_synthetic_brats(base / layout, 2, SHAPE, seed=4, layout=layout)
        for layout in ("brats2021", "brats2023", "msd")
    }


class BrainModel(torch.nn.Module):
    """Says "enhancing tumour" wherever the input has a non-zero voxel (the brain)."""

    def forward(self, x):
        brain = (x != 0).any(1, keepdim=True).float()
        return (brain * 20 - 10).repeat(1, 3, 1, 1, 1)


class OracleModel(torch.nn.Module):
    """Returns the preprocessed truth as logits (for the geometry + label round trip)."""

    def __init__(self, regions):
        super().__init__()
        self.regions = regions

    def forward(self, x):
        assert x.shape[2:] == self.regions.shape[1:]
        return (self.regions[None] * 20 - 10).to(x.dtype)


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_round_trip_gives_the_truth_back_in_the_dataset_convention(roots, layout):
    found = discover(roots[layout])
    case = found.cases[1]
    convention = found.layout.convention
    crop = (32, 32, 16)  # pads y and z, crops nothing of the brain
    truth_regions = build_transforms(
        False,
        crop,
        enhancing_label=convention.enhancing,
        necrotic_label=convention.necrotic,
        oedema_label=convention.oedema,
        channel_order=found.channel_order,
    )(case.item())["label"]
    predictor = Predictor(OracleModel(truth_regions), crop_size=crop)
    label = predictor.label_map(found, case)
    truth = np.asanyarray(nib.load(case.label).dataobj)
    assert label.shape == SHAPE
    np.testing.assert_array_equal(label, truth)  # 0/1/2/4, 0/1/2/3 or MSD's 1 = oedema
    assert set(np.unique(label)) == set(convention.values)


@pytest.mark.parametrize("sliding_window", [False, True])
def test_written_file_has_the_input_geometry(roots, tmp_path, sliding_window):
    found = find_case(roots["msd"] / "imagesTr" / "BRATS_001.nii.gz")  # 4D input
    case = found.cases[0]
    predictor = Predictor(
        BrainModel(), crop_size=(32, 32, 32), sliding_window=sliding_window, roi_size=(16, 16, 16)
    )
    path = write_label_map(predictor.label_map(found, case), case.image[0], tmp_path / "p.nii.gz")
    written, source = nib.load(path), nib.load(case.image[0])
    assert written.shape == source.shape[:3] and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, source.affine)
    for key in ("qform_code", "sform_code", "xyzt_units"):
        assert written.header[key] == source.header[key]
    np.testing.assert_array_equal(written.header.get_zooms(), source.header.get_zooms()[:3])
    brain = (np.asanyarray(source.dataobj) != 0).any(-1)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.where(brain, 3, 0))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, roots):
    """A run directory with a tiny untrained prev_unet checkpoint and its split."""
    split = {"train": ["BraTS2021_00000"], "val": ["BraTS2021_00001"]}
    return untrained_run(tmp_path_factory.mktemp("run"), split=split)


def _cli(script, *args):
    return run_python(f"scripts/{script}", *args, timeout=180)


def test_predict_command_line_then_evaluate(roots, run_dir, tmp_path):
    root = roots["brats2021"]
    out = tmp_path / "pred"
    done = _cli(
        "predict.py", f"run={run_dir}", f"input={root}", f"output={out}", "predict.cases=val"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote 1 label map(s)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["BraTS2021_00001.nii.gz"]
    written = nib.load(out / "BraTS2021_00001.nii.gz")
    assert written.shape == SHAPE and set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1, 2, 4}

    evaluate = load_script("evaluate")
    report = tmp_path / "report"
    assert evaluate.main([f"pred={out}", f"truth={root}", f"output={report}"]) == 0
    dice = json.loads((report / "metrics.json").read_text())["mean"]["dice_WT"]
    assert 0.0 <= dice < 1.0  # an untrained model


def test_predict_single_case_sliding_window(roots, run_dir, tmp_path):
    one = tmp_path / "one.nii.gz"
    case = roots["brats2023"] / "BraTS-GLI-00000-000"
    args = [f"run={run_dir}", f"input={case}", f"output={one}", "predict.sliding_window=true"]
    assert load_script("predict").main([*args, "predict.roi_size=[16,16,16]"]) == 0
    assert nib.load(one).shape == SHAPE
    assert set(np.unique(np.asanyarray(nib.load(one).dataobj))) <= {0, 1, 2, 3}  # 2023 labels


def test_evaluate_truth_against_itself(roots, tmp_path):
    root = roots["msd"]
    truth_as_pred = tmp_path / "truth"
    truth_as_pred.mkdir()
    for case in ("BRATS_001", "BRATS_002"):
        shutil.copy(root / "labelsTr" / f"{case}.nii.gz", truth_as_pred / f"{case}.nii.gz")
    report = tmp_path / "report"
    done = _cli("evaluate.py", f"pred={truth_as_pred}", f"truth={root}", f"output={report}")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((report / "metrics.csv").open()))
    assert [r["case"] for r in rows] == ["BRATS_001", "BRATS_002", "mean"]
    assert all(float(r["dice_mean"]) == 1.0 and float(r["hd95_mean"]) == 0.0 for r in rows)
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["label_convention"] == "msd" and metrics["mean"]["dice_ET"] == 1.0
    assert set(metrics["cases"]) == {"BRATS_001", "BRATS_002"}


def test_bad_input_is_one_line(run_dir, tmp_path):
    predict = load_script("predict")
    with pytest.raises(DataError, match=f"^input: not found: {tmp_path / 'none'}$"):
        predict.main([f"run={run_dir}", f"input={tmp_path / 'none'}", f"output={tmp_path}"])
    with pytest.raises(ConfigError, match="^output is required"):
        predict.main([f"run={run_dir}", f"input={tmp_path}"])


def test_case_missing_a_modality_names_the_file(roots, run_dir, tmp_path):
    case = tmp_path / "BraTS2021_00000"
    shutil.copytree(roots["brats2021"] / case.name, case)
    missing = case / f"{case.name}_t2.nii.gz"
    missing.unlink()
    proc = _cli("predict.py", f"run={run_dir}", f"input={case}", f"output={tmp_path / 'p.nii.gz'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: input: case {case.name} has no t2 image: {missing} not found"
    ]
    assert not (tmp_path / "p.nii.gz").exists()
