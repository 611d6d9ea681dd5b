"""Every public layout, the file checks with one broken case of each kind, split files, caches
and the in-plane augmentation."""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import load_script
from revseg.data.brats import BratsData, find_cases
from revseg.data.checks import check_cases
from revseg.data.layouts import (
    BRATS,
    BRATS2023,
    MISNAMED_SEG_2020,
    MSD,
    discover,
    example_layouts,
    find_case,
)
from revseg.data.synthetic import case_files, make_synthetic_brats
from revseg.data.transforms import RandInPlaneDeformd, build_transforms
from revseg.errors import ConfigError, DataError
from revseg.inference.evaluation import LABEL_SETS, find_inputs

REPO = Path(__file__).resolve().parents[2]
SHAPE = (20, 20, 16)
CROP = (16, 16, 16)
LAYOUTS = tuple(example_layouts())
EXPECTED = {  # synthetic layout -> (detected layout, label convention)
    "brats2018": ("brats2018", BRATS),
    "brats2019": ("brats2018", BRATS),
    "brats2020": ("brats2020", BRATS),
    "brats2021": ("brats2021", BRATS),
    "brats2023": ("brats2023", BRATS2023),
    "msd": ("msd", MSD),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {
        layout: make_synthetic_brats(base / layout, 4, SHAPE, seed=3, layout=layout)
        for layout in LAYOUTS
    }


def _val_batch(root, **kwargs):
    data = BratsData(root, crop_size=CROP, val_fraction=0.25, cache="none", **kwargs)
    return data, next(iter(data.val_dataloader()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_detected_and_same_tensors_as_2021(roots, layout):
    found = discover(roots[layout])
    name, convention = EXPECTED[layout]
    assert found.layout.name == name and found.layout.convention == convention
    assert len(found.cases) == 4 and not any(c.missing for c in found.cases)
    data, batch = _val_batch(roots[layout])
    _, reference = _val_batch(roots["brats2021"])
    # case i holds the same volumes in every layout: same channel order, same regions
    assert torch.equal(batch["image"], reference["image"])
    assert torch.equal(batch["label"], reference["label"])
    assert batch["label"][0, 2].sum() > 0  # the enhancing label was recognised
    assert data.convention == convention


@pytest.mark.parametrize("layout", ["msd", "brats2023"])
def test_simpleitk_reads_every_layout_like_nibabel(roots, layout):
    _, a = _val_batch(roots[layout], reader="simpleitk")
    _, b = _val_batch(roots[layout], reader="nibabel")
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_msd_channels_follow_dataset_json_names(roots, tmp_path):
    root = shutil.copytree(roots["msd"], tmp_path / "msd")
    manifest = json.loads((root / "dataset.json").read_text())
    assert discover(root).channel_order == (1, 2, 3, 0)  # t1, t1ce, t2, flair in FLAIR,T1w,T1gd,T2w
    manifest["modality"] = {"0": "T1w", "1": "t1gd", "2": "T2w", "3": "FLAIR"}
    (root / "dataset.json").write_text(json.dumps(manifest))
    assert discover(root).channel_order == (0, 1, 2, 3)
    manifest["modality"] = {"0": "DWI", "1": "t1gd", "2": "T2w", "3": "FLAIR"}
    (root / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="dataset.json"):
        discover(root)


def test_misnamed_2020_segmentation_is_used_with_a_warning(roots, caplog):
    with caplog.at_level(logging.WARNING):
        cases = find_cases(roots["brats2020"])
    assert cases[-1]["label"].endswith(MISNAMED_SEG_2020)
    assert MISNAMED_SEG_2020 in caplog.text and "BraTS20_Training_004" in caplog.text


def test_layout_override(roots):
    assert discover(roots["brats2020"], "brats2021").layout.name == "brats2021"
    with pytest.raises(DataError, match="no case of layout brats2023"):
        discover(roots["brats2021"], "brats2023")
    with pytest.raises(ConfigError, match="data.layout"):
        discover(roots["brats2021"], "brats2030")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_entry_agrees_with_itself(roots, layout, tmp_path):
    """A layout's case ids, flat-folder convention and submission names are those of its
    generated files."""
    entry, _ = example_layouts()[layout]
    found = discover(roots[layout])
    flat = tmp_path / "flat"
    flat.mkdir()
    for case in found.cases:
        assert re.match(entry.case_id, case.case), case.case
        assert case.case in entry.submission_name(case.case)
        shutil.copy(case.label, flat / f"{case.case}.nii.gz")
    inputs = find_inputs(flat, flat)  # the convention told by the case ids alone
    assert (inputs.layout, inputs.convention) == ("flat", entry.truth_convention)
    assert LABEL_SETS[entry.convention.name] == entry.truth_convention  # evaluate.labels


def test_find_case_from_folder_modality_file_or_4d_file(roots):
    folder = roots["brats2023"] / "BraTS-GLI-00001-000"
    for target in (folder, folder / "BraTS-GLI-00001-000-t2f.nii.gz"):
        found = find_case(target)
        assert found.layout.name == "brats2023" and found.cases[0].case == folder.name
    found = find_case(roots["msd"] / "imagesTr" / "BRATS_002.nii.gz")
    assert found.layout.name == "msd" and found.channel_order == (1, 2, 3, 0)
    assert found.cases[0].label.endswith("labelsTr/BRATS_002.nii.gz")
    with pytest.raises(DataError, match="not a case folder"):
        find_case(roots["msd"])


# -- one broken case of each kind ------------------------------------------------------------


def _save_like(path: Path, data: np.ndarray, like: Path, affine=None) -> None:
    ref = nib.load(like)
    nib.save(nib.Nifti1Image(data, ref.affine if affine is None else affine), path)


def _break(root: Path, layout: str, index: int, kind: str) -> tuple[str, Path]:
    """Break case ``index`` of a synthetic dataset; return (case id, the file named)."""
    files = {k: root / v for k, v in case_files(layout, index, 4).items()}
    case = files["seg"].parent.name
    t2, seg = files.get("t2"), files["seg"]
    data = np.asanyarray(nib.load(t2).dataobj) if t2 else None
    if kind == "missing":
        t2.unlink()
    elif kind == "shape":
        _save_like(t2, data[:-2], t2)
    elif kind == "affine":
        affine = nib.load(t2).affine.copy()
        affine[0, 3] += 5.0
        _save_like(t2, data, t2, affine)
    elif kind == "truncated":
        raw = t2.read_bytes()
        t2.write_bytes(raw[: len(raw) // 2])
    elif kind == "unreadable":
        t2.write_bytes(b"this is not a NIfTI file" * 20)
    elif kind == "nan":
        bad = data.astype(np.float32)
        bad[5, 5, 5] = np.nan
        _save_like(t2, bad, t2)
    elif kind == "empty":
        _save_like(t2, np.zeros_like(data), t2)
    elif kind == "labels":
        label = np.asanyarray(nib.load(seg).dataobj).copy()
        label[label == 2] = 7
        _save_like(seg, label, seg)
    elif kind == "4d":
        _save_like(t2, np.stack([data, data], axis=-1), t2)
    elif kind == "3d":
        image = files["image"]
        _save_like(image, np.asanyarray(nib.load(image).dataobj)[..., 0], image)
        return image.name.split(".")[0], image
    return case, seg if kind == "labels" else t2


KINDS = {  # kind -> pattern of the message; voxels: found by reading the voxels only
    "missing": "missing t2 file",
    "shape": r"shape \(18, 20, 16\) differs",
    "affine": "affine differs",
    "truncated": "truncated|Compressed file ended",
    "unreadable": "cannot read",
    "nan": "1 NaN/Inf voxels",
    "empty": "empty volume",
    "labels": "label values 7 not in 0/1/2/4",
    "4d": r"4D image \(20, 20, 16, 2\) where a 3D volume is expected",
}
VOXEL_KINDS = {"nan", "empty", "labels"}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A BraTS 2021 dataset of 12 cases: cases 0-8 each broken in one way, 9-11 fine."""
    root = make_synthetic_brats(tmp_path_factory.mktemp("broken") / "d", 12, SHAPE, seed=1)
    (root / "dataset.json").unlink()  # not a generated dataset any more
    named = {kind: _break(root, "brats2021", i, kind) for i, kind in enumerate(KINDS)}
    return root, named


def test_each_problem_is_one_line_naming_case_and_file(broken):
    root, named = broken
    found = discover(root)
    problems = check_cases(found.cases, BRATS, voxels=True)
    assert len(problems) == len(KINDS)  # exactly one per broken case, none for the good ones
    by_case = {p.case: p for p in problems}
    for kind, (case, path) in named.items():
        line = str(by_case[case])
        assert line.startswith(f"{case}: {path}: "), line
        assert re.search(KINDS[kind], line) and "\n" not in line, line
    quick = {p.case for p in check_cases(found.cases, BRATS, voxels=False)}
    assert quick == {named[k][0] for k in KINDS if k not in VOXEL_KINDS}


def test_complex_voxels_are_named_before_training(roots, tmp_path):
    """A modality stored as complex64 trained with only MONAI's ComplexWarning (issue 22,
    item 6): the header check names it."""
    root = shutil.copytree(roots["brats2021"], tmp_path / "complex")
    t2 = root / case_files("brats2021", 1, 4)["t2"]
    data = np.asanyarray(nib.load(t2).dataobj).astype(np.complex64) * (1 + 1j)
    _save_like(t2, data, t2)
    (problem,) = check_cases(discover(root).cases, BRATS, voxels=False)
    assert str(problem) == (
        f"{t2.parent.name}: {t2}: complex voxels (complex64): store real intensities (e.g. the "
        "magnitude)"
    )


def test_msd_3d_image_where_4d_expected(roots, tmp_path):
    root = shutil.copytree(roots["msd"], tmp_path / "msd")
    case, path = _break(root, "msd", 1, "3d")
    (problem,) = check_cases(discover(root).cases, MSD, four_d=True)
    assert str(problem).startswith(f"{case}: {path}: 3D image (20, 20, 16): expected 4D")


def test_training_start_stops_on_bad_cases(broken):
    root, named = broken
    with pytest.raises(DataError) as info:
        BratsData(root, crop_size=CROP).setup()  # quick check, then the cache finds the rest
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"data.root: {len(KINDS) - len(VOXEL_KINDS)} problem(s)")
    assert "data.skip_bad_cases=true" in lines[-1]
    assert len(lines) == len(KINDS) - len(VOXEL_KINDS) + 2
    # the voxel problems surface while the cache is filled
    quick_cases = {named[k][0] for k in KINDS if k not in VOXEL_KINDS}
    data = BratsData(root, crop_size=CROP, skip_bad_cases=True)
    data.setup()
    assert set(data.skipped) == {case for case, _ in named.values()}
    assert quick_cases < set(data.skipped)
    assert sorted(data.train_cases + data.val_cases) == [f"BraTS2021_{i:05d}" for i in (9, 10, 11)]
    assert len(list(data.train_dataloader(seed=0))) == len(data.train_cases)


def test_check_data_script(broken, capsys):
    root, named = broken
    args = [sys.executable, "scripts/check_data.py", "data=brats", f"data.root={root}"]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(KINDS) and "Traceback" not in run.stderr
    for case, path in named.values():
        assert any(line.startswith(f"{case}: {path}: ") for line in lines)
    assert "9 problem(s) in 9 case(s)" in run.stderr
    # in-process: the cases training would skip
    module = load_script("check_data")
    quick = module.main(["data=brats", f"data.root={root}", "data.skip_bad_cases=true", "--quick"])
    assert quick == 0
    assert len(capsys.readouterr().out.splitlines()) == len(KINDS) - len(VOXEL_KINDS)


@pytest.mark.parametrize("layout", ["brats2018", "brats2021", "brats2023"])
def test_a_folder_without_the_layouts_files_is_named_not_ignored(roots, tmp_path, layout, capsys):
    """An empty extra case folder was left out in silence (issue 22, item 6)."""
    root = tmp_path / layout
    shutil.copytree(roots[layout], root)
    home = root / "HGG" if layout == "brats2018" else root
    (home / "BraTS_empty").mkdir()
    (home / "BraTS_notes").mkdir()
    (home / "BraTS_notes" / "readme.txt").write_text("not a case")
    found = discover(root)
    assert found.left_out == (home / "BraTS_empty", home / "BraTS_notes")
    assert len(found.cases) == 4
    module = load_script("check_data")
    assert module.main(["data=brats", f"data.root={root}", "--quick"]) == 0
    assert "2 folder(s) holding no file of the layout left out (BraTS_empty, BraTS_notes)" in (
        capsys.readouterr().err
    )
    assert discover(roots[layout]).left_out == ()


# -- split file, disk cache, augmentation ----------------------------------------------------


def test_split_file_and_written_split(roots, tmp_path):
    root = roots["brats2021"]
    data = BratsData(root, crop_size=CROP, cache="none")
    written = json.loads(data.write_split(tmp_path).read_text())
    assert written["layout"] == "brats2021" and written["val"] == data.val_cases
    split = tmp_path / "mine.json"
    split.write_text(json.dumps({"train": ["BraTS2021_00003"], "val": ["BraTS2021_00000"]}))
    data = BratsData(root, crop_size=CROP, cache="none", split_file=split)
    assert (data.train_cases, data.val_cases) == (["BraTS2021_00003"], ["BraTS2021_00000"])
    # the written split is a valid split file
    again = BratsData(root, crop_size=CROP, cache="none", split_file=tmp_path / "split.json")
    assert again.val_cases == written["val"]
    split.write_text(json.dumps({"train": ["BraTS2021_00003"], "val": ["nope"]}))
    with pytest.raises(DataError, match="data.split_file: .* names case nope"):
        BratsData(root, crop_size=CROP, split_file=split).setup()


def test_disk_cache_is_reused_and_follows_file_changes(roots, tmp_path):
    root = shutil.copytree(roots["brats2023"], tmp_path / "d")
    cache = tmp_path / "cache"

    def run():
        data = BratsData(root, crop_size=CROP, cache="disk", cache_dir=cache, val_fraction=0.25)
        data.setup()
        return next(iter(data.val_dataloader()))

    first = run()
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 4
    for path in files:  # training and validation cases alike
        stored = torch.load(path, weights_only=True)
        assert stored["image"].dtype == torch.float16 and stored["label"].dtype == torch.uint8
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = run()
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read back, not rewritten
    assert torch.allclose(first["image"], second["image"]) and first["image"].dtype == torch.float32
    # a changed file is a new cache entry
    t1 = root / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz"
    t1.write_bytes(t1.read_bytes())
    run()
    assert len(list(cache.glob("*.pt"))) == 5


def test_in_plane_deformation_keeps_z_and_labels_binary():
    rng = np.random.default_rng(0)
    plane = torch.as_tensor(rng.random((1, 24, 20)), dtype=torch.float32)
    image = plane[..., None].repeat(2, 1, 1, 6)  # (2, 24, 20, 6), constant along z
    label = (image[:1] > 0.5).to(torch.uint8).repeat(3, 1, 1, 1)
    deform = RandInPlaneDeformd(
        ["image", "label"], rotate_deg=20, scale_max=1.1, elastic_magnitude=2, elastic_spacing=8,
        mode=["bilinear", "nearest"],
    )  # fmt: skip
    deform.set_random_state(0)
    out = deform({"image": image, "label": label})
    assert out["image"].shape == image.shape and out["label"].shape == label.shape
    assert not torch.allclose(out["image"], image)  # it did deform
    assert torch.equal(out["image"], out["image"][..., :1].expand_as(out["image"]))  # z kept
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
    deform.set_random_state(0)
    assert torch.equal(deform({"image": image, "label": label})["image"], out["image"])


def test_paper_augmentation_switches(roots):
    case = find_cases(roots["brats2021"])[0]
    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    full = build_transforms(
        True, CROP, rotate_deg=20, scale_max=1.1, elastic_magnitude=3, intensity_shift=0.1
    )
    assert {"RandInPlaneDeformd", "RandShiftIntensityd"} <= set(names(full))
    assert names(full).count("RandFlipd") == 3
    full.set_random_state(1)
    out = full(case)
    assert out["image"].shape == (4, *CROP) and out["label"].shape == (3, *CROP)
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
    plain = build_transforms(True, CROP, flip_prob=0.0)
    assert not {"RandInPlaneDeformd", "RandShiftIntensityd", "RandFlipd"} & set(names(plain))


@pytest.mark.parametrize(
    ("key", "value"),
    [("cache", "ram"), ("layout", "brats2030"), ("check", "deep"), ("rotate_deg", -1)],
)
def test_new_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=f"data.{key}"):
        BratsData("unused", crop_size=CROP, **{key: value})
    with pytest.raises(ConfigError, match="data.cache_dir"):
        BratsData("unused", crop_size=CROP, cache="disk")
