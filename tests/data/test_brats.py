"""Tests of revseg.data.brats: case discovery, split, the BratsData module, learnability."""

import json
import os
import shutil

import hydra.utils
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from revseg.data.brats import MODALITIES, BratsData, find_cases, split_cases
from revseg.data.synthetic import make_synthetic_brats
from revseg.data.transforms import build_transforms
from revseg.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_brats(tmp_path_factory.mktemp("b") / "brats", 3, (16, 16, 16), seed=2)


@pytest.fixture
def copy(root, tmp_path):
    return shutil.copytree(root, tmp_path / "copy")


# -- find_cases ------------------------------------------------------------------------------


def test_find_cases(root):
    cases = find_cases(root)
    assert [c["case"] for c in cases] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    for c in cases:
        case_dir = root / c["case"]
        assert c["image"] == [str(case_dir / f"{c['case']}_{m}.nii.gz") for m in MODALITIES]
        assert c["label"] == str(case_dir / f"{c['case']}_seg.nii.gz")
    assert MODALITIES == ("t1", "t1ce", "t2", "flair")


def test_find_cases_sorted_by_id_and_accepts_nii(copy):
    # a case whose id sorts first, created last, with uncompressed files
    new = copy / "BraTS2021_-0001"
    shutil.copytree(copy / "BraTS2021_00001", new)
    for path in new.iterdir():
        name = path.name.replace("BraTS2021_00001", new.name).replace(".nii.gz", ".nii")
        (new / name).write_bytes(__import__("gzip").decompress(path.read_bytes()))
        path.unlink()
    (copy / ".hidden").mkdir()
    (copy / "notes").mkdir()  # a folder without images is not a case
    cases = find_cases(copy)
    assert [c["case"] for c in cases][:2] == ["BraTS2021_-0001", "BraTS2021_00000"]
    assert cases[0]["image"][1].endswith("BraTS2021_-0001_t1ce.nii")


def test_missing_root_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"data.root: directory not found: {missing}"):
        find_cases(missing)


def test_no_cases(tmp_path):
    with pytest.raises(DataError, match=f"no case folders found in {tmp_path}"):
        find_cases(tmp_path)


@pytest.mark.parametrize("missing", ["t1ce", "seg"])
def test_missing_file_names_case_folder_and_file(copy, missing):
    case_dir = copy / "BraTS2021_00001"
    (case_dir / f"BraTS2021_00001_{missing}.nii.gz").unlink()
    with pytest.raises(DataError) as info:
        find_cases(copy)
    message = str(info.value)
    assert str(case_dir) in message and f"BraTS2021_00001_{missing}.nii.gz" in message
    assert "\n" not in message


def test_missing_label_allowed_for_inference(copy):
    (copy / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").unlink()
    cases = find_cases(copy, require_label=False)
    assert cases[0]["label"] is None and cases[1]["label"] is not None


# -- split -----------------------------------------------------------------------------------


def test_split_deterministic_disjoint_and_complete():
    ids = [f"case{i:02d}" for i in range(20)]
    train, val = split_cases(ids, 0.2, seed=0)
    assert (train, val) == split_cases(ids, 0.2, seed=0)
    assert len(val) == 4 and sorted(train + val) == ids and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # input order kept
    assert split_cases(ids, 0.2, seed=1)[1] != val


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_split_keeps_one_case_each_side(fraction):
    train, val = split_cases(["a", "b"], fraction, seed=3)
    assert len(train) == len(val) == 1
    assert split_cases(["a"], fraction) == (["a"], [])


def test_split_rejects_bad_fraction():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        split_cases(["a", "b"], 1.0)


def test_processes_writing_the_split_at_once_do_not_collide(root, tmp_path, monkeypatch):
    # DDP ranks write split.json at the same moment: here a second writer runs from start to end
    # while the first is between writing its temporary file and renaming it
    data = BratsData(root, crop_size=(16, 16, 16), cache="none")
    replace, interleaved = os.replace, []

    def another_writer_first(src, dst):
        if not interleaved:
            interleaved.append(src)
            data.write_split(tmp_path)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", another_writer_first)
    path = data.write_split(tmp_path)
    assert interleaved, "the split was not written through a rename"
    assert json.loads(path.read_text())["train"] == data.train_cases
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # no temporary file left


# -- BratsData -------------------------------------------------------------------------------

CONFIG = """
_target_: revseg.data.brats.BratsData
root: ???
generate: true
num_cases: 4
volume_shape: [24, 24, 24]
crop_size: [24, 24, 24]
patch_size: [16, 8, 16]
val_fraction: 0.25
split_seed: 0
batch_size: 2
num_workers: 0
flip_prob: 0.5
enhancing_label: 4
reader: nibabel
cache: true
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = OmegaConf.create(CONFIG)
    cfg.root = str(tmp_path_factory.mktemp("dm") / "synthetic_brats")
    module = hydra.utils.instantiate(cfg)  # list values arrive as ListConfig
    module.setup()
    return module


def test_data_module_properties(data):
    assert (data.in_channels, data.out_channels) == (4, 3)
    assert data.input_shape == (16, 8, 16)
    assert len(data.train_cases) == 3 and len(data.val_cases) == 1
    assert sorted(data.train_cases + data.val_cases) == [f"BraTS2021_{i:05d}" for i in range(4)]
    data.setup()  # idempotent
    assert (data.root / "dataset.json").is_file()


def test_memory_is_pinned_only_when_asked(data, monkeypatch):
    # a CPU run on a machine with a GPU: the trainer asks for page-locked batches only for CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not data.train_dataloader(seed=0).pin_memory
    assert not data.val_dataloader().pin_memory
    assert data.train_dataloader(seed=0, pin_memory=True).pin_memory
    assert data.val_dataloader(pin_memory=True).pin_memory


def test_train_batch(data):
    batch = next(iter(data.train_dataloader(seed=0)))
    assert set(batch) == {"image", "label", "case"}
    assert batch["image"].shape == (2, 4, 16, 8, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 3, 16, 8, 16) and batch["label"].dtype == torch.float32
    assert type(batch["image"]) is torch.Tensor
    assert len(batch["case"]) == 2 and set(batch["case"]) <= set(data.train_cases)
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}


def test_train_loader_seeded(data):
    def epoch(seed):
        return [(b["case"], b["image"]) for b in data.train_dataloader(seed=seed)]

    first, again, other = epoch(5), epoch(5), epoch(6)
    assert [c for c, _ in first] == [c for c, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(first, other))


def test_val_batch_is_zscored_whole_crop(data):
    batches = list(data.val_dataloader())
    assert [b["case"] for b in batches] == [[c] for c in data.val_cases]
    image, label = batches[0]["image"], batches[0]["label"]
    assert image.shape == (1, 4, 24, 24, 24) and label.shape == (1, 3, 24, 24, 24)
    brain = (image[0] != 0).any(0)
    assert 0.1 < brain.float().mean() < 0.7
    for channel in image[0]:
        inside = channel[brain]
        assert abs(inside.mean().item()) < 1e-3 and abs(inside.std().item() - 1.0) < 1e-2
    wt, tc, et = label[0].bool()
    assert wt.any() and not (tc & ~wt).any() and not (et & ~tc).any()


def test_uncached_simpleitk_module_matches(data):
    other = BratsData(
        data.root, crop_size=(24, 24, 24), val_fraction=0.25, reader="simpleitk", cache=False
    )
    assert other.val_cases == data.val_cases
    for a, b in zip(other.val_dataloader(), data.val_dataloader()):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_generate_refuses_mismatching_dataset(data):
    module = BratsData(data.root, generate=True, num_cases=5, volume_shape=(24, 24, 24))
    with pytest.raises(DataError, match="data.num_cases=5"):
        module.setup()


def test_missing_root_without_generate(tmp_path):
    with pytest.raises(DataError, match=f"directory not found: {tmp_path / 'none'}"):
        BratsData(tmp_path / "none").setup()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("crop_size", [32, 32]),
        ("crop_size", [32, 0, 32]),
        ("crop_size", "32"),
        ("patch_size", [48, 16, 16]),
        ("reader", "itk"),
        ("val_fraction", 1.0),
        ("val_fraction", 0),
        ("flip_prob", 1.5),
        ("enhancing_label", 2),
        ("batch_size", 0),
        ("num_workers", -1),
        ("cache", "yes"),
        ("generate", 1),
        ("volume_shape", [4, 4, 4]),
        ("num_cases", 1),
    ],
)
def test_bad_config_names_key(key, value):
    with pytest.raises(ConfigError, match=f"data.{key}"):
        BratsData("unused", **{"crop_size": (32, 32, 32), key: value})


def test_generation_keys_may_be_null_for_real_data(root):
    module = BratsData(root, num_cases=None, volume_shape=None, crop_size=(16, 16, 16))
    assert len(module.train_cases) == 2 and len(module.val_cases) == 1
    with pytest.raises(ConfigError, match="data.num_cases"):
        BratsData(root, generate=True, num_cases=None)


# -- the task is learnable, not trivial ------------------------------------------------------


def _best_threshold_dice(values: np.ndarray, target: np.ndarray) -> float:
    """Best Dice of ``values > t`` or ``values < t`` over all thresholds t (an oracle)."""
    order = np.argsort(values, kind="stable")
    t = target[order].astype(np.int64)
    total, n = t.sum(), len(t)
    below = np.concatenate([[0], np.cumsum(t)])  # positives among the k lowest, k = 0..n
    k = np.arange(n + 1)
    dice_low = 2 * below / (k + total)  # predict the k lowest
    dice_high = 2 * (total - below) / (n - k + total)  # predict all but the k lowest
    return float(max(dice_low.max(), dice_high.max()))


def _logistic_regression(x: np.ndarray, y: np.ndarray, steps: int = 25) -> np.ndarray:
    """Weights of a logistic regression fitted by Newton's method (IRLS), bias last."""
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        hessian = (x * (p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(x.shape[1])
        w -= np.linalg.solve(hessian, x.T @ (p - y))
    return w


def test_synthetic_task_is_learnable_but_not_trivial(tmp_path):
    root = make_synthetic_brats(tmp_path / "learn", 6, (32, 32, 32), seed=0)
    transform = build_transforms(False, (32, 32, 32))
    samples = [transform(case) for case in find_cases(root)]
    images = np.stack([s["image"].numpy() for s in samples])  # (N, 4, D, H, W)
    labels = np.stack([s["label"].numpy() for s in samples]).astype(bool)  # (N, 3, D, H, W)
    brain = (images != 0).any(1)
    x = np.moveaxis(images, 1, -1)[brain]  # (voxels, 4)
    y = np.moveaxis(labels, 1, -1)[brain]  # (voxels, 3): WT, TC, ET

    # no single modality thresholded gives all three regions
    for channel in range(4):
        best = [_best_threshold_dice(x[:, channel], y[:, r]) for r in range(3)]
        assert min(best) < 0.8, (channel, best)
    assert max(_best_threshold_dice(x[:, c], y[:, 1]) for c in range(4)) < 0.8  # TC needs more

    # a per-voxel linear model on the four channels finds the whole tumour on a held-out case
    train = np.zeros(len(x), dtype=bool)
    train[: brain[:5].sum()] = True
    w = _logistic_regression(x[train], y[train, 0])
    predicted = np.concatenate([x[~train], np.ones(((~train).sum(), 1))], axis=1) @ w > 0
    truth = y[~train, 0]
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert dice > 0.5
