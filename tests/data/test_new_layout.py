"""A new layout is one entry of ``revseg.data.layouts.LAYOUTS`` and this test.

The entry below, a made-up BraTS 2025-like naming (``<case>/<case>.{t1n,t1c,t2w,t2f,seg}.nii.gz``,
the 2023 labels, submission files ``<case>.seg.nii.gz``), is registered for this module only; with
no other change to the sources it is generated, detected, checked, trained on, predicted,
submitted and evaluated. A real new layout's test is this file with the entry in ``layouts.py``
and the ``registered`` fixture gone.
"""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from helpers import load_script, untrained_run
from revseg.data.brats import BratsData
from revseg.data.layouts import (
    BRATS2023,
    LAYOUTS,
    Layout,
    discover,
    find_case,
    folder_files,
    folder_parser,
)
from revseg.data.synthetic import make_synthetic_brats
from revseg.inference.evaluation import find_inputs
from revseg.inference.submission import check_submission

SHAPE = (22, 20, 18)
NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}

NEW = Layout(
    name="brats2025",
    pattern="<case>/<case>.{t1n,t1c,t2w,t2f,seg}.nii.gz",
    convention=BRATS2023,
    parse=folder_parser(".", NAMES),
    case_id=r"BraTS25-\d+$",
    example_files=lambda index, num_cases: folder_files(f"BraTS25-{index:05d}", ".", NAMES),
    submission="{case}.seg.nii.gz",
)


@pytest.fixture(scope="module", autouse=True)
def registered():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(LAYOUTS, NEW.name, NEW)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_brats(
        tmp_path_factory.mktemp("new") / "d", 2, SHAPE, seed=2, layout=NEW.name
    )


def _load(path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def test_generated_in_its_names_and_labels_and_discovered(root, tmp_path):
    case = root / "BraTS25-00001"
    assert sorted(p.name for p in case.iterdir()) == sorted(
        f"BraTS25-00001.{part}.nii.gz" for part in NAMES.values()
    )
    found = discover(root)
    assert found.layout is NEW and [c.case for c in found.cases] == [
        "BraTS25-00000",
        "BraTS25-00001",
    ]
    assert not any(c.missing for c in found.cases) and found.left_out == ()
    assert discover(root, NEW.name).layout is NEW
    assert find_case(case / "BraTS25-00001.t2f.nii.gz").layout is NEW
    # the same case as in BraTS 2021's files, its labels in the 2023 convention (4 -> 3)
    old = make_synthetic_brats(tmp_path / "2021", 2, SHAPE, seed=2)
    for key, part in NAMES.items():
        a = _load(case / f"BraTS25-00001.{part}.nii.gz")
        b = _load(old / "BraTS2021_00001" / f"BraTS2021_00001_{key}.nii.gz")
        np.testing.assert_array_equal(a, np.where(b == 4, 3, b) if key == "seg" else b)
    assert 3 in _load(case / "BraTS25-00001.seg.nii.gz")
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    assert labels == {"0": "background", "1": "necrotic core", "2": "oedema", "3": "enhancing"}


def test_data_module_and_check_data(root, tmp_path, capsys):
    data = BratsData(root, crop_size=(16, 16, 16), val_fraction=0.5, cache="none")
    batch = next(iter(data.val_dataloader()))
    assert data.convention == BRATS2023 and batch["label"][:, 2].sum() > 0  # ET from label 3
    check_data = load_script("check_data").main
    assert check_data(["data=brats", f"data.root={root}", f"data.layout={NEW.name}"]) == 0
    assert "layout brats2025, label convention 0/1/2/3" in capsys.readouterr().err
    broken = shutil.copytree(root, tmp_path / "broken")
    missing = broken / "BraTS25-00000" / "BraTS25-00000.t2w.nii.gz"
    missing.unlink()
    assert check_data(["data=brats", f"data.root={broken}", "--quick"]) == 1
    assert capsys.readouterr().out == f"BraTS25-00000: {missing}: missing t2 file\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("run"))


def test_predicted_submitted_and_evaluated(root, run_dir, tmp_path, capsys):
    out = tmp_path / "submission"
    args = [f"run={run_dir}", f"input={root}", f"output={out}", "predict.submission=true"]
    assert load_script("predict").main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "BraTS25-00000.seg.nii.gz",
        "BraTS25-00001.seg.nii.gz",
    ]
    check_submission(out, discover(root))
    for path in out.iterdir():
        assert set(np.unique(_load(path)).tolist()) <= set(BRATS2023.values)
    capsys.readouterr()
    report = tmp_path / "eval"
    args = [f"pred={out}", f"truth={root}", f"output={report}", "evaluate.lesion_wise=false"]
    assert load_script("evaluate").main([*args, "evaluate.plot=false"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert (metrics["layout"], metrics["label_convention"]) == (NEW.name, "brats2023")
    assert metrics["missing"] == [] and sorted(metrics["cases"]) == [
        "BraTS25-00000",
        "BraTS25-00001",
    ]
    # a flat folder of its label maps: the convention told by the case ids
    flat = tmp_path / "flat"
    flat.mkdir()
    for case in discover(root).cases:
        shutil.copy(case.label, flat / f"{case.case}.nii.gz")
    inputs = find_inputs(out, flat)
    assert (inputs.layout, inputs.convention) == ("flat", BRATS2023)
    assert sorted(inputs.pred) == ["BraTS25-00000", "BraTS25-00001"]


def test_generator_command_offers_it(tmp_path, capsys):
    from revseg.cli.synthetic import brats_main

    argv = ["--root", str(tmp_path / "d"), "--num-cases", "1", "--shape", "8", "8", "8"]
    assert brats_main([*argv, "--layout", NEW.name]) == 0
    assert discover(tmp_path / "d").layout is NEW
