"""One ``dice_mean``: validation, its TensorBoard scalar and ``revseg-evaluate`` agree on the same
predictions, with the mean of the region means (each region's mean over the cases, NaN cells
left out), as the official BraTS summary reads.

Case A: WT Dice 2/3, TC and ET empty in both prediction and truth. Case B: Dice 0.4 in every
region. Pooling every region cell gives (2/3 + 3 * 0.4) / 4 = 0.47; the mean of each case's own
mean (2/3 + 0.4) / 2 = 0.53; the mean of the region means ((2/3 + 0.4) / 2 + 0.4 + 0.4) / 3.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from helpers import Writer
from revseg.cli.evaluate import main as evaluate_main
from revseg.metrics.brats import DICE_MEAN, label_regions
from revseg.metrics.regions import BRATS
from revseg.training.contracts import VAL_DICE_MEAN
from revseg.training.trainer import Trainer

from conftest import TINY, compose_train

SHAPE = (4, 4, 4)


def _label(voxels: list[tuple[int, int, int]], value: int) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    for voxel in voxels:
        label[voxel] = value
    return label


# case A: oedema only (WT), truth 2 voxels, prediction 1 of them: Dice 2 * 1 / 3
# case B: enhancing tumour (WT = TC = ET), truth 3 voxels, prediction 1 of them and 1 more:
# Dice 2 * 1 / (3 + 2) = 0.4 in every region
CASES = {
    "A": (_label([(0, 0, 0), (0, 0, 1)], 2), _label([(0, 0, 0)], 2)),
    "B": (_label([(1, 1, 1), (1, 1, 2), (1, 1, 3)], 4), _label([(1, 1, 1), (2, 2, 2)], 4)),
}
WT = (2 / 3 + 0.4) / 2
EXPECTED = (WT + 0.4 + 0.4) / 3  # 4/9: TC and ET are 0.4 (case A's NaN cells left out)


class _Identity(nn.Module):
    """The input is the logits: each case's image is its prediction's region masks."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class _Cases:
    """A data module of the two cases: image = prediction logits, label = truth regions."""

    input_shape = SHAPE
    train_cases: list[str] = []
    val_cases = list(CASES)

    def setup(self) -> None: ...

    def train_dataloader(self, seed=None, pin_memory=False):
        return []

    def val_dataloader(self, pin_memory=False):
        for case, (truth, pred) in CASES.items():
            logits = torch.from_numpy(label_regions(pred, BRATS)).float() * 20 - 10
            label = torch.from_numpy(label_regions(truth, BRATS)).float()
            yield {"image": logits[None], "label": label[None], "case": [case]}


def test_the_example_by_hand():
    assert EXPECTED == pytest.approx(4 / 9)


def test_validation_tensorboard_and_evaluate_agree(tmp_path, capsys):
    cfg = compose_train(*TINY, f"paths.output_dir={tmp_path}", "trainer.log_images=false")
    model = _Identity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = Writer()
    trainer = Trainer(
        cfg, model, _Cases(), nn.Identity(), optimizer, None, {}, writer, tmp_path,
        torch.device("cpu"),
    )  # fmt: skip
    trainer.compute_loss = lambda logits, label, mask: torch.zeros(())
    metrics = trainer.validate()
    assert metrics[VAL_DICE_MEAN] == pytest.approx(EXPECTED)
    assert metrics["val/dice_WT"] == pytest.approx(WT) and metrics["val/dice_ET"] == 0.4
    trainer.epoch = 1
    trainer._log_epoch(metrics)
    assert writer.scalars[VAL_DICE_MEAN][1] == pytest.approx(EXPECTED)

    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    for case, (t, p) in CASES.items():
        nib.save(nib.Nifti1Image(t, np.eye(4)), truth / f"{case}-seg.nii.gz")
        nib.save(nib.Nifti1Image(p, np.eye(4)), pred / f"{case}.nii.gz")
    out = tmp_path / "eval"
    args = [f"pred={pred}", f"truth={truth}", f"output={out}", "evaluate.labels=brats2018-2021"]
    assert evaluate_main([*args, "evaluate.plot=false", "evaluate.lesion_wise=false"]) == 0
    rows = {r["case"]: r for r in csv.DictReader((out / "metrics.csv").open())}
    assert float(rows["A"][DICE_MEAN]) == pytest.approx(2 / 3, abs=1e-5)  # the case's own mean
    assert float(rows["mean"][DICE_MEAN]) == pytest.approx(EXPECTED, abs=1e-5)
    summary = {r["metric"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert float(summary[DICE_MEAN]["mean"]) == pytest.approx(EXPECTED, abs=1e-5)
    report = json.loads((out / "metrics.json").read_text())
    assert report["mean"][DICE_MEAN] == pytest.approx(EXPECTED)
    printed = capsys.readouterr().out.splitlines()
    dice_line = next(line for line in printed if line.split()[:1] == ["dice"])
    assert float(dice_line.split()[-1]) == pytest.approx(EXPECTED, abs=1e-3)
