"""One ``dice_mean`` for nnU-Net-format datasets: validation (:class:`LabelMetrics`) and
``revseg-evaluate`` (:func:`evaluate_folder` + :func:`write_evaluation`) agree on the same
predictions, with the mean of the label means (each label's mean over the cases, NaN cells left
out), as nnU-Net's ``foreground_mean`` reads.

Case A: label 1 at Dice 2/3, label 2 empty in both prediction and truth. Case B: Dice 0.4 in both
labels. The mean of each case's own mean would be (2/3 + 0.4) / 2 = 8/15; the mean of the label
means is ((2/3 + 0.4) / 2 + 0.4) / 2 = 7/15.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from revseg.data.nnunet import read_spec
from revseg.inference.nnunet import evaluate_folder, write_evaluation
from revseg.metrics.labels import LabelMetrics, summarize_labels

SHAPE = (4, 4, 4)
EXPECTED = ((2 / 3 + 0.4) / 2 + 0.4) / 2


def _label(*parts: tuple[int, list[tuple[int, int, int]]]) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    for value, voxels in parts:
        for voxel in voxels:
            label[voxel] = value
    return label


# (truth, prediction); label 1 in A: truth 2 voxels, prediction 1 of them (2 * 1 / 3); in B,
# each label: truth 3 voxels, prediction 1 of them and 1 more (2 * 1 / 5)
CASES = {
    "case_a": (_label((1, [(0, 0, 0), (0, 0, 1)])), _label((1, [(0, 0, 0)]))),
    "case_b": (
        _label((1, [(1, 1, 1), (1, 1, 2), (1, 1, 3)]), (2, [(3, 0, 0), (3, 0, 1), (3, 0, 2)])),
        _label((1, [(1, 1, 1), (2, 2, 2)]), (2, [(3, 0, 0), (3, 3, 3)])),
    ),
}


def _write(array: np.ndarray, path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array.T.copy()), str(path))


def test_summary_is_the_mean_of_the_label_means():
    per_case = {
        "a": {"dice_x": 2 / 3, "dice_y": float("nan"), "dice_mean": 2 / 3},
        "b": {"dice_x": 0.4, "dice_y": 0.4, "dice_mean": 0.4},
    }
    assert summarize_labels(per_case)["dice_mean"] == pytest.approx(EXPECTED)


def test_validation_and_evaluate_agree(tmp_path):
    root = tmp_path / "Dataset001_Example"
    (root / "labelsTr").mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "first": 1, "second": 2},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    pred = tmp_path / "pred"
    pred.mkdir()
    for case, (truth, predicted) in CASES.items():
        _write(truth, root / "labelsTr" / f"{case}.nii.gz")
        _write(predicted, pred / f"{case}.nii.gz")
    spec = read_spec(root)

    per_case, missing, unmatched = evaluate_folder(pred, root / "labelsTr", spec, hd=False)
    assert missing == [] and unmatched == []
    assert per_case["case_a"]["dice_first"] == pytest.approx(2 / 3)
    assert per_case["case_b"]["dice_second"] == pytest.approx(0.4)
    write_evaluation(per_case, tmp_path / "eval", {})
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean"]

    metrics = LabelMetrics(spec.foreground_names, hd95=False)
    for truth, predicted in CASES.values():
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(truth).long(), 3)
        logits = torch.nn.functional.one_hot(torch.from_numpy(predicted).long(), 3).float()
        metrics.update(logits.movedim(-1, 0)[None], one_hot.movedim(-1, 0)[None].float())
    validated = metrics.compute()

    assert evaluated["dice_mean"] == pytest.approx(EXPECTED)
    assert validated["dice_mean"] == pytest.approx(EXPECTED)
    for key in ("dice_first", "dice_second", "iou_mean"):
        assert validated[key] == pytest.approx(evaluated[key])
