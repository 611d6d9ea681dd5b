"""Tests of the generated BraTS-like dataset (revseg.data.synthetic, scripts/make_synthetic.py)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from helpers import run_python
from revseg.data import synthetic
from revseg.data.synthetic import make_synthetic_brats, read_manifest, synthesize_case
from revseg.errors import DataError

SHAPE = (24, 28, 20)
FILES = ("flair", "t1", "t1ce", "t2", "seg")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_brats(tmp_path_factory.mktemp("gen") / "brats", 3, SHAPE, seed=0)


def _load(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_layout_dtypes_and_affine(dataset):
    cases = sorted(p.name for p in dataset.iterdir() if p.is_dir())
    assert cases == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    for case in cases:
        names = sorted(p.name for p in (dataset / case).iterdir())
        assert names == sorted(f"{case}_{suffix}.nii.gz" for suffix in FILES)
        for suffix in FILES:
            img = nib.load(dataset / case / f"{case}_{suffix}.nii.gz")
            assert img.shape == SHAPE
            assert img.get_data_dtype() == (np.uint8 if suffix == "seg" else np.int16)
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["generator"] == synthetic.GENERATOR
    assert (manifest["seed"], manifest["num_cases"], manifest["shape"]) == (0, 3, list(SHAPE))
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_files_match_synthesize_case(dataset):
    image, label = synthesize_case(0, 1, SHAPE)
    case = dataset / "BraTS2021_00001" / "BraTS2021_00001"
    for channel, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        np.testing.assert_array_equal(_load(f"{case}_{modality}.nii.gz"), image[channel])
    np.testing.assert_array_equal(_load(f"{case}_seg.nii.gz"), label)


def test_deterministic_given_seed():
    for index in range(2):
        a_img, a_lab = synthesize_case(7, index, SHAPE)
        b_img, b_lab = synthesize_case(7, index, SHAPE)
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_lab, b_lab)
    c_img, _ = synthesize_case(8, 0, SHAPE)
    assert not np.array_equal(c_img, synthesize_case(7, 0, SHAPE)[0])


def test_same_seed_gives_identical_files(tmp_path, dataset):
    other = make_synthetic_brats(tmp_path / "again", 3, SHAPE, seed=0)
    for case in ("BraTS2021_00000", "BraTS2021_00002"):
        for suffix in FILES:
            name = f"{case}/{case}_{suffix}.nii.gz"
            np.testing.assert_array_equal(_load(other / name), _load(dataset / name))


def test_labels_brain_and_nested_regions():
    has_necrosis, has_enhancing, cases = [], [], 16
    for index in range(cases):
        image, label = synthesize_case(0, index, (32, 32, 32))
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 4}
        brain = image[0] > 0
        # all four modalities present, non-zero exactly on the same brain, zero background
        assert all(np.array_equal(image[c] > 0, brain) for c in range(4))
        assert 0.1 < brain.mean() < 0.6 and not brain[0].any() and not brain[:, :, -1].any()
        wt, tc, et = label != 0, np.isin(label, (1, 4)), label == 4
        assert wt.sum() > 100 and not (wt & ~brain).any()
        assert not (tc & ~wt).any() and not (et & ~tc).any()
        # nesting in space: the core is wrapped in oedema, necrosis in the enhancing rim
        assert not (ndimage.binary_dilation(tc) & (label == 0)).any()
        if et.any():
            assert not (ndimage.binary_dilation(label == 1) & np.isin(label, (0, 2))).any()
        has_necrosis.append(bool((label == 1).any()))
        has_enhancing.append(bool(et.any()))
    # regions can be empty, as in the real data, and most cases have both
    assert not all(has_necrosis) and not all(has_enhancing)
    assert sum(n and e for n, e in zip(has_necrosis, has_enhancing)) >= cases // 2


@pytest.mark.parametrize("index", range(4))
def test_modality_signatures(index):
    image, label = synthesize_case(0, index, (32, 32, 32))
    healthy = (image[0] > 0) & (label == 0)

    def contrast(channel, region):  # mean in the region / median of the healthy brain
        return image[channel][region].mean() / np.median(image[channel][healthy])

    t1, t1ce, t2, flair = range(4)
    assert contrast(flair, label == 2) > 1.3  # FLAIR bright in oedema
    if (label == 4).any():
        assert contrast(t1ce, label == 4) > 1.3  # T1ce bright on the enhancing rim
    assert contrast(t2, label == 2) > 1.1  # T2 bright in oedema and necrosis
    if (label == 1).any():
        assert contrast(t2, label == 1) > 1.1
    assert contrast(t1, label != 0) < 0.95  # T1 darker in the tumour


def test_idempotent(dataset):
    marker = dataset / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz"
    before = marker.stat().st_mtime_ns
    assert make_synthetic_brats(dataset, 3, SHAPE, seed=0) == dataset
    assert marker.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "kwargs",
    [{"num_cases": 2}, {"shape": (24, 28, 24)}, {"seed": 1}],
    ids=["cases", "shape", "seed"],
)
def test_mismatch_raises_naming_folder(dataset, kwargs):
    args = {"num_cases": 3, "shape": SHAPE, "seed": 0, **kwargs}
    with pytest.raises(DataError, match=str(dataset)):
        make_synthetic_brats(dataset, **args)


def test_overwrite_replaces_generated_dataset(tmp_path):
    root = make_synthetic_brats(tmp_path / "d", 2, (16, 16, 16))
    make_synthetic_brats(root, 3, (16, 16, 16), overwrite=True)
    assert read_manifest(root)["num_cases"] == 3
    assert (root / "BraTS2021_00002").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_never_overwrites_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a dataset written by revseg"):
        make_synthetic_brats(root, 2, (16, 16, 16), overwrite=True)
    assert (root / "notes.txt").read_text() == "keep me"


def test_empty_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    root = make_synthetic_brats(tmp_path / "empty", 2, (16, 16, 16))
    assert read_manifest(root)["num_cases"] == 2


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(seed, index, shape):
        calls.append(index)
        if index == 1:
            raise KeyboardInterrupt
        return synthesize_case(seed, index, shape)

    monkeypatch.setattr(synthetic, "synthesize_case", failing)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_brats(tmp_path / "d", 3, (16, 16, 16))
    assert calls == [0, 1]
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        make_synthetic_brats(tmp_path / "d", 2, (16, 16))
    with pytest.raises(ValueError, match="num_cases"):
        make_synthetic_brats(tmp_path / "d", 0, (16, 16, 16))
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="not a directory"):
        make_synthetic_brats(tmp_path / "file", 2, (16, 16, 16))


def _cli(*args):
    return run_python("scripts/make_synthetic.py", *args, cwd=Path.cwd())


def test_cli(tmp_path):
    root = tmp_path / "cli"
    args = ["--root", str(root), "--num-cases", "2", "--shape", "16", "16", "16", "--seed", "3"]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert str(root) in done.stdout and "wrote 2 cases" in done.stdout
    assert read_manifest(root)["seed"] == 3
    done = _cli(*args[:3], "3", *args[4:])
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and str(root) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
