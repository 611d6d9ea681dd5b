"""revseg-evaluate on DAVIS results: the toolkit's two CSV files with hand-computed figures, the
frames it reads, validation's figures equal to the written masks' figures, and one error line for
bad input."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_python
from revseg.data.davis import DavisData, write_masks
from revseg.data.synthetic_video import make_synthetic_video
from revseg.errors import DataError
from revseg.inference import video_evaluation
from revseg.inference.video_evaluation import evaluate_results, format_csvs, is_davis_root

GLOBAL_HEADER = "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"


def box(shape, rows, cols, value=1):
    out = np.zeros(shape, dtype=np.uint8)
    out[..., rows[0] : rows[1], cols[0] : cols[1]] = value
    return out


def add_sequence(root, sequence, masks):
    """Annotations (palette PNGs) and blank JPEG frames of one sequence."""
    write_masks(masks, root / "Annotations" / "480p" / sequence)
    frames = root / "JPEGImages" / "480p" / sequence
    frames.mkdir(parents=True)
    for t in range(len(masks)):
        Image.new("RGB", masks.shape[:0:-1]).save(frames / f"{t:05d}.jpg")


@pytest.fixture
def dataset(tmp_path):
    """``alpha``: 4 frames of 20x20, objects 1 and 2; ``beta``: 3 frames of 40x40, object 1.

    Results: alpha's object 1 right and object 2 never predicted; beta's square shifted right by
    2 pixels. Only the frames the official evaluation reads (1 .. T-2) are written.
    """
    root, results = tmp_path / "DAVIS", tmp_path / "results"
    alpha = box((4, 20, 20), (2, 8), (2, 8), 1)
    alpha[:, 12:18, 12:18] = 2
    beta = box((3, 40, 40), (10, 20), (10, 20))
    add_sequence(root, "alpha", alpha)
    add_sequence(root, "beta", beta)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\nbeta\n")
    write_masks(np.where(alpha == 1, 1, 0)[1:3], results / "alpha", names=["00001", "00002"])
    write_masks(box((1, 40, 40), (10, 20), (12, 22)), results / "beta", names=["00001"])
    return root, results


def test_csvs_have_the_toolkits_columns_and_hand_computed_figures(dataset):
    root, results = dataset
    scores = evaluate_results(results, root, ["alpha", "beta"])
    global_text, sequence_text = format_csvs(scores)
    # per object (J mean, F mean): alpha_1 (1, 1); alpha_2 (0, 0): missed; beta_1: a 10x10
    # square shifted by 2 in 40x40, J = 80 / 120, F = 0.55 (tests/metrics/test_davis_official.py)
    assert sequence_text == (
        "Sequence,J-Mean,F-Mean\nalpha_1,1.000,1.000\nalpha_2,0.000,0.000\nbeta_1,0.667,0.550\n"
    )
    # means over the 3 objects: J (1 + 0 + 2/3) / 3 = 0.5556, F (1 + 0 + 0.55) / 3 = 0.5167,
    # J&F 0.5361; recall 2 of 3 objects above 0.5 in their (one or two) frames; no decay
    assert global_text == GLOBAL_HEADER + "0.536,0.556,0.667,0.000,0.517,0.667,0.000\n"


def test_the_command_writes_both_files_into_the_results_folder(dataset, capsys):
    root, results = dataset
    assert is_davis_root(root) and not is_davis_root(results)
    from revseg.cli.evaluate import main

    assert main([f"pred={results}", f"truth={root}"]) == 0
    assert "J&F-Mean 0.536" in capsys.readouterr().out
    assert (results / "global_results-val.csv").read_text().startswith(GLOBAL_HEADER)
    assert (results / "per-sequence_results-val.csv").read_text().count("\n") == 4
    # another output folder, chosen sequences, and a split name that names the files
    out = results.parent / "report"
    args = [f"pred={results}", f"truth={root}", f"output={out}", "evaluate.sequences=[beta]"]
    assert video_evaluation.main([*args, "evaluate.split=mine"]) == 0
    assert (out / "per-sequence_results-mine.csv").read_text().splitlines()[1:] == [
        "beta_1,0.667,0.550"
    ]


def test_revseg_convention_reads_every_frame(dataset):
    root, results = dataset
    with pytest.raises(DataError, match=r"alpha/00000.png: result mask not found"):
        evaluate_results(results, root, ["alpha"], convention="revseg")


def command(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    """``revseg-evaluate args...`` in this process: its exit status and stderr lines."""
    from revseg.cli.evaluate import run

    monkeypatch.setattr(sys, "argv", ["revseg-evaluate", *args])
    with pytest.raises(SystemExit) as exit:
        run()
    return exit.value.code, [line for line in capsys.readouterr().err.splitlines() if line]


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("no_folder", "beta: no results folder for sequence beta"),
        ("wrong_size", "beta/00001.png: size 20x40 differs from the annotation's 40x40"),
        ("rgb", "beta/00001.png: a RGB image, not a palette PNG"),
        ("grey", "beta/00001.png: a L image, not a palette PNG"),
        ("unknown_index", "beta/00001.png: index 2 is no object of beta"),
        ("missing_frame", "beta/00001.png: result mask not found"),
    ],
)
def test_bad_results_are_one_line_naming_the_file(dataset, damage, fragment, monkeypatch, capsys):
    root, results = dataset
    folder = results / "beta"
    if damage == "no_folder":
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    elif damage == "missing_frame":
        (folder / "00001.png").unlink()
    elif damage == "wrong_size":
        write_masks(np.zeros((1, 40, 20), np.uint8), folder, names=["00001"])
    elif damage == "rgb":
        Image.new("RGB", (40, 40)).save(folder / "00001.png")
    elif damage == "grey":
        Image.new("L", (40, 40)).save(folder / "00001.png")
    elif damage == "unknown_index":
        write_masks(box((1, 40, 40), (0, 2), (0, 2), 2), folder, names=["00001"])
    with pytest.raises(DataError, match=fragment):
        evaluate_results(results, root, ["alpha", "beta"])
    status, lines = command(monkeypatch, capsys, f"pred={results}", f"truth={root}")
    assert status == 2 and len(lines) == 1 and fragment in lines[0], lines


def test_bad_arguments_are_one_line(dataset, monkeypatch, capsys):
    root, results = dataset
    for args, fragment in (
        (["evaluate.split=test"], "ImageSets/2017/test.txt not found"),
        (["evaluate.sequences=[gamma]"], "data.sequence='gamma': no such sequence"),
        (["evaluate.convention=strict"], "evaluate.convention must be one of official, revseg"),
    ):
        status, lines = command(monkeypatch, capsys, f"pred={results}", f"truth={root}", *args)
        assert status == 2 and len(lines) == 1 and fragment in lines[0], lines
    # and as a script: a missing results folder
    proc = run_python("scripts/evaluate.py", f"pred={results / 'none'}", f"truth={root}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [
        f"error: pred: results folder not found: {results / 'none'}"
    ]


def test_validation_scores_what_the_written_masks_score(tmp_path):
    # a sequence with a void band: validation's official figures (the volume's prediction mapped
    # onto every source frame at the source size) equal those of the PNGs write_prediction wrote
    make_synthetic_video(tmp_path, "blobs", 10, (24, 40), seed=3, num_objects=2, void_width=1)
    data = DavisData(tmp_path, "blobs", frames=6, size=(16, 16), objects="all")
    batch = next(iter(data.val_dataloader()))
    logits = (
        torch.randn(1, 2, 6, 16, 16, generator=torch.Generator().manual_seed(0))
        + 4 * (batch["label"] == 1).float()
        - 2
    )
    metrics = data.build_metrics()
    pred = metrics.update(logits, batch["label"])
    data.write_prediction(pred[0], tmp_path / "results" / "blobs")
    scores = evaluate_results(tmp_path / "results", tmp_path, ["blobs"])
    out = metrics.compute()
    assert scores[0].frames == tuple(range(1, 9)) and metrics.scored_frames() == list(range(1, 9))
    for key, value in video_evaluation.summarize_objects(scores).items():
        assert out[key] == pytest.approx(value), key
