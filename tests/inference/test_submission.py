"""Submission folders: official names, and one error line per bad, missing or extra file."""

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import load_script, untrained_run
from revseg.data.layouts import discover
from revseg.data.synthetic import make_synthetic_brats
from revseg.errors import ConfigError
from revseg.inference.submission import SubmissionError, check_submission, submission_name

REPO = Path(__file__).resolve().parents[2]
SHAPE = (22, 20, 18)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("sub")
    return {
        layout: make_synthetic_brats(base / layout, 2, SHAPE, seed=2, layout=layout)
        for layout in ("brats2021", "brats2023", "msd")
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("subrun"))


@pytest.mark.parametrize(
    ("layout", "names"),
    [
        ("brats2021", ["BraTS2021_00000.nii.gz", "BraTS2021_00001.nii.gz"]),
        ("brats2023", ["BraTS-GLI-00000-000.nii.gz", "BraTS-GLI-00001-000.nii.gz"]),
        ("msd", ["BRATS_001.nii.gz", "BRATS_002.nii.gz"]),
    ],
)
def test_submission_has_the_official_names_and_passes(
    roots, run_dir, tmp_path, capsys, layout, names
):
    out = tmp_path / "submission"
    args = [f"run={run_dir}", f"input={roots[layout]}", f"output={out}", "predict.submission=true"]
    assert load_script("predict").main(args) == 0
    assert f"submission {out}: 2 files checked" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == names
    found = discover(roots[layout])
    assert [submission_name(c, found.layout) for c in found.cases] == names
    check_submission(out, found)  # passes


def _save(path, data, like, dtype=np.uint8):
    image = nib.Nifti1Image(data.astype(dtype), like.affine)
    image.set_data_dtype(dtype)
    nib.save(image, path)


def test_every_bad_file_is_one_line(roots, tmp_path):
    root = roots["brats2023"]
    found = discover(root)
    good = tmp_path / "good"
    good.mkdir()
    for case in found.cases:
        shutil.copy(case.label, good / submission_name(case, found.layout))
    check_submission(good, found)  # the truth is a valid submission

    case0, case1 = found.cases
    name0, name1 = (submission_name(case, found.layout) for case in found.cases)
    ref = nib.load(case0.image[0])
    bad = tmp_path / "bad"
    bad.mkdir()
    labels = np.asanyarray(nib.load(case0.label).dataobj).copy()
    labels[0, 0, 0] = 4  # BraTS 2021's ET in a 2023 submission
    _save(bad / name0, labels, ref, np.float32)
    (bad / "notes.txt").write_text("x")
    with pytest.raises(SubmissionError) as error:
        check_submission(bad, found)
    assert error.value.problems == [
        f"{bad / name0}: data type float32 is not an integer type; "
        "labels [4] outside 0/1/2/3 (the layout's convention)",
        f"{bad / name1}: missing (the submission file of case {case1.case})",
        f"{bad / 'notes.txt'}: not a submission file of the input's cases",
    ]
    assert str(error.value).endswith("(and 2 more)")

    shifted = nib.Nifti1Image(labels.astype(np.uint8), ref.affine + np.eye(4) * 0.5)
    nib.save(shifted, bad / name0)
    _save(bad / name1, labels[:-1], ref)
    (bad / "notes.txt").unlink()
    with pytest.raises(SubmissionError) as error:
        check_submission(bad, found)
    assert [p.split(": ", 1)[1] for p in error.value.problems] == [
        "affine differs from the input's; labels [4] outside 0/1/2/3 (the layout's convention)",
        f"shape {(SHAPE[0] - 1, *SHAPE[1:])} != the input's {SHAPE}; labels [4] outside 0/1/2/3 "
        "(the layout's convention)",
    ]


def test_command_line_prints_one_line_per_bad_file(roots, run_dir, tmp_path):
    out = tmp_path / "submission"
    out.mkdir()
    (out / "old.nii.gz").write_bytes(b"x")
    (out / "readme.md").write_text("x")
    done = subprocess.run(
        [sys.executable, "scripts/predict.py", f"run={run_dir}", f"input={roots['brats2021']}",
         f"output={out}", "predict.submission=true"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {out / 'old.nii.gz'}: not a submission file of the input's cases",
        f"error: {out / 'readme.md'}: not a submission file of the input's cases",
    ]


def test_submission_needs_a_folder(roots, run_dir, tmp_path):
    with pytest.raises(
        ConfigError, match=r"^output=.*one.nii.gz: predict.submission=true writes a folder"
    ):
        load_script("predict").main(
            [f"run={run_dir}", f"input={roots['msd']}", f"output={tmp_path / 'one.nii.gz'}",
             "predict.submission=true"]
        )  # fmt: skip


def test_check_submission_command(roots, tmp_path, capsys):
    root = roots["brats2021"]
    found = discover(root)
    folder = tmp_path / "sub"
    folder.mkdir()
    for case in found.cases:
        shutil.copy(case.label, folder / submission_name(case, found.layout))
    main = load_script("check_submission").main
    assert main([f"pred={folder}", f"input={root}"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{folder}: 2 files pass (brats2021, labels 0/1/2/4)"
    )
    # only the validation cases of a run's split
    split = tmp_path / "split.json"
    split.write_text('{"train": ["BraTS2021_00000"], "val": ["BraTS2021_00001"]}')
    (folder / "BraTS2021_00000.nii.gz").unlink()
    assert main([f"pred={folder}", f"input={root}", f"cases.split={split}", "cases.which=val"]) == 0
    assert main([f"pred={folder}", f"input={root}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {folder / 'BraTS2021_00000.nii.gz'}: missing (the submission file of case "
        "BraTS2021_00000)",
        f"1 problem(s) in {folder}",
    ]
    with pytest.raises(ConfigError, match=r"^cases.which=val needs cases.split"):
        main([f"pred={folder}", f"input={root}", "cases.which=val"])
