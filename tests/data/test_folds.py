"""k-fold cross-validation splits: disjoint folds covering every case, seeded, written to
split.json; the default (no fold) split unchanged."""

import json

import pytest

from revseg.data.brats import BratsData, fold_cases, split_cases
from revseg.errors import ConfigError, DataError

CASES = [f"case{i:02d}" for i in range(11)]


@pytest.mark.parametrize("num_folds", [2, 5, 11])
def test_folds_are_disjoint_cover_every_case_and_keep_the_order(num_folds):
    vals = []
    for fold in range(num_folds):
        train, val = fold_cases(CASES, fold, num_folds, seed=3)
        assert sorted(train + val) == CASES and not set(train) & set(val)
        assert train == sorted(train) and val == sorted(val)
        vals.append(val)
    assert sorted(c for val in vals for c in val) == CASES  # each case in exactly one fold
    sizes = [len(val) for val in vals]
    assert max(sizes) - min(sizes) <= 1


def test_folds_are_reproducible_with_the_seed():
    assert fold_cases(CASES, 1, 5, seed=7) == fold_cases(CASES, 1, 5, seed=7)
    seeds = {tuple(fold_cases(CASES, 0, 5, seed=s)[1]) for s in range(5)}
    assert len(seeds) > 1  # the seed permutes the cases


@pytest.mark.parametrize(
    ("fold", "num_folds", "match"),
    [(5, 5, r"^data.fold must be in 0..4"), (-1, 5, "data.fold"), (0, 1, "data.num_folds")],
)
def test_fold_out_of_range_names_the_key(fold, num_folds, match):
    with pytest.raises(ConfigError, match=match):
        fold_cases(CASES, fold, num_folds)


def test_more_folds_than_cases_is_a_data_error():
    with pytest.raises(DataError, match=r"^data.num_folds=12: only 11 cases"):
        fold_cases(CASES, 0, 12)


def test_data_module_fold_split_and_split_file(tiny_data_root, tmp_path):
    vals = []
    for fold in range(2):
        data = BratsData(
            tiny_data_root, crop_size=(16, 16, 16), cache="none", fold=fold, num_folds=2
        )
        assert sorted(data.train_cases + data.val_cases) == sorted(
            c.name for c in tiny_data_root.iterdir() if c.is_dir()
        )
        written = json.loads(data.write_split(tmp_path / str(fold)).read_text())
        assert (written["fold"], written["num_folds"], written["val_fraction"]) == (fold, 2, None)
        assert written["val"] == data.val_cases
        vals += data.val_cases
    assert len(vals) == len(set(vals)) == 4


def test_no_fold_keeps_the_val_fraction_split(tiny_data_root, tmp_path):
    data = BratsData(tiny_data_root, crop_size=(16, 16, 16), cache="none")
    ids = sorted(c.name for c in tiny_data_root.iterdir() if c.is_dir())
    assert (data.train_cases, data.val_cases) == split_cases(ids, 0.2, 0)
    written = json.loads(data.write_split(tmp_path).read_text())
    assert (written["fold"], written["num_folds"], written["val_fraction"]) == (None, None, 0.2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fold": 2, "num_folds": 2}, r"^data.fold must be in 0..1"),
        ({"fold": 0, "num_folds": 1}, r"^data.num_folds must be an int >= 2"),
        ({"fold": 0, "split_file": "split.json"}, r"^data.fold and data.split_file both set"),
    ],
)
def test_data_module_rejects_bad_fold_settings(tiny_data_root, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BratsData(tiny_data_root, crop_size=(16, 16, 16), cache="none", **kwargs)


def test_make_train_folds_runs_one_multirun_over_every_fold(tmp_path):
    """The Makefile target's command line (with a stand-in python that prints its arguments)."""
    import os
    import shutil
    import subprocess

    from conftest import REPO

    if shutil.which("make") is None:
        pytest.skip("no make")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: no set-up
    os.utime(venv / ".installed", (2**31, 2**31))
    done = subprocess.run(
        ["make", "-s", "train-folds", f"VENV={venv}", "FOLDS=3", "ARGS=data=brats data.root=/d"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "train.py",
        "-m",
        "data.num_folds=3",
        "data.fold=0,1,2",
        "hydra.sweep.subdir=fold_${data.fold}",
        "data=brats",
        "data.root=/d",
    ]


@pytest.mark.parametrize("data", ["synthetic_brats", "brats"])
def test_fold_keys_compose_and_reach_the_data_module(data, tiny_data_root):
    from revseg.config import build

    from conftest import compose_train

    common = (f"data={data}", f"data.root={tiny_data_root}", "data.cache=none",
              "data.num_cases=4", "data.volume_shape=[24,24,24]")  # fmt: skip
    cfg = compose_train(*common, "data.fold=1", "data.num_folds=4")
    module = build(cfg.data, "data")
    assert (module.fold, module.num_folds) == (1, 4) and len(module.val_cases) == 1
    assert build(compose_train(*common).data, "data").fold is None
