"""nnU-Net-format datasets: dataset.json (v2 and the Decathlon's v1), the generated tasks in their
real layouts, normalisation by channel type, label channels, and bad input as one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from revseg.data.nnunet import (
    LabelsToChannelsd,
    NormalizeChannelsd,
    check_headers,
    find_cases,
    read_spec,
)
from revseg.data.nnunet_data import NnUNetData
from revseg.data.synthetic_nnunet import TASKS, make_task
from revseg.errors import DataError
from revseg.metrics.labels import LabelMetrics


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("nnunet")
    return {task: make_task(base / TASKS[task]["folder"], task, num_cases=4) for task in TASKS}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generated_task_reads_back(tasks, task):
    spec = read_spec(tasks[task])
    cases = find_cases(spec)
    headers = check_headers(cases, spec)
    assert len(cases) == spec.num_training == 4
    assert spec.version == (1 if task == "prostate_v1" else 2)
    assert spec.file_ending == TASKS[task]["file_ending"]
    assert all(f.endswith(spec.file_ending) for c in cases for f in (*c.image, c.label))
    first = headers[cases[0].case]
    assert first.spacing == pytest.approx(TASKS[task]["spacing"], abs=1e-6)
    if spec.version == 1:  # one 4D file per case, a volume per modality
        assert all(len(c.image) == 1 for c in cases) and first.components == 2
        assert spec.channel_names == ("T2", "ADC") and spec.label_names[1:] == ("PZ", "TZ")
    else:
        assert all(len(c.image) == spec.in_channels for c in cases)


def test_spec_label_based_and_region_based(tasks):
    hippo = read_spec(tasks["hippocampus"])
    assert not hippo.region_based and hippo.out_channels == 3
    assert hippo.foreground_names == ("Anterior", "Posterior")
    regions = read_spec(tasks["brats_regions"])
    assert regions.region_based and regions.out_channels == 3
    assert regions.label_values == ((1, 2, 3), (2, 3), (3,))
    assert regions.regions_class_order == (1, 2, 3) and regions.values == (0, 1, 2, 3)


def test_spleen_is_anisotropic_ct_with_negative_hu(tasks):
    spec = read_spec(tasks["spleen"])
    assert spec.ct_channels == (0,)
    image = sitk.ReadImage(find_cases(spec)[0].image[0])
    assert image.GetSpacing() == pytest.approx((0.8, 0.8, 5.0), abs=1e-6)
    assert sitk.GetArrayFromImage(image).min() < -900


def test_ct_statistics_cached_and_applied(tasks, tmp_path):
    data = NnUNetData(tasks["spleen"], crop_size=[32, 32, 16], cache_dir=tmp_path)
    stats = data.ct_stats["0"]
    assert stats["percentile_00_5"] < stats["mean"] < stats["percentile_99_5"]
    cached = list(tmp_path.glob("nnunet_ct_*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["0"] == stats
    # a second module reads the cached file (a changed value there is what it uses)
    changed = {"0": {**stats, "mean": stats["mean"] + 1.0}}
    cached[0].write_text(json.dumps(changed))
    again = NnUNetData(tasks["spleen"], crop_size=[32, 32, 16], cache_dir=tmp_path)
    assert again.ct_stats == changed


def test_normalisation_by_channel_type():
    ct = {"0": {"mean": 50.0, "std": 10.0, "percentile_00_5": 0.0, "percentile_99_5": 100.0}}
    image = torch.tensor([[-1000.0, 50.0, 70.0, 500.0], [0.0, 2.0, 4.0, 6.0]])[:, :, None, None]
    out = NormalizeChannelsd("image", ct)({"image": image})["image"][..., 0, 0]
    assert out[0].tolist() == pytest.approx([-5.0, 0.0, 2.0, 5.0])  # clipped, dataset z-score
    nonzero = torch.tensor([2.0, 4.0, 6.0])
    expected = (nonzero - nonzero.mean()) / nonzero.std()
    assert out[1, 0] == 0.0 and out[1, 1:].tolist() == pytest.approx(expected.tolist())


def test_labels_to_channels(tasks):
    label = torch.tensor([0, 1, 2, 3])[None, :, None, None]
    hippo = read_spec(tasks["hippocampus"])
    with pytest.raises(DataError, match="label values 3 not in dataset.json"):
        LabelsToChannelsd("label", hippo)({"label": label})
    onehot = LabelsToChannelsd("label", hippo)({"label": label.clamp(max=2)})["label"]
    assert onehot[..., 0, 0].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    regions = LabelsToChannelsd("label", read_spec(tasks["brats_regions"]))({"label": label})
    assert regions["label"][..., 0, 0].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]


def test_data_module_batches_and_metrics(tasks):
    data = NnUNetData(tasks["prostate_v1"], divisor=8, flip_prob=0.0)
    data.setup()
    assert (data.in_channels, data.out_channels) == (2, 3)
    assert data.input_shape == (32, 32, 16)  # the largest case, multiples of 8
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (1, 2, 32, 32, 16) and batch["label"].shape[1] == 3
    assert torch.all(batch["label"].sum(1) == 1)  # one-hot, background first
    metrics = data.build_metrics(hd95=True)
    pred = metrics.update(batch["label"] * 10.0, batch["label"])  # a perfect prediction
    assert torch.equal(pred, batch["label"])
    values = metrics.compute()
    assert values["dice_PZ"] == values["dice_TZ"] == values["iou_mean"] == 1.0
    assert values["hd95_PZ"] == 0.0
    figure = data.preview(batch["image"][0], batch["label"][0], pred[0])  # labelled, enlarged
    assert figure.shape[0] == 3 and figure.shape[1] > 6 * 32 and figure.shape[2] > 3 * 6 * 32


def test_label_metrics_region_names():
    metrics = LabelMetrics(["whole tumor", "enhancing"], region_based=True, hd95=False)
    target = torch.zeros(1, 2, 8, 8, 8)
    target[:, 0, 2:6, 2:6, 2:6] = 1
    target[:, 1, 3:5, 3:5, 3:5] = 1
    logits = torch.where(target > 0, 5.0, -5.0)
    logits[:, 1] = -5.0  # enhancing missed
    metrics.update(logits, target)
    values = metrics.compute()
    assert values["dice_whole_tumor"] == 1.0 and values["dice_enhancing"] == 0.0
    assert values["dice_mean"] == 0.5 and "hd95_mean" not in values


def _broken(tasks, tmp_path, task="hippocampus"):
    root = tmp_path / "Dataset999_Broken"
    shutil.copytree(tasks[task], root)
    return root


def _edit_json(root, **changes):
    path = root / "dataset.json"
    content = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key)
        else:
            content[key] = value
    path.write_text(json.dumps(content))


def _shifted(path, **geometry):
    image = sitk.ReadImage(str(path))
    if "spacing" in geometry:
        image.SetSpacing(geometry["spacing"])
    sitk.WriteImage(image, str(path))


def _complex(path):
    """The channel as complex64, as a reconstruction may store it (issue 22, item 6)."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(np.complex64) * (1 + 1j)
    written = sitk.GetImageFromArray(array)
    written.CopyInformation(image)
    sitk.WriteImage(written, str(path))


BAD = {
    "missing key": (lambda r: _edit_json(r, file_ending=None), "missing key 'file_ending'"),
    "labels not contiguous": (
        lambda r: _edit_json(r, labels={"background": 0, "a": 1, "b": 3}),
        "labels must be consecutive integers from 0",
    ),
    "case missing a channel": (
        lambda r: _edit_json(r, channel_names={"0": "MRI", "1": "T2"}),
        "hippocampus_000_0001.nii.gz: missing (channel 1, 'T2', of case hippocampus_000)",
    ),
    "numTraining": (
        lambda r: _edit_json(r, numTraining=9),
        "numTraining is 9 but 4 training cases were found",
    ),
    "file ending": (
        lambda r: _edit_json(r, file_ending=".nrrd"),
        "imagesTr: no file ends with file_ending '.nrrd' (found .nii.gz)",
    ),
    "spacing of a label": (
        lambda r: _shifted(r / "labelsTr" / "hippocampus_001.nii.gz", spacing=(1.0, 1.0, 2.0)),
        "labelsTr/hippocampus_001.nii.gz: spacing 1x1x2 differs from",
    ),
    "label values": (
        lambda r: _edit_json(r, labels={"background": 0, "Anterior": 1}),
        "label values 2 not in dataset.json (0, 1)",
    ),
    "complex voxels": (
        lambda r: _complex(r / "imagesTr" / "hippocampus_001_0000.nii.gz"),
        "imagesTr/hippocampus_001_0000.nii.gz: complex voxels: store real intensities",
    ),
    "missing label": (
        lambda r: (r / "labelsTr" / "hippocampus_002.nii.gz").unlink(),
        "labelsTr/hippocampus_002.nii.gz: missing (the label of case hippocampus_002)",
    ),
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_bad_input_is_one_line_naming_file_or_key(tasks, tmp_path, problem):
    root = _broken(tasks, tmp_path)
    breaks, message = BAD[problem]
    breaks(root)
    with pytest.raises(DataError) as error:
        NnUNetData(root).setup()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_channels_with_different_shapes(tasks, tmp_path):
    root = _broken(tasks, tmp_path, "prostate_v1")
    image = root / "imagesTr" / "prostate_001.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))[:, :-1]  # (t, z - 1, y, x)
    sitk.WriteImage(sitk.GetImageFromArray(array, False), str(image))
    with pytest.raises(DataError, match=r"labelsTr/prostate_001.nii.gz: shape 32x28x16 differs"):
        NnUNetData(root).setup()
