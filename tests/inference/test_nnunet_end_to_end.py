"""nnU-Net-format tasks end to end: train (debug=fast), predict {case}{file_ending} with the
input's geometry and the dataset's label values, evaluate per dataset.json label; the CLI's
bad-input line; a trained model beats an untrained one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import run_python
from revseg.data.nnunet import read_spec
from revseg.data.synthetic_nnunet import TASKS, make_task
from revseg.inference.nnunet import evaluate_folder, predict_folder
from revseg.training.trainer import train

from conftest import compose_train

SMALL = (
    "model.channels=[8,16,24]",
    "model.norm_groups=2",
    "trainer.progress_bar=false",
    "trainer.plan_memory=false",
    "~logger",
)
EXPERIMENT = {
    "hippocampus": ("nnunet_hippocampus", ()),
    "hippocampus_mha": ("nnunet_hippocampus", ()),
    "spleen": ("nnunet_spleen", ()),
    "brats_regions": ("nnunet_regions", ()),
    "prostate_v1": ("nnunet_hippocampus", ("model.in_channels=2",)),
}


def _train(root, run, task, *extra):
    experiment, overrides = EXPERIMENT[task]
    cfg = compose_train(
        f"experiment={experiment}",
        f"data.root={root}",
        f"data.generate={task}",
        "data.num_cases=4",
        f"paths.output_dir={run}",
        *SMALL,
        *overrides,
        *extra,
    )
    return train(cfg)


@pytest.mark.parametrize("task", ["spleen", "prostate_v1", "hippocampus_mha", "brats_regions"])
def test_train_predict_evaluate(tmp_path, task):
    root = tmp_path / TASKS[task]["folder"]
    summary = _train(root, tmp_path / "run", task, "debug=fast")
    spec = read_spec(root)
    scored = [k for k in summary["final_metrics"] if k.startswith("val/dice_")]
    names = [n.replace(" ", "_") for n in spec.foreground_names]
    assert sorted(scored) == sorted(["val/dice_mean", *(f"val/dice_{n}" for n in names)])
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["dataset"]["label_names"] == list(spec.label_names)

    records = predict_folder(tmp_path / "run", root / "imagesTs", tmp_path / "pred", device="cpu")
    assert [r["case"] for r in records] == [f"{task.split('_')[0]}_00{i}" for i in (4, 5)]
    for record in records:
        written = sitk.ReadImage(record["output"])
        assert record["output"].endswith(record["case"] + spec.file_ending)
        image = sitk.ReadImage(sorted((root / "imagesTs").glob(record["case"] + "*"))[0])
        assert written.GetSize() == image.GetSize()[:3]
        assert written.GetSpacing() == pytest.approx(image.GetSpacing()[:3])
        assert written.GetOrigin() == pytest.approx(image.GetOrigin()[:3])
        direction = np.asarray(image.GetDirection()).reshape(image.GetDimension(), -1)[:3, :3]
        assert written.GetDirection() == pytest.approx(direction.ravel().tolist())
        assert set(np.unique(sitk.GetArrayFromImage(written))) <= set(spec.values)

    per_case, missing, unmatched = evaluate_folder(tmp_path / "pred", root / "labelsTs", spec)
    assert sorted(per_case) == [r["case"] for r in records] and not missing and not unmatched
    assert {f"iou_{names[0]}", f"hd95_{names[-1]}", "dice_mean"} <= per_case[
        records[0]["case"]
    ].keys()


def test_region_labels_written_by_regions_class_order(tmp_path):
    from revseg.inference.nnunet import to_label_map

    spec = read_spec(make_task(tmp_path / "t", "brats_regions", num_cases=2, num_test=0))
    probabilities = np.zeros((3, 4, 1, 1))
    probabilities[0, 1:] = probabilities[1, 2:] = probabilities[2, 3:] = 0.9
    assert to_label_map(probabilities, spec).ravel().tolist() == [0, 1, 2, 3]


def test_cli_trains_predicts_and_evaluates_by_label_name(tmp_path):
    root = tmp_path / "Dataset904_SynthHippocampus"
    run = tmp_path / "run"
    trained = run_python(
        "train.py",
        "experiment=nnunet_hippocampus",
        f"data.root={root}",
        "data.num_cases=4",
        "debug=fast",
        *SMALL,
        f"hydra.run.dir={run}",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run / "checkpoints" / "best.pt").is_file()
    predicted = run_python(
        "scripts/predict.py", f"run={run}", f"input={root / 'imagesTs'}", f"output={tmp_path / 'p'}"
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "hippocampus_004.nii.gz",
        "hippocampus_005.nii.gz",
    ]
    evaluated = run_python(
        "scripts/evaluate.py",
        f"pred={tmp_path / 'p'}",
        f"truth={root / 'labelsTs'}",
        f"output={tmp_path / 'e'}",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Anterior" in evaluated.stdout and "Posterior" in evaluated.stdout
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert {"dice_Anterior", "iou_Posterior", "hd95_mean"} <= metrics["mean"].keys()


def test_cli_bad_dataset_exits_2_with_one_line_before_training(tmp_path):
    root = make_task(tmp_path / "Dataset904_SynthHippocampus", "hippocampus", num_cases=4)
    content = json.loads((root / "dataset.json").read_text())
    content["numTraining"] = 5
    (root / "dataset.json").write_text(json.dumps(content))
    run = tmp_path / "run"
    result = run_python(
        "train.py", "experiment=nnunet_hippocampus", f"data.root={root}", *SMALL,
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: {root / 'dataset.json'}: numTraining is 5 but 4 training cases were found"
    ]
    assert not (run / "checkpoints" / "last.pt").exists()


def test_trained_model_beats_untrained(tmp_path):
    root = tmp_path / "Dataset904_SynthHippocampus"
    common = ("data.num_cases=8", "metrics.hd95=false")
    untrained = _train(root, tmp_path / "a", "hippocampus", *common, "debug=fast",
                       "trainer.limit_train_batches=1", "optimizer.lr=1e-12")  # fmt: skip
    trained = _train(root, tmp_path / "b", "hippocampus", *common, "trainer.max_epochs=6")
    before = untrained["final_metrics"]["val/dice_mean"]
    after = trained["best_metric"]["value"]
    assert after > before + 0.3 and after > 0.5, (before, after)
