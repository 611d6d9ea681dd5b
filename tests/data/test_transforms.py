"""Tests of revseg.data.transforms: readers, label <-> regions, the MONAI pipeline."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import NibabelReader
from monai.transforms import RandFlipd, RandSpatialCropd

from revseg.data.brats import find_cases
from revseg.data.synthetic import make_synthetic_brats
from revseg.data.transforms import (
    LabelToRegionsd,
    SimpleITKReader,
    build_transforms,
    label_to_regions,
    regions_to_label,
)
from revseg.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = make_synthetic_brats(tmp_path_factory.mktemp("tr") / "brats", 2, (28, 24, 20), seed=1)
    return find_cases(root)


# -- readers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_simpleitk_reader_matches_nibabel_on_oblique_anisotropic_file(tmp_path, dtype):
    data = np.arange(5 * 6 * 7, dtype=dtype).reshape(5, 6, 7)  # non-cubic: catches transposes
    c, s = np.cos(0.2), np.sin(0.2)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([-1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.2, 2.5])  # oblique, flipped, anisotropic
    affine[:3, 3] = [10.0, -20.0, 30.0]
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = tmp_path / "x.nii.gz"
    nib.save(img, path)

    results = []
    for reader in (NibabelReader(), SimpleITKReader()):
        results.append(reader.get_data(reader.read(path)))
    (a, meta_a), (b, meta_b) = results
    assert b.shape == (5, 6, 7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(meta_b["affine"], meta_a["affine"], atol=1e-4)
    np.testing.assert_array_equal(meta_b["spatial_shape"], meta_a["spatial_shape"])


def test_simpleitk_reader_stacks_files_as_channels(cases):
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(cases[0]["image"]))
    assert array.shape == (4, 28, 24, 20)
    assert meta["original_channel_dim"] == 0
    assert reader.verify_suffix(cases[0]["image"]) and not reader.verify_suffix("x.png")


def test_readers_give_identical_pipelines(cases):
    outputs = [
        build_transforms(False, (24, 24, 24), reader=r)(cases[0]) for r in ("nibabel", "simpleitk")
    ]
    for key in ("image", "label"):
        assert torch.equal(outputs[0][key], outputs[1][key])


def test_unknown_reader():
    with pytest.raises(ConfigError, match="data.reader"):
        build_transforms(False, (16, 16, 16), reader="itk")


# -- label <-> regions -----------------------------------------------------------------------


def _hand_label(enhancing):
    return np.array([0, 1, 2, enhancing, 2, 0, enhancing, 1], dtype=np.float32).reshape(1, 2, 2, 2)


@pytest.mark.parametrize("enhancing", [4, 3])
def test_label_to_regions_both_conventions(enhancing):
    out = LabelToRegionsd("label", enhancing_label=enhancing)({"label": _hand_label(enhancing)})
    regions = out["label"].reshape(3, -1)
    assert out["label"].shape == (3, 2, 2, 2) and out["label"].dtype == np.uint8
    #                     labels: 0  1  2  E  2  0  E  1
    np.testing.assert_array_equal(regions[0], [0, 1, 1, 1, 1, 0, 1, 1])  # WT
    np.testing.assert_array_equal(regions[1], [0, 1, 0, 1, 0, 0, 1, 1])  # TC
    np.testing.assert_array_equal(regions[2], [0, 0, 0, 1, 0, 0, 1, 0])  # ET


def test_label_to_regions_torch_and_3d_input():
    regions = label_to_regions(torch.as_tensor(_hand_label(4)[0]), 4)
    assert isinstance(regions, torch.Tensor) and regions.shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(regions.numpy(), label_to_regions(_hand_label(4), 4))


def test_label_with_other_convention_is_an_error():
    with pytest.raises(DataError, match=r"label values 3 not in 0/1/2/4"):
        label_to_regions(_hand_label(3), enhancing_label=4)


@pytest.mark.parametrize("enhancing", [4, 3])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_regions_to_label_round_trip(enhancing, backend):
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 1, 2, enhancing], dtype=np.uint8), size=(1, 6, 5, 4))
    assert len(np.unique(label)) == 4
    if backend == "torch":
        label = torch.as_tensor(label)
    back = regions_to_label(label_to_regions(label, enhancing) == 1, enhancing)
    assert type(back) is type(label) and back.dtype in (np.uint8, torch.uint8)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(label[0]))


def test_regions_to_label_inner_region_wins():
    regions = np.zeros((3, 1, 1, 3), dtype=bool)
    regions[2, 0, 0, 0] = True  # ET alone
    regions[1, 0, 0, 1] = True  # TC alone
    regions[0, 0, 0, 2] = True  # WT alone
    np.testing.assert_array_equal(regions_to_label(regions, 4).ravel(), [4, 1, 2])
    with pytest.raises(ValueError, match=r"\(3, D, H, W\)"):
        regions_to_label(regions[:2], 4)


# -- pipeline --------------------------------------------------------------------------------


def test_val_pipeline_shapes_and_normalisation(cases):
    out = build_transforms(False, (32, 32, 32))(cases[0])  # larger than the brain: only pads
    image, label = out["image"], out["label"]
    assert type(image) is torch.Tensor and type(label) is torch.Tensor  # no MetaTensor
    assert image.shape == (4, 32, 32, 32) and label.shape == (3, 32, 32, 32)
    assert image.dtype == label.dtype == torch.float32
    assert set(label.unique().tolist()) <= {0.0, 1.0} and label[0].sum() > 0
    for channel in image:
        inside = channel[channel != 0]
        assert abs(inside.mean().item()) < 1e-3 and abs(inside.std().item() - 1) < 1e-2
    # the brain's bounding box is centred: background padding on every side
    brain = (image != 0).any(0)
    for axis in range(3):
        profile = brain.any(dim=tuple(a for a in range(3) if a != axis))
        assert not profile[0] and not profile[-1]


def test_train_pipeline_patch_and_flips(cases):
    transform = build_transforms(True, (24, 24, 16), (16, 8, 16), flip_prob=0.5)
    kinds = [type(t) for t in transform.transforms]
    assert kinds.count(RandSpatialCropd) == 1 and kinds.count(RandFlipd) == 3
    transform.set_random_state(0)
    out = transform(cases[1])
    assert out["image"].shape == (4, 16, 8, 16) and out["label"].shape == (3, 16, 8, 16)

    plain = build_transforms(True, (24, 24, 16), None, flip_prob=0.0)
    assert not {RandSpatialCropd, RandFlipd} & {type(t) for t in plain.transforms}
    val = build_transforms(False, (24, 24, 16))(cases[1])
    assert torch.equal(plain(cases[1])["image"], val["image"])


def test_flips_move_image_and_label_together(cases):
    transform = build_transforms(True, (24, 24, 16), None, flip_prob=1.0)
    flipped = transform(cases[0])
    val = build_transforms(False, (24, 24, 16))(cases[0])
    for key in ("image", "label"):
        assert torch.equal(flipped[key], val[key].flip(1, 2, 3))


def test_inference_pipeline_without_label(cases):
    case = {"case": cases[0]["case"], "image": cases[0]["image"]}
    out = build_transforms(False, (24, 24, 24), with_label=False, track_meta=True)(case)
    assert out["image"].shape == (4, 24, 24, 24) and "label" not in out
    assert len(out["image"].applied_operations) > 0  # invertible with monai Invertd


# -- bad files: one line naming the file, from either reader --------------------------------


def _truncate(path, out):
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("reader", ["nibabel", "simpleitk"])
@pytest.mark.parametrize("kind", ["nii.gz", "nii", "garbage"])
def test_unreadable_file_is_one_line_data_error(cases, tmp_path, reader, kind):
    source = Path(cases[0]["image"][2])
    if kind == "nii.gz":
        bad = _truncate(source, tmp_path / "bad_t2.nii.gz")
    elif kind == "nii":
        full = tmp_path / "full.nii"
        nib.save(nib.load(source), full)
        bad = _truncate(full, tmp_path / "bad_t2.nii")
    else:
        bad = tmp_path / "bad_t2.nii.gz"
        bad.write_bytes(b"not an image" * 50)
    case = dict(cases[0], image=[*cases[0]["image"][:2], str(bad), cases[0]["image"][3]])
    with pytest.raises(DataError) as info:
        build_transforms(False, (24, 24, 24), reader=reader)(case)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)


def test_wrong_label_convention_in_pipeline_names_file(cases, tmp_path):
    seg = nib.load(cases[0]["label"])
    label = np.asanyarray(seg.dataobj).copy()
    label[label == 4] = 3  # a BraTS 2023 label map
    path = tmp_path / "seg2023.nii.gz"
    nib.save(nib.Nifti1Image(label, seg.affine, seg.header), path)
    case = dict(cases[0], label=str(path))
    with pytest.raises(DataError, match=f"^{path}: label values 3 not in 0/1/2/4"):
        build_transforms(False, (24, 24, 24), enhancing_label=4)(case)
    out = build_transforms(False, (24, 24, 24), enhancing_label=3)(case)
    assert out["label"][2].sum() > 0
