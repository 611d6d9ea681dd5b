"""revseg-plan data=nnunet: the dataset's report from the headers, the zoo planned at the full
field of view, the experiment it writes trains with debug=fast, bad input is one line."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from helpers import run_python
from revseg.cli.plan import main, run
from revseg.config import compose_config
from revseg.data.synthetic_nnunet import make_task
from revseg.training.trainer import train

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "Dataset909_SynthSpleen"


@pytest.fixture(scope="module")
def spleen(tmp_path_factory):
    """The generated Spleen-like CT task, 4 training cases (made once for the module)."""
    return make_task(tmp_path_factory.mktemp("data") / NAME, "spleen", num_cases=4)


def _plan(capsys, root, *args: str) -> str:
    status = main(["data=nnunet", f"data.root={root}", *TINY_MODEL, "zoo=false", *args])
    assert status == 0
    return capsys.readouterr().out


def _headers(root):
    """``(shapes, spacings)`` of every training image, read with SimpleITK here."""
    shapes, spacings = [], []
    for path in sorted((root / "imagesTr").glob("*_0000.nii.gz")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shapes.append(reader.GetSize())
        spacings.append(reader.GetSpacing())
    return np.asarray(shapes), np.asarray(spacings)


def _x(values) -> str:
    return "x".join(f"{v:g}" for v in values)


def test_report_gives_median_shape_and_spacing_from_the_headers(capsys, spleen):
    out = _plan(capsys, spleen, "data.spacing=[0.8,0.8,2.5]")
    shapes, spacings = _headers(spleen)
    assert len(shapes) == 4
    assert f"{NAME} ({spleen}): nnU-Net v2, 4 training cases" in out
    assert "channels (1): 0 CT" in out and "background 0, spleen 1" in out
    assert "loss=dice_ce" in out
    assert (
        f"median {_x(np.median(shapes, axis=0))}, min {_x(shapes.min(0))}, "
        f"max {_x(shapes.max(0))}" in out
    )
    assert f"spacing (mm): median {_x(np.median(spacings, axis=0))}" in out
    # at 0.8 x 0.8 x 2.5 mm: each case's shape * spacing / target, rounded half up
    resampled = np.floor(shapes * spacings / np.array([0.8, 0.8, 2.5]) + 0.5)
    assert f"at data.spacing 0.8x0.8x2.5 mm: median shape {_x(np.median(resampled, 0))}" in out
    # the tiny model's divisor is 4: the largest resampled case padded to it
    fov = _x(-(-resampled.max(0) // 4) * 4)
    assert re.search(rf"\| prev_unet .*\(chosen\) \| [\d,]+ \| {fov} \|", out), out
    assert "no experiment written: give budget_gb=N" in out


def test_full_fov_is_the_data_modules(spleen):
    from revseg.data.nnunet_data import NnUNetData
    from revseg.memory.dataset_plan import summarize_dataset
    from revseg.memory.plan import compose_train_config

    for spacing in ("null", "[0.8,0.8,2.5]", "median"):
        cfg = compose_train_config(
            ["data=nnunet", f"data.root={spleen}", f"data.spacing={spacing}"]
        )
        summary = summarize_dataset(cfg.data)
        data = NnUNetData(spleen, divisor=16, spacing=cfg.data.spacing)
        assert summary.full_fov(16) == data.sample_size, spacing


def test_written_experiment_trains_with_debug_fast(capsys, spleen, tmp_path):
    out = _plan(capsys, spleen, "budget_gb=0.002", f"plan_dir={tmp_path / 'cfg'}")
    path = tmp_path / "cfg" / "experiment" / f"plan_{NAME}.yaml"
    assert "experiment: prev_unet" in out and str(path) in out
    command = f"python train.py --config-dir {tmp_path / 'cfg'} experiment=plan_{NAME}"
    assert command in out
    written = yaml.safe_load(path.read_text())
    assert written["defaults"] == [{"override /data": "nnunet"}, {"override /loss": "dice_ce"}]
    data = written["data"]
    assert data["root"] == str(spleen.resolve()) and data["divisor"] == 4
    assert data["crop_size"] == [44, 44, 12]  # the full FOV does not fit 2 MiB: patches
    patch = data["patch_size"]
    assert patch is not None and all(p % 4 == 0 for p in patch)
    assert f"patches {'x'.join(map(str, patch))}" in out
    assert written["model"]["in_channels"] == 1 and written["model"]["out_channels"] == 2
    assert written["trainer"]["precision"] == "fp32"

    cfg = compose_config(
        "train",
        [f"experiment=plan_{NAME}", "debug=fast", "trainer.progress_bar=false",
         f"paths.output_dir={tmp_path / 'run'}"],
        search=[str(tmp_path / "cfg")],
    )  # fmt: skip
    summary = train(cfg)
    assert summary["epochs_completed"] == 1
    assert summary["voxels_per_sample"] == int(np.prod(patch))
    assert summary["peak_memory_bytes"] <= 0.002 * 2**30  # the plan was right: it fits


@pytest.mark.slow
def test_train_py_finds_the_experiment_with_config_dir(capsys, spleen, tmp_path):
    _plan(capsys, spleen, "budget_gb=1", f"plan_dir={tmp_path / 'cfg'}")
    run_dir = tmp_path / "run"
    result = run_python(
        "train.py", "--config-dir", str(tmp_path / "cfg"), f"experiment=plan_{NAME}",
        "debug=fast", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_zoo_against_the_checkpointed_baselines_with_cuda_rules(capsys, spleen, tmp_path):
    status = main(["data=nnunet", f"data.root={spleen}", "trainer.device=cuda",
                   "trainer.precision=bf16", "budget_gb=1", "max_depth=2",
                   f"plan_dir={tmp_path}"])  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "planned for CUDA (trainer.device=cuda), bf16" in out
    rows = {r.split(" | ")[0].lstrip("| "): r for r in out.splitlines() if r.startswith("| ")}
    labels = ("prev_unet depth 1 (chosen)", "unet_baseline, checkpointing", "prev_unet depth 4",
              "unet_baseline 4 encoder blocks, checkpointing")  # fmt: skip
    for label in labels:
        assert label in rows and "48x48x16" in rows[label], label
    assert re.search(r"\| \d\.\d{3} \(\d\.\d{3} total\) \|", rows["prev_unet depth 1 (chosen)"])
    assert "deepest prev_unet at 48x48x16: model.encoder_depth=" in out
    assert "deepest unet_baseline, checkpointing at 48x48x16: model.encoder_blocks=" in out
    written = yaml.safe_load((tmp_path / "experiment" / f"plan_{NAME}.yaml").read_text())
    assert written["trainer"] == {"device": "cuda", "precision": "bf16"}


def test_missing_dataset_json_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    (tmp_path / "Dataset001_Empty").mkdir()
    root = tmp_path / "Dataset001_Empty"
    monkeypatch.setattr(sys, "argv", ["revseg-plan", "data=nnunet", f"data.root={root}",
                                      "budget_gb=8"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"error: data.root: {root / 'dataset.json'} not found (an nnU-Net dataset needs one)"
    ]
    assert not (tmp_path / "revseg_configs").exists()


def test_dataset_keys_need_a_dataset(capsys):
    with pytest.raises(Exception, match="plan_dir is for a dataset's plan"):
        main([*TINY_MODEL, "data.crop_size=[16,16,16]", "plan_dir=x"])
