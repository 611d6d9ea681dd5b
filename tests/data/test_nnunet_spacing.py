"""data.spacing on nnU-Net-format datasets: cases resampled to a target spacing (or the training
cases' median), labels there and back unchanged, the full FOV on the resampled shapes, metrics on
that grid, predictions written back on each case's own grid, bad values as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import run_python
from revseg.data.nnunet import Header, median_shape, median_spacing, resampled_shape
from revseg.data.nnunet_data import NnUNetData, build_nnunet_transforms, resample_label
from revseg.data.synthetic_nnunet import TASKS, make_task
from revseg.errors import ConfigError, DataError
from revseg.inference import nnunet as nnunet_inference
from revseg.inference.nnunet import predict_folder, spacing_from_run
from revseg.training.trainer import train

from conftest import compose_train

HALF_SLICES = [0.8, 0.8, 2.5]  # the spleen task's 0.8 x 0.8 x 5 mm with twice the slices


@pytest.fixture(scope="module")
def spleen(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("spacing") / "Dataset909_SynthSpleen", "spleen", 4)


def _header(shape, spacing) -> Header:
    return Header(shape, spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 1)


def test_resampled_shape_rounds_half_up():
    assert resampled_shape((40, 40, 12), (0.8, 0.8, 5.0), HALF_SLICES) == (40, 40, 24)
    assert resampled_shape((10, 10, 10), (1.0, 1.0, 1.0), (4.0, 0.8, 40.0)) == (3, 13, 1)
    assert resampled_shape((5, 5, 5), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == (3, 3, 3)  # 2.5 -> 3


def test_median_spacing_and_shape_of_headers():
    headers = [
        _header((40, 40, 12), (0.8, 0.7, 5.0)),
        _header((44, 40, 10), (0.6, 0.9, 3.0)),
        _header((40, 44, 12), (1.0, 0.8, 4.0)),
    ]
    assert median_spacing(headers) == pytest.approx((0.8, 0.8, 4.0))
    assert median_shape(headers) == (40, 40, 12)
    # at 1 mm: 32x28x60, 26x36x30, 40x35x48
    assert median_shape(headers, (1.0, 1.0, 1.0)) == (32, 35, 48)
    with pytest.raises(DataError, match="median spacing"):
        median_spacing([])


def test_resampled_case_has_twice_the_slices(spleen):
    data = NnUNetData(spleen, spacing=HALF_SLICES, divisor=8, flip_prob=0.0, cache_dir=None)
    case = data.cases()[0]
    original = sitk.ReadImage(case.image[0]).GetSize()
    assert original == (40, 40, 12)
    pipeline = build_nnunet_transforms(data.spec, {"0": _ct()}, None, False, spacing=HALF_SLICES)
    item = pipeline(case.item())
    assert item["image"].shape == (1, 40, 40, 24) and item["label"].shape == (2, 40, 40, 24)
    # the full field of view is taken on the resampled shapes (largest 44 x 44 x 24, by 8)
    assert data.sample_size == (48, 48, 24)
    assert NnUNetData(spleen, divisor=8).sample_size == (48, 48, 16)  # 12 slices, padded to 16
    data.setup()
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (1, 1, 48, 48, 24)
    # validation metrics are on the resampled grid: HD95 in mm with the target spacing
    assert data.build_metrics(hd95=True).spacings == [tuple(HALF_SLICES)] * len(data.val_cases)


def _ct() -> dict:
    return {"mean": 0.0, "std": 100.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}


def test_label_there_and_back_is_unchanged(spleen):
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(spleen / "labelsTr" / "spleen_000.nii.gz")))
    label = torch.as_tensor(label.T.astype(np.int64))[None]  # (1, x, y, z)
    up = resample_label(label, (40, 40, 24))
    assert up.shape == (1, 40, 40, 24) and set(up.unique().tolist()) == {0, 1}
    assert torch.equal(resample_label(up, label.shape[1:]), label)
    labels = torch.randint(0, 4, (1, 6, 5, 7), generator=torch.Generator().manual_seed(0))
    there = resample_label(labels, (12, 5, 21))  # x2, x1, x3
    assert torch.equal(there[:, ::2, :, 1::3], labels)  # the original voxels keep their labels
    assert torch.equal(resample_label(there, (6, 5, 7)), labels)


def _with_z_spacing(root, spacings):
    """Rewrite each training case's files (images and label) with its own z spacing."""
    for index, z in enumerate(spacings):
        case = f"hippocampus_{index:03d}"
        for path in [*(root / "imagesTr").glob(f"{case}_*"), root / "labelsTr" / f"{case}.nii.gz"]:
            image = sitk.ReadImage(str(path))
            image.SetSpacing((1.0, 1.0, z))
            sitk.WriteImage(image, str(path))


def test_median_is_the_training_cases_median(tmp_path):
    root = make_task(tmp_path / "Dataset904_SynthHippocampus", "hippocampus", num_cases=4)
    _with_z_spacing(root, [1.0, 2.0, 3.0, 7.0])
    data = NnUNetData(root, spacing="median", divisor=8)
    assert data.target_spacing == pytest.approx((1.0, 1.0, 2.5))
    # shapes 24x28x20, 28x24x24, 24x24x24, 24x28x20 at z 1, 2, 3, 7 mm -> 8, 19, 29, 56 slices
    assert data.sample_size == (32, 32, 56)
    split = json.loads(data.write_split(tmp_path / "run").read_text())
    assert split["spacing"] == pytest.approx([1.0, 1.0, 2.5])


@pytest.mark.parametrize(
    "value", [[1, 2], [1.0, -1.0, 1.0], [0, 1, 1], "abc", [1, "a", 1], 2.0, [1, 1, float("nan")]]
)
def test_bad_spacing_is_one_line_naming_the_key(spleen, value):
    with pytest.raises(ConfigError) as error:
        NnUNetData(spleen, spacing=value)
    message = str(error.value)
    assert message.startswith("data.spacing must be null, median or 3 positive") and "\n" not in (
        message
    )


def test_cli_bad_spacing_exits_2_before_training(tmp_path):
    run = tmp_path / "run"
    result = run_python(
        "train.py", "experiment=nnunet_spleen", f"data.root={tmp_path / 'none'}",
        "data.spacing=[1,2]", "trainer.progress_bar=false", "~logger", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: data.spacing must be null, median or 3 positive spacings in mm (x, y, z), "
        "got [1, 2]"
    ]
    assert not (run / "checkpoints").exists()
    assert not (tmp_path / "none").exists()  # nothing generated


def test_spacing_from_run_reads_the_saved_config():
    from omegaconf import OmegaConf

    def cfg(value):
        return OmegaConf.create({"data": {"spacing": value}})

    assert spacing_from_run(cfg(None), {"spacing": None}) is None
    assert spacing_from_run(cfg([0.8, 0.8, 2.5]), {}) == (0.8, 0.8, 2.5)
    assert spacing_from_run(cfg("median"), {"spacing": [1, 1, 2.5]}) == (1.0, 1.0, 2.5)
    with pytest.raises(DataError, match="does not record"):
        spacing_from_run(cfg("median"), {"spacing": None})


def test_prediction_after_training_with_spacing_is_on_the_original_grid(tmp_path, monkeypatch):
    root = tmp_path / TASKS["spleen"]["folder"]
    run = tmp_path / "run"
    cfg = compose_train(
        "experiment=nnunet_spleen", f"data.root={root}", "data.num_cases=4",
        f"data.spacing={HALF_SLICES}", f"paths.output_dir={run}", "debug=fast",
        "model.channels=[8,16,24]", "model.norm_groups=2", "trainer.progress_bar=false",
        "trainer.plan_memory=false", "~logger",
    )  # fmt: skip
    summary = train(cfg)
    assert "val/dice_spleen" in summary["final_metrics"]
    split = json.loads((run / "split.json").read_text())
    assert split["spacing"] == HALF_SLICES and split["sample_size"] == [48, 48, 24]

    seen = []
    windows = nnunet_inference.sliding_window_inference

    def spy(inputs, *args, **kwargs):
        seen.append(tuple(inputs.shape[2:]))
        return windows(inputs, *args, **kwargs)

    monkeypatch.setattr(nnunet_inference, "sliding_window_inference", spy)
    # the spacing comes from the run alone (its checkpoint's config and split.json)
    records = predict_folder(run, root / "imagesTs", tmp_path / "pred", device="cpu")
    assert len(records) == 2
    for record in records:
        image = sitk.ReadImage(str(root / "imagesTs" / f"{record['case']}_0000.nii.gz"))
        written = sitk.ReadImage(record["output"])
        x, y, z = image.GetSize()
        assert (x, y, 2 * z) in seen  # the network saw the resampled case
        assert written.GetSize() == image.GetSize()
        assert written.GetSpacing() == pytest.approx(image.GetSpacing())
        assert written.GetOrigin() == pytest.approx(image.GetOrigin())
        assert written.GetDirection() == pytest.approx(image.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1}
