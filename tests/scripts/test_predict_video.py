"""Video prediction: a trained video run writes one DAVIS palette PNG per source frame, with the
metrics of validation; bad runs give one error line."""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers import run_python
from revseg.data.synthetic_video import DAVIS_PALETTE
from revseg.errors import DataError
from revseg.inference.video_prediction import predict_video
from revseg.training.trainer import train

from conftest import TINY, TINY_VIDEO, compose_train


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("video_run")
    overrides = [*TINY_VIDEO, f"data.root={run / 'data'}", "trainer.progress_bar=false"]
    overrides += ["data.metrics_convention=official"]  # validation scores as DAVIS's toolkit
    summary = train(
        compose_train("model=hyperbolic_blr", *overrides, f"paths.output_dir={run}", "~logger")
    )
    return run, summary


def run_script(*args: str) -> subprocess.CompletedProcess:
    return run_python("scripts/predict_video.py", *args)


def test_masks_have_the_source_names_size_and_palette(video_run, tmp_path):
    run, summary = video_run
    result = predict_video(run, tmp_path / "masks", checkpoint="best")
    sources = sorted((run / "data" / "JPEGImages" / "480p" / "blobs").glob("*.jpg"))
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert result["masks"] == len(masks) == len(sources)  # 8 frames -> 8 source frames
    assert [m.stem for m in masks] == [s.stem for s in sources]
    for mask, source in zip(masks, sources):
        image = Image.open(mask)
        assert image.mode == "P" and image.size == Image.open(source).size
        palette = np.array(image.getpalette()[:6]).reshape(2, 3)
        assert (palette == DAVIS_PALETTE[:2]).all()
        assert set(np.unique(np.array(image))) <= {0, 1}
    # the prediction of the best checkpoint scores what validation scored for it
    best = summary["best_metric"]
    assert result["metrics"][best["name"].removeprefix("val/")] == pytest.approx(best["value"])
    # J and F per frame on the official frames 1 .. T-2 of the 8 source frames
    assert result["metrics"]["scored_frames"] == [1, 2, 3, 4, 5, 6]
    assert len(result["metrics"]["iou_per_frame"]) == len(result["metrics"]["f_per_frame"]) == 6
    m = result["metrics"]
    assert m["jf_mean"] == pytest.approx((m["j_mean"] + m["f_mean"]) / 2)


def test_command_line_writes_masks_and_metrics(video_run, tmp_path):
    run, _ = video_run
    proc = run_script(f"run={run}", f"output={tmp_path / 'out'}", "predict.checkpoint=last")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 masks" in proc.stdout and "J mean" in proc.stdout and "J&F mean" in proc.stdout
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["sequence"] == "blobs" and 0 <= record["metrics"]["j_mean"] <= 1


def test_unknown_sequence_and_missing_run_are_one_line(video_run, tmp_path):
    run, _ = video_run
    for args, fragment in (
        ([f"run={run}", "sequence=nope"], "nope"),
        ([f"run={run}", "sequence=../up"], "data.sequence"),
        ([f"run={tmp_path / 'none'}"], "not a run directory"),
        ([f"run={run}", "predict.threshold=abc"], "predict.threshold"),
        ([f"run={run}", "predict.threshold=1.5"], "predict.threshold"),
    ):
        proc = run_script(*args, f"output={tmp_path / 'o'}")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr


def test_a_volume_run_is_refused(tmp_path, tiny_data_root):
    train(
        compose_train(
            *TINY, f"data.root={tiny_data_root}", f"paths.output_dir={tmp_path}", "~logger"
        )
    )
    with pytest.raises(DataError, match="not on video"):
        predict_video(tmp_path, tmp_path / "masks")
