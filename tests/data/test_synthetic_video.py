"""Tests of the generated DAVIS-layout video (revseg.data.synthetic_video, its script)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from revseg.data import synthetic_video
from revseg.data.synthetic_video import (
    DAVIS_PALETTE,
    VOID_INDEX,
    make_synthetic_video,
    read_video_manifest,
    synthesize_video,
)
from revseg.errors import DataError

REPO = Path(__file__).resolve().parents[2]
FRAMES, SIZE = 10, (32, 48)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("video") / "davis"
    return make_synthetic_video(root, "blobs", FRAMES, SIZE, seed=0, num_objects=2, void_width=1)


def test_layout_files_and_manifest(video_root):
    frames = sorted((video_root / "JPEGImages" / "480p" / "blobs").iterdir())
    masks = sorted((video_root / "Annotations" / "480p" / "blobs").iterdir())
    assert [p.name for p in frames] == [f"{t:05d}.jpg" for t in range(FRAMES)]
    assert [p.name for p in masks] == [f"{t:05d}.png" for t in range(FRAMES)]
    with Image.open(frames[0]) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE[1], SIZE[0]))
    with Image.open(masks[0]) as mask:
        assert (mask.format, mask.mode, mask.size) == ("PNG", "P", (SIZE[1], SIZE[0]))
        palette = np.array(mask.getpalette()).reshape(-1, 3)
    np.testing.assert_array_equal(palette[:256], DAVIS_PALETTE)
    manifest = json.loads((video_root / "dataset.json").read_text())
    assert manifest["generator"] == synthetic_video.GENERATOR
    assert (manifest["frames"], manifest["size"], manifest["num_objects"]) == (10, [32, 48], 2)
    assert read_video_manifest(video_root) == manifest
    assert not [p for p in video_root.parent.iterdir() if p.name.startswith(".")]  # no temp


def test_davis_palette_is_the_voc_colour_map():
    assert DAVIS_PALETTE.shape == (256, 3)
    assert DAVIS_PALETTE[0].tolist() == [0, 0, 0]
    assert DAVIS_PALETTE[1].tolist() == [128, 0, 0]
    assert DAVIS_PALETTE[2].tolist() == [0, 128, 0]
    assert DAVIS_PALETTE[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in DAVIS_PALETTE.tolist()}) == 256


def test_files_match_synthesize_video(video_root):
    video, mask = synthesize_video(0, FRAMES, SIZE, num_objects=2, void_width=1)
    masks_dir = video_root / "Annotations" / "480p" / "blobs"
    frames_dir = video_root / "JPEGImages" / "480p" / "blobs"
    for t in (0, FRAMES - 1):
        np.testing.assert_array_equal(np.array(Image.open(masks_dir / f"{t:05d}.png")), mask[t])
        decoded = np.array(Image.open(frames_dir / f"{t:05d}.jpg")).astype(float)
        assert (
            np.abs(decoded - video[t]).mean() < 4.0
        )  # JPEG (quality 95) of frames with pixel noise


def test_objects_move_with_void_band_between_labels():
    video, mask = synthesize_video(3, 12, (48, 48), num_objects=2, void_width=1)
    assert video.shape == (12, 48, 48, 3) and video.dtype == np.uint8
    assert mask.shape == (12, 48, 48) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1, 2, VOID_INDEX}
    for k in (1, 2):  # each object is there in every frame and moves
        area = (mask == k).reshape(12, -1).sum(1)
        assert (area > 20).all()
        centres = [np.argwhere(mask[t] == k).mean(0) for t in (0, 11)]
        assert np.linalg.norm(centres[1] - centres[0]) > 2.0
    # void only along boundaries: no void pixel is more than one pixel from another label
    clean = synthesize_video(3, 12, (48, 48), num_objects=2, void_width=0)[1]
    assert VOID_INDEX not in clean
    assert ((mask != VOID_INDEX) == (mask == clean)).all()
    edges = np.zeros_like(clean, dtype=bool)
    for axis in (1, 2):
        diff = np.diff(clean, axis=axis) != 0
        pad = [(0, 0)] * 3
        pad[axis] = (1, 0)
        edges |= np.pad(diff, pad)
        pad[axis] = (0, 1)
        edges |= np.pad(diff, pad)
    from scipy import ndimage

    near = ndimage.binary_dilation(edges, np.ones((1, 3, 3), bool))
    assert (mask == VOID_INDEX).sum() > 0
    assert not ((mask == VOID_INDEX) & ~near).any()


def test_not_separable_by_a_colour_threshold():
    """Colour alone does not segment the objects: the best per-channel threshold is poor."""
    video, mask = synthesize_video(0, 16, (64, 64), num_objects=2)
    objects = mask > 0
    best = 0.0
    for c in range(3):
        values = video[..., c]
        for threshold in range(8, 256, 8):
            for pred in (values > threshold, values <= threshold):
                best = max(best, (pred & objects).sum() / (pred | objects).sum())
    assert 0.1 < objects.mean() < 0.5
    assert best < 0.5


def test_deterministic_and_seeded():
    a = synthesize_video(5, 4, (32, 32))
    b = synthesize_video(5, 4, (32, 32))
    c = synthesize_video(6, 4, (32, 32))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_idempotent_and_refuses_other_settings(tmp_path, video_root):
    before = {p: p.stat().st_mtime_ns for p in video_root.rglob("*") if p.is_file()}
    again = make_synthetic_video(video_root, "blobs", FRAMES, SIZE, seed=0, void_width=1)
    assert again == video_root
    assert {p: p.stat().st_mtime_ns for p in video_root.rglob("*") if p.is_file()} == before
    with pytest.raises(DataError, match="frames=10.*not.*frames=6.*--overwrite"):
        make_synthetic_video(video_root, "blobs", 6, SIZE, seed=0, void_width=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a video written by revseg"):
        make_synthetic_video(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_generated_video(tmp_path):
    root = make_synthetic_video(tmp_path / "v", frames=4, size=(16, 16))
    make_synthetic_video(root, frames=3, size=(16, 16), overwrite=True)
    assert len(list((root / "JPEGImages" / "480p" / "blobs").iterdir())) == 3
    assert read_video_manifest(root)["frames"] == 3


@pytest.mark.parametrize(
    "kwargs", [{"frames": 0}, {"size": (8, 32)}, {"num_objects": 0}, {"void_width": -1}]
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_video(tmp_path / "v", **kwargs)
    assert not (tmp_path / "v").exists()


def test_script_writes_then_keeps_then_refuses(tmp_path):
    root = tmp_path / "video"
    cmd = [sys.executable, "scripts/make_synthetic_video.py", "--root", str(root)]
    small = ["--frames", "3", "--size", "16", "16"]
    first = subprocess.run(cmd + small, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "wrote blobs: 3 frames of 16x16" in first.stdout
    assert len(list((root / "Annotations" / "480p" / "blobs").iterdir())) == 3
    clash = subprocess.run(
        cmd + ["--frames", "4", "--size", "16", "16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert clash.returncode == 2
    lines = clash.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(root) in lines[0]
