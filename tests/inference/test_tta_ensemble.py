"""Test-time augmentation by mirroring and ensembles of runs: exact against hand-computed means."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import load_script, untrained_run
from revseg.data.layouts import discover
from revseg.data.synthetic import make_synthetic_brats
from revseg.data.transforms import regions_to_label
from revseg.errors import ConfigError
from revseg.inference.prediction import (
    MIRRORS,
    Ensemble,
    Predictor,
    load_run,
    mirrored,
    run_dirs,
)

from conftest import TINY

REPO = Path(__file__).resolve().parents[2]
SHAPE = (28, 26, 20)
CROP = (32, 32, 16)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_brats(tmp_path_factory.mktemp("tta") / "data", 2, SHAPE, seed=5)


class Pointwise(torch.nn.Module):
    """A 1x1x1 convolution: flip-equivariant, so mirroring cannot change its output."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv3d(4, 3, 1)

    def forward(self, x):
        return self.conv(x) * 4


class Ramp(torch.nn.Module):
    """Not flip-equivariant: the logits grow along every axis."""

    def forward(self, x):
        d, h, w = x.shape[2:]
        ramp = (
            torch.linspace(-3, 2, d)[:, None, None]
            + torch.linspace(-1, 2, h)[None, :, None]
            + torch.linspace(-2, 1, w)[None, None, :]
        )
        return (x[:, :3] + ramp).to(x.dtype)


class Constant(torch.nn.Module):
    """Logits ``values`` (WT, TC, ET) everywhere."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32)

    def forward(self, x):
        return self.values[None, :, None, None, None].expand(x.shape[0], 3, *x.shape[2:]).clone()


def test_mirrors_are_the_8_flips_of_3_axes():
    by_hand = {(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)}
    assert len(MIRRORS) == 8 and set(MIRRORS) == by_hand and MIRRORS[0] == ()


def test_mirrored_is_the_mean_of_the_flipped_back_predictions():
    x = torch.randn(1, 4, 5, 6, 7)
    model = Ramp()

    def f(t):
        return torch.sigmoid(model(t))

    by_hand = sum(f(x.flip(a)).flip(a) if a else f(x) for a in MIRRORS) / 8
    torch.testing.assert_close(mirrored(f, x), by_hand, rtol=0, atol=1e-6)
    assert not torch.allclose(by_hand, f(x), atol=1e-3)  # the ramp is not flip-equivariant
    # the mean over all mirrorings is mirror-symmetric: a flipped input gives the flipped output
    torch.testing.assert_close(mirrored(f, x.flip(2)), by_hand.flip(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sliding_window", [False, True])
def test_tta_of_a_flip_equivariant_model_equals_no_tta(root, sliding_window):
    found = discover(root)
    case = found.cases[0]
    kwargs = {"crop_size": CROP, "sliding_window": sliding_window, "roi_size": (16, 16, 16)}
    plain = Predictor(Pointwise(), **kwargs).probabilities(case)
    tta = Predictor(Pointwise(), tta=True, **kwargs).probabilities(case)
    assert plain.shape == (3, *SHAPE) and plain.dtype == np.float32
    np.testing.assert_allclose(tta, plain, rtol=0, atol=1e-6)
    assert ((plain > 0.5) & (plain < 0.99)).any() and (plain[:, 0, 0, 0] == 0).all()


def test_tta_changes_a_model_that_is_not_flip_equivariant(root):
    case = discover(root).cases[0]
    plain = Predictor(Ramp(), crop_size=CROP).probabilities(case)
    tta = Predictor(Ramp(), crop_size=CROP, tta=True).probabilities(case)
    assert np.abs(tta - plain).max() > 0.1


def test_ensemble_of_the_same_run_twice_equals_the_run(root):
    found = discover(root)
    case = found.cases[1]
    one = Predictor(Pointwise(), crop_size=CROP)
    np.testing.assert_array_equal(Ensemble([one, one]).probabilities(case), one.probabilities(case))
    label, relabelled = Ensemble([one, one]).predict_case(found, case)
    np.testing.assert_array_equal(label, one.label_map(found, case))
    assert relabelled == 0


def test_ensemble_of_two_runs_is_the_mean_of_their_probabilities(root):
    found = discover(root)
    case = found.cases[0]
    # each run with its own preprocessing: a centre crop and a sliding window
    a = Predictor(Constant([3.0, 2.0, 2.0]), crop_size=CROP)
    b = Predictor(
        Constant([-1.0, -3.0, -3.0]),
        crop_size=(16, 16, 16),
        sliding_window=True,
        roi_size=(8, 8, 8),
    )
    pa, pb = a.probabilities(case), b.probabilities(case)
    ensemble = Ensemble([a, b])
    np.testing.assert_allclose(ensemble.probabilities(case), (pa + pb) / 2, rtol=0, atol=1e-7)
    # in the brain: WT (0.953 + 0.269) / 2 = 0.61 inside; TC and ET (0.881 + 0.047) / 2 = 0.46 not
    label, _ = ensemble.predict_case(found, case)
    brain = (pa[0] > 0) & (pb[0] > 0)
    assert brain.any()
    np.testing.assert_array_equal(label, np.where(brain, 2, 0))
    assert set(np.unique(a.label_map(found, case))) == {0, 4}  # a alone: ET


def test_runs_with_the_same_preprocessing_read_a_case_once(root, monkeypatch):
    """The folds of a cross-validation share their preprocessing: the ensemble reads and
    prepares the case once for them, sums on that grid and maps back once, which gives the mean
    of their probabilities on the case's grid to the bit (the map back only crops and pads)."""
    found = discover(root)
    case = found.cases[0]
    a = Predictor(Constant([3.0, 2.0, -2.0]), crop_size=CROP)
    b = Predictor(Ramp(), crop_size=CROP, tta=True)
    c = Predictor(Constant([-1.0, -3.0, -3.0]), crop_size=(16, 16, 16), sliding_window=True,
                  roi_size=(8, 8, 8))  # fmt: skip
    pa, pb, pc = (p.probabilities(case) for p in (a, b, c))
    reads = []
    prepared = Predictor.prepared
    monkeypatch.setattr(
        Predictor, "prepared", lambda self, *args: reads.append(self) or prepared(self, *args)
    )
    mean = Ensemble([a, b, c]).probabilities(case)
    assert reads == [a, c]  # one read for a and b, one for c
    np.testing.assert_array_equal(mean, (pa + pb + pc) / 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A multirun-like folder with two tiny untrained runs (two folds of two cases)."""
    base = tmp_path_factory.mktemp("folds")
    return [
        untrained_run(
            base / "fold_0",
            seed=0,
            split={"train": ["BraTS2021_00000"], "val": ["BraTS2021_00001"]},
        ),
        untrained_run(
            base / "fold_1",
            seed=1,
            split={"train": ["BraTS2021_00001"], "val": ["BraTS2021_00000"]},
        ),
    ]


def _read(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_predict_with_a_list_of_runs_and_a_folder_of_runs(root, runs, tmp_path, capsys):
    main = load_script("predict").main
    a, b = runs
    out = {name: tmp_path / name for name in ("a", "aa", "ab", "folder")}
    assert main([f"run={a}", f"input={root}", f"output={out['a']}"]) == 0
    assert main([f"run=[{a},{a}]", f"input={root}", f"output={out['aa']}"]) == 0
    assert main([f"run=[{a},{b}]", f"input={root}", f"output={out['ab']}"]) == 0
    assert main([f"run={a.parent}", f"input={root}", f"output={out['folder']}"]) == 0
    printed = capsys.readouterr().out
    assert f"ensemble of 2 runs: {a}, {b}" in printed and ", 2 runs)" in printed
    assert run_dirs(a.parent) == [a, b]

    found = discover(root)
    predictors = []
    for run in runs:
        model, cfg = load_run(run)
        predictors.append(Predictor(model, crop_size=list(cfg.data.crop_size)))
    for case in found.cases:
        name = f"{case.case}.nii.gz"
        np.testing.assert_array_equal(_read(out["aa"] / name), _read(out["a"] / name))
        p0, p1 = (p.probabilities(case) for p in predictors)
        assert np.abs(p0 - p1).max() > 1e-3  # two different models
        mean = (p0 + p1) / 2  # by hand
        by_hand = regions_to_label(mean > 0.5, 4, 1, 2)
        np.testing.assert_array_equal(_read(out["ab"] / name), by_hand)
        np.testing.assert_array_equal(_read(out["folder"] / name), by_hand)


def test_folds_predict_their_own_validation_cases(root, runs, tmp_path, capsys):
    main = load_script("predict").main
    a, b = runs
    oof, single = tmp_path / "oof", tmp_path / "single"
    assert main([f"run={a.parent}", f"input={root}", f"output={oof}", "predict.cases=val"]) == 0
    printed = capsys.readouterr().out
    assert "ensemble of 2 runs" in printed and ", 2 runs)" not in printed  # each case by one fold
    assert sorted(p.name for p in oof.iterdir()) == [
        "BraTS2021_00000.nii.gz",
        "BraTS2021_00001.nii.gz",
    ]
    for run, case in ((a, "BraTS2021_00001"), (b, "BraTS2021_00000")):
        assert main([f"run={run}", f"input={root / case}", f"output={single / case}.nii.gz"]) == 0
        np.testing.assert_array_equal(
            _read(oof / f"{case}.nii.gz"), _read(single / f"{case}.nii.gz")
        )


def test_runs_of_different_tasks_are_one_clear_error(root, runs, tmp_path):
    other = untrained_run(tmp_path / "other", "model.out_channels=1", seed=0)
    with pytest.raises(
        ConfigError, match=r"^run: .*other does not match .*fold_0: model.out_channels 1 != 3"
    ):
        load_script("predict").main(
            [f"run=[{runs[0]},{other}]", f"input={root}", f"output={tmp_path / 'o'}"]
        )
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"^predict.checkpoint=.*: one file for 2 runs"):
        load_script("predict").main(
            [
                f"run=[{runs[0]},{runs[1]}]",
                f"input={root}",
                f"output={tmp_path / 'o'}",
                f"predict.checkpoint={runs[0] / 'checkpoints' / 'best.pt'}",
            ]
        )


@pytest.mark.slow
def test_train_two_folds_then_predict_with_their_ensemble(tmp_path):
    """The whole cross-validation: one multirun trains the folds, the folder of runs predicts."""
    import subprocess
    import sys

    sweep, data = tmp_path / "folds", tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "train.py", "-m", *TINY, "data.num_folds=2", "data.fold=0,1",
         "hydra.sweep.subdir=fold_${data.fold}", f"hydra.sweep.dir={sweep}", f"data.root={data}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    vals = [json.loads((sweep / f"fold_{k}" / "split.json").read_text())["val"] for k in (0, 1)]
    assert sorted(vals[0] + vals[1]) == sorted(p.name for p in data.iterdir() if p.is_dir())
    out = tmp_path / "pred"
    main = load_script("predict").main
    assert main([f"run={sweep}", f"input={data}", f"output={out}", "predict.tta=true"]) == 0
    assert len(list(out.iterdir())) == 4


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ("run=[]", r"^run: an empty list"),
        ("predict.tta=maybe", r"^predict.tta must be true or false, got 'maybe'"),
        ("predict.et_min_voxels=-1", r"^predict.et_min_voxels must be an int >= 0, got -1"),
        ("predict.et_min_mode=largest", r"^predict.et_min_mode must be one of total, component"),
        ("predict.submission=1", r"^predict.submission must be true or false, got 1"),
    ],
)
def test_bad_settings_are_one_line(root, runs, tmp_path, arg, match):
    args = [f"run={runs[0]}", f"input={root}", f"output={tmp_path / 'o'}", arg]
    with pytest.raises(ConfigError, match=match):
        load_script("predict").main(args)
    assert not (tmp_path / "o").exists()
