"""The DAVIS data module on the synthetic DAVIS layout: batches, sparse labels, void, errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from revseg.data.davis import (
    DavisData,
    annotated_indices,
    find_sequences,
    read_mask,
    temporal_indices,
    volume_frames,
    write_masks,
)
from revseg.data.synthetic_video import DAVIS_PALETTE, VOID_INDEX, make_synthetic_video
from revseg.errors import ConfigError, DataError
from revseg.metrics.video import VOID

from conftest import compose_train

SOURCE_FRAMES, SOURCE_SIZE = 12, (32, 48)


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    """Two sequences: ``blobs`` (2 objects, no void) and ``voided`` (a void band)."""
    root = tmp_path_factory.mktemp("davis")
    make_synthetic_video(root / "a", "blobs", SOURCE_FRAMES, SOURCE_SIZE, seed=1)
    make_synthetic_video(root / "b", "voided", SOURCE_FRAMES, SOURCE_SIZE, seed=2, void_width=1)
    davis = root / "DAVIS"
    for sub, seq in (("a", "blobs"), ("b", "voided")):
        for folder in ("JPEGImages", "Annotations"):
            shutil.copytree(root / sub / folder / "480p" / seq, davis / folder / "480p" / seq)
    return davis


def module(root, **kwargs) -> DavisData:
    args = {"sequence": "blobs", "frames": 8, "size": (16, 24), "annotated_frames": 3}
    args.update(kwargs)
    return DavisData(root=root, **args)


def source_masks(root: Path, sequence: str) -> np.ndarray:
    files = sorted((root / "Annotations" / "480p" / sequence).glob("*.png"))
    return np.stack([np.array(Image.open(p)) for p in files])


def test_batches_shapes_dtypes_and_sparse_loss_mask(davis_root):
    data = module(davis_root, steps_per_epoch=3)
    assert data.input_shape == (8, 16, 24)
    assert (data.in_channels, data.out_channels) == (3, 1)
    assert data.train_cases == data.val_cases == ["blobs"]
    batches = list(data.train_dataloader(seed=0))
    assert len(batches) == 3
    batch = batches[0]
    assert batch["image"].shape == (1, 3, 8, 16, 24) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (1, 1, 8, 16, 24) and batch["label"].dtype == torch.float32
    assert batch["loss_mask"].shape == (1, 1, 8, 1, 1)
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["case"] == ["blobs"]
    # loss on exactly the chosen frames: 3 evenly spaced of 8
    assert data.annotated_frames == [1, 4, 6]
    assert batch["loss_mask"].flatten().nonzero().flatten().tolist() == [1, 4, 6]
    # the image is z-scored per channel over the video
    image = batch["image"][0]
    torch.testing.assert_close(image.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(image.std(dim=(1, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)


def test_memory_is_pinned_only_when_asked(davis_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = module(davis_root)
    assert not data.train_dataloader(seed=0).pin_memory and not data.val_dataloader().pin_memory
    assert data.train_dataloader(seed=0, pin_memory=True).pin_memory
    assert data.val_dataloader(pin_memory=True).pin_memory


def test_training_label_holds_only_the_annotated_frames(davis_root):
    data = module(davis_root, annotated_frames=[0, 5])
    train = next(iter(data.train_dataloader()))
    val = next(iter(data.val_dataloader()))
    assert train["loss_mask"].flatten().nonzero().flatten().tolist() == [0, 5]
    frames_with_labels = train["label"][0, 0].flatten(1).any(1).nonzero().flatten().tolist()
    assert frames_with_labels == [0, 5]
    torch.testing.assert_close(train["label"][:, :, [0, 5]], val["label"][:, :, [0, 5]])
    # validation: every frame labelled and evaluated
    assert val["label"][0, 0].flatten(1).any(1).all()
    torch.testing.assert_close(val["loss_mask"], torch.ones(1, 1, 8, 1, 1))
    torch.testing.assert_close(train["image"], val["image"])


def test_native_size_reproduces_the_files(davis_root):
    data = module(davis_root, frames=SOURCE_FRAMES, size=SOURCE_SIZE)
    val = next(iter(data.val_dataloader()))
    masks = source_masks(davis_root, "blobs")
    np.testing.assert_array_equal(val["label"][0, 0].numpy(), (masks > 0).astype(np.float32))
    frames = sorted((davis_root / "JPEGImages" / "480p" / "blobs").glob("*.jpg"))
    rgb = torch.from_numpy(np.stack([np.array(Image.open(p)) for p in frames])).float() / 255
    rgb = rgb.permute(3, 0, 1, 2)
    zscored = (rgb - rgb.mean(dim=(1, 2, 3), keepdim=True)) / rgb.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(val["image"][0], zscored, atol=1e-4, rtol=1e-4)
    assert data.source_size == SOURCE_SIZE


def test_resize_and_temporal_resampling(davis_root):
    data = module(davis_root, frames=6, size=(16, 24))
    val = next(iter(data.val_dataloader()))
    chosen = [0, 2, 4, 7, 9, 11]  # rint(linspace(0, 11, 6))
    assert temporal_indices(12, 6).tolist() == chosen
    assert [p.stem for p in data.source_frames] == [f"{t:05d}" for t in chosen]
    masks = torch.from_numpy(source_masks(davis_root, "blobs")[chosen]).float()
    expected = F.interpolate(masks[None], size=(16, 24), mode="nearest-exact")[0] > 0
    torch.testing.assert_close(val["label"][0, 0], expected.float())
    # more frames than the source: frames repeat
    assert temporal_indices(3, 5).tolist() == [0, 0, 1, 2, 2]


def test_annotated_indices():
    assert annotated_indices(3, 72) == [12, 36, 60]
    assert annotated_indices(1, 8) == [4]
    assert annotated_indices(8, 8) == list(range(8))
    assert annotated_indices([5, 1], 8) == [1, 5]


def test_objects_all_gives_one_channel_per_object(davis_root):
    data = module(davis_root, frames=SOURCE_FRAMES, size=SOURCE_SIZE, objects="all")
    assert data.out_channels == 2 and data.object_ids == [1, 2]
    assert data.channel_names == ("object1", "object2")
    val = next(iter(data.val_dataloader()))
    masks = source_masks(davis_root, "blobs")
    assert val["label"].shape == (1, 2, SOURCE_FRAMES, *SOURCE_SIZE)
    for channel, k in enumerate((1, 2)):
        np.testing.assert_array_equal(val["label"][0, channel].numpy(), masks == k)
    metrics = data.build_metrics(hd95=True)
    metrics.update(torch.where(val["label"] > 0, 5.0, -5.0), val["label"])
    assert metrics.compute()["iou_object2"] == 1.0


def test_void_is_marked_for_metrics_and_left_out_of_the_loss(davis_root):
    data = module(davis_root, sequence="voided", frames=SOURCE_FRAMES, size=SOURCE_SIZE)
    masks = source_masks(davis_root, "voided")
    void = torch.from_numpy(masks == VOID_INDEX)
    assert void.any()
    val = next(iter(data.val_dataloader()))
    label = val["label"][0, 0]
    assert set(label.unique().tolist()) == {0.0, 1.0, VOID}
    torch.testing.assert_close(label == VOID, void)
    # loss masks are full size where they select void voxels, and 0 on them
    assert val["loss_mask"].shape == (1, 1, SOURCE_FRAMES, *SOURCE_SIZE)
    torch.testing.assert_close(val["loss_mask"][0, 0] == 0, void)
    train = next(iter(data.train_dataloader()))
    frames = torch.zeros(SOURCE_FRAMES, dtype=torch.bool)
    frames[data.annotated_frames] = True
    torch.testing.assert_close(train["loss_mask"][0, 0] > 0, frames.view(-1, 1, 1) & ~void)
    assert set(train["label"].unique().tolist()) <= {0.0, 1.0}
    # revseg's convention: a prediction right everywhere but void scores 1, whatever it says
    # on void (the official one counts void as background: tests/metrics/test_davis_official.py)
    data.metrics_convention = "revseg"
    metrics = data.build_metrics(hd95=False)
    metrics.update(torch.where(label == 0, -5.0, 5.0)[None, None], val["label"])
    out = metrics.compute()
    assert out["iou_mean"] == 1.0 and out["j_mean"] == 1.0
    # and the loss ignores void voxels: the masked Dice of that prediction is 0
    from revseg.training.losses import RegionDiceLoss

    logits = torch.where(label == 0, -20.0, 20.0)[None, None]
    loss = RegionDiceLoss()(logits, val["label"] * val["loss_mask"], mask=val["loss_mask"])
    assert float(loss) < 1e-4


def test_official_metrics_score_each_object_with_void_as_background(davis_root, caplog):
    data = module(davis_root, sequence="voided", frames=SOURCE_FRAMES, size=SOURCE_SIZE,
                  objects="all")  # fmt: skip
    masks = source_masks(davis_root, "voided")
    void = masks == VOID_INDEX
    val = next(iter(data.val_dataloader()))
    label = val["label"]  # (1, 2, T, H, W): objects 1 and 2, VOID on void
    # right on every object pixel, background on void: J = F = 1 for both objects
    metrics = data.build_metrics()
    metrics.update(torch.where(label == 1, 5.0, -5.0), label)
    out = metrics.compute()
    assert metrics.scored_frames() == list(range(1, SOURCE_FRAMES - 1))
    assert (out["j_object1"], out["j_object2"], out["jf_mean"]) == (1.0, 1.0, 1.0)
    # object 1 also predicted on void: J of object 1 per frame = |G1| / |G1 + void|
    metrics.reset()
    logits = torch.where(label == 1, 5.0, -5.0)
    logits[:, 0][label[:, 0] == VOID] = 5.0
    metrics.update(logits, label)
    frames = slice(1, SOURCE_FRAMES - 1)
    object1 = (masks == 1)[frames].sum(axis=(1, 2))
    expected = object1 / (object1 + void[frames].sum(axis=(1, 2)))
    assert metrics.compute()["j_object1"] == pytest.approx(expected.mean())
    assert expected.mean() < 1
    # a binary prediction is object 1: a two-object sequence says so
    module(davis_root, sequence="voided").build_metrics()
    assert "scored as object 1" in caplog.text


def test_flips_are_seeded_and_consistent(davis_root):
    data = module(davis_root, steps_per_epoch=8, flip_prob=0.5)
    val = next(iter(data.val_dataloader()))
    first = list(data.train_dataloader(seed=3))
    again = list(data.train_dataloader(seed=3))
    flipped = 0
    for a, b in zip(first, again):
        torch.testing.assert_close(a["image"], b["image"])
        is_flipped = not torch.equal(a["image"], val["image"])
        if is_flipped:
            torch.testing.assert_close(a["image"], val["image"].flip(-1))
            torch.testing.assert_close(a["label"][:, :, 1], val["label"][:, :, 1].flip(-1))
        flipped += is_flipped
    assert 0 < flipped < 8


def test_rolls_shift_image_label_and_loss_mask_together(davis_root):
    data = module(davis_root, steps_per_epoch=6, roll=True)
    data.setup()
    train = data._train_sample
    first = list(data.train_dataloader(seed=5))
    again = list(data.train_dataloader(seed=5))
    moved_frames = set()
    for a, b in zip(first, again):
        torch.testing.assert_close(a["image"], b["image"])  # seeded
        image = a["image"][0]
        # find the shift that was applied: some (t, h, w) roll of the original gives the batch
        matches = [
            (t, h, w)
            for t in range(8)
            for h in range(16)
            for w in range(24)
            if torch.equal(train["image"].roll((t, h, w), dims=(1, 2, 3)), image)
        ]
        assert len(matches) == 1
        t, h, w = matches[0]
        assert torch.equal(a["label"][0], train["label"].roll((t, h, w), dims=(1, 2, 3)))
        assert torch.equal(a["loss_mask"][0], train["loss_mask"].roll(t, dims=1))
        moved_frames.add(t)
    assert len(moved_frames) > 1  # the supervised frames move: not tied to a frame index


def test_roll_per_axis(davis_root):
    data = module(davis_root, steps_per_epoch=4, roll=[True, False, False])
    data.setup()
    train = data._train_sample
    for batch in data.train_dataloader(seed=1):
        shifts = [t for t in range(8) if torch.equal(train["image"].roll(t, 1), batch["image"][0])]
        assert len(shifts) == 1


def test_preview_and_figures(davis_root):
    data = module(davis_root)
    val = next(iter(data.val_dataloader()))
    metrics = data.build_metrics(hd95=True)
    pred = metrics.update(torch.randn(1, 1, 8, 16, 24), val["label"])
    preview = data.preview(val["image"][0], val["label"][0], pred[0])
    # the labelled figure: input, truth, prediction and errors, enlarged from 16x24
    assert preview.shape[0] == 3 and preview.shape[1] > 8 * 16 and preview.shape[2] > 4 * 8 * 24
    assert 0 <= float(preview.min()) <= float(preview.max()) <= 1
    out = metrics.compute()
    assert {"iou_mean", "dice_mean", "j_mean", "j_mean_annotated", "j_mean_unannotated"} <= set(out)
    image = metrics.figures()["iou_per_frame"]
    assert image.shape[0] == 3 and image.ndim == 3


def test_write_split(davis_root, tmp_path):
    data = module(davis_root, frames=6)
    record = json.loads(data.write_split(tmp_path).read_text())
    assert record["train"] == record["val"] == ["blobs"]
    assert record["annotated_frames"] == [1, 3, 5]
    assert record["annotated_source_frames"] == ["00002.jpg", "00007.jpg", "00011.jpg"]


def test_write_masks_round_trip(tmp_path):
    pred = torch.zeros(3, 8, 12, dtype=torch.bool)
    pred[:, 2:6, 3:9] = True
    paths = write_masks(pred, tmp_path / "out", size=(16, 24))
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    back = np.stack([read_mask(p) for p in paths])
    assert back.shape == (3, 16, 24)
    expected = np.repeat(np.repeat(pred.numpy(), 2, axis=1), 2, axis=2).astype(np.uint8)
    np.testing.assert_array_equal(back, expected)
    with Image.open(paths[0]) as image:
        assert image.mode == "P"
        assert np.array(image.getpalette()).reshape(-1, 3)[1].tolist() == [128, 0, 0]
    # integer palette indices and names
    indices = np.zeros((2, 4, 4), dtype=np.uint8)
    indices[0, 0, 0], indices[1, 1, 1] = 2, VOID_INDEX
    paths = write_masks(indices, tmp_path / "idx", names=["a", "b"])
    np.testing.assert_array_equal(np.stack([read_mask(p) for p in paths]), indices)
    with pytest.raises(ValueError, match="distinct names"):
        write_masks(indices, tmp_path / "x", names=["a", "a"])


def test_write_prediction_uses_source_names_and_size(davis_root, tmp_path):
    data = module(davis_root, frames=SOURCE_FRAMES, size=(16, 24))
    val = next(iter(data.val_dataloader()))
    paths = data.write_prediction(val["label"][0] > 0, tmp_path / "pred")
    assert [p.stem for p in paths] == [f"{t:05d}" for t in range(SOURCE_FRAMES)]
    written = np.stack([read_mask(p) for p in paths])
    # half size (nearest-exact keeps the odd rows and columns), then nearest back up
    truth = source_masks(davis_root, "blobs")[:, 1::2, 1::2] > 0
    expected = np.repeat(np.repeat(truth, 2, axis=1), 2, axis=2).astype(np.uint8)
    np.testing.assert_array_equal(written, expected)
    # fewer volume frames than source frames: every source frame is written (the results
    # layout needs them all), from the volume frame nearest in time; the volume shows source
    # frames 0, 2, 4, 7, 9, 11, and a tie goes to the earlier volume frame
    data = module(davis_root, frames=6, size=(16, 24))
    pred = torch.zeros(1, 6, 16, 24)
    for t in range(6):
        pred[0, t, 0, t] = 1  # volume frame t marks column t
    paths = data.write_prediction(pred, tmp_path / "six")
    assert [p.stem for p in paths] == [f"{t:05d}" for t in range(SOURCE_FRAMES)]
    written = np.stack([read_mask(p) for p in paths])  # (12, 32, 48): columns doubled
    marked = [int(np.nonzero(frame[0])[0][0]) // 2 for frame in written]
    assert marked == [0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5]
    np.testing.assert_array_equal(volume_frames(SOURCE_FRAMES, 6), marked)
    # 8 volume frames show source frames 0, 1, 1, 2, 2, 3, 3, 4: each from the first showing it
    np.testing.assert_array_equal(volume_frames(5, 8), [0, 1, 3, 5, 7])


# ------------------------------------------------------------------------------- errors


def test_constructor_reads_no_files(tmp_path):
    data = module(tmp_path / "nowhere")
    assert data.input_shape == (8, 16, 24) and data.out_channels == 1
    with pytest.raises(DataError, match="^data.root: directory not found: .*nowhere$"):
        data.setup()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"frames": 0}, "data.frames"),
        ({"size": (16,)}, "data.size"),
        ({"size": "16x24"}, "data.size"),
        ({"annotated_frames": 9}, "data.annotated_frames"),
        ({"annotated_frames": [0, 8]}, "data.annotated_frames"),
        ({"annotated_frames": [1, 1]}, "data.annotated_frames"),
        ({"annotated_frames": True}, "data.annotated_frames"),
        ({"objects": "some"}, "data.objects"),
        ({"metrics_convention": "toolkit"}, "data.metrics_convention"),
        ({"sequence": "../up"}, "data.sequence"),
        ({"steps_per_epoch": 0}, "data.steps_per_epoch"),
        ({"flip_prob": 2}, "data.flip_prob"),
        ({"roll": [True, False]}, "data.roll"),
        ({"roll": "yes"}, "data.roll"),
        ({"generate": True}, "data.video_frames"),
    ],
)
def test_config_errors_name_the_key(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        module(tmp_path, **kwargs)


def test_not_a_davis_folder(tmp_path):
    with pytest.raises(DataError, match="has no JPEGImages/480p folder"):
        module(tmp_path).setup()


def test_unknown_sequence_lists_the_available_ones(davis_root):
    with pytest.raises(DataError) as info:
        module(davis_root, sequence="bear").setup()
    message = str(info.value)
    assert message.startswith("data.sequence='bear': no such sequence in ")
    assert message.endswith("available: blobs, voided") and "\n" not in message
    assert find_sequences(davis_root) == ["blobs", "voided"]


def copy_sequence(davis_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    for folder in ("JPEGImages", "Annotations"):
        shutil.copytree(davis_root / folder / "480p" / "blobs", root / folder / "480p" / "blobs")
    return root


def test_frame_mask_count_mismatch(davis_root, tmp_path):
    root = copy_sequence(davis_root, tmp_path)
    (root / "Annotations" / "480p" / "blobs" / "00007.png").unlink()
    with pytest.raises(DataError) as info:
        module(root).setup()
    message = str(info.value)
    assert "has 11 masks for 12 frames" in message and message.endswith("00007.jpg")


def test_mask_colours_outside_the_palette(davis_root, tmp_path):
    root = copy_sequence(davis_root, tmp_path)
    path = root / "Annotations" / "480p" / "blobs" / "00000.png"
    rgb = DAVIS_PALETTE[read_mask(path)]
    rgb[3, 5] = (10, 200, 30)
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError, match=r"00000.png: colour \(10, 200, 30\) at pixel \(row 3, col"):
        module(root).setup()
    # an RGB mask in DAVIS colours reads like the palette PNG
    rgb[3, 5] = DAVIS_PALETTE[2]
    Image.fromarray(rgb).save(path)
    assert read_mask(path)[3, 5] == 2
    # a palette index beyond the file's palette
    short = Image.fromarray(np.full((4, 4), 3, dtype=np.uint8), mode="P")
    short.putpalette(DAVIS_PALETTE[:3].tobytes())
    short.save(tmp_path / "short.png")
    with pytest.raises(
        DataError, match="short.png: palette index 3 is outside the file's 3-colour"
    ):
        read_mask(tmp_path / "short.png")


def test_mask_index_drawn_like_the_background(davis_root, tmp_path):
    # the palette lists the sequence's objects and is padded to 256 entries with black, as many
    # tools write it: index 5 is drawn black like the background but would train as object 5
    root = copy_sequence(davis_root, tmp_path)
    path = root / "Annotations" / "480p" / "blobs" / "00000.png"
    mask = read_mask(path)
    mask[2:4, 2:5] = 5
    padded = np.zeros((256, 3), dtype=np.uint8)
    padded[:3] = DAVIS_PALETTE[:3]
    padded[VOID_INDEX] = DAVIS_PALETTE[VOID_INDEX]
    image = Image.fromarray(mask, mode="P")
    image.putpalette(padded.tobytes())
    image.save(path)
    with Image.open(path) as check:
        assert len(check.getpalette()) == 3 * 256
    with pytest.raises(DataError) as info:
        module(root).setup()
    assert str(info.value) == (
        f"{path}: palette index 5 (6 pixels) is drawn (0, 0, 0) like the background (index 0), "
        "so it is no object of the sequence; fix the mask or its palette"
    )
    # the same mask with the DAVIS palette is object 5
    image.putpalette(DAVIS_PALETTE.tobytes())
    image.save(path)
    assert (read_mask(path) == 5).sum() == 6


def test_davis_2016_binary_masks(tmp_path):
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8), mode="L").save(
        tmp_path / "m.png"
    )
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[0, 1], [1, 0]])


def test_mask_size_mismatch(davis_root, tmp_path):
    root = copy_sequence(davis_root, tmp_path)
    path = root / "Annotations" / "480p" / "blobs" / "00000.png"
    Image.open(path).resize((10, 10)).save(path)
    with pytest.raises(
        DataError, match="00000.png: mask size 10x10 differs from its frame's 48x32"
    ):
        module(root).setup()


def test_generate_makes_and_then_reuses_the_demo_video(tmp_path):
    kwargs = {"generate": True, "video_frames": 10, "video_size": (16, 24)}
    data = module(tmp_path / "demo", **kwargs)
    data.setup()
    assert (tmp_path / "demo" / "Annotations" / "480p" / "blobs" / "00009.png").is_file()
    module(tmp_path / "demo", **kwargs).setup()  # same settings: kept
    with pytest.raises(DataError, match="^data.root: .*holds a synthetic video"):
        module(tmp_path / "demo", generate=True, video_frames=12, video_size=(16, 24)).setup()


def test_training_on_an_unknown_sequence_exits_with_one_line(davis_root, tmp_path, capsys):
    """What ``python train.py data=davis data.sequence=bear`` does, in process."""
    from revseg.cli import exit_on_error
    from revseg.training.trainer import train

    cfg = compose_train(
        "data=davis",
        f"data.root={davis_root}",
        "data.sequence=bear",
        "model.channels=[8,16,24]",
        "model.norm_groups=2",
        f"paths.output_dir={tmp_path}",
    )
    with pytest.raises(SystemExit) as info, exit_on_error():
        train(cfg)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: data.sequence='bear': no such sequence")
    assert lines[0].endswith("available: blobs, voided")


def test_check_data_script_on_davis(davis_root, tmp_path, capsys):
    from helpers import load_script

    script = load_script("check_data")
    args = ["data=davis", "data.sequence=blobs"]
    assert script.main([*args, f"data.root={davis_root}"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "DAVIS sequence blobs (480p), 12 frames" in out.err
    assert "no problems" in out.err
    # a mask of another size and one with an index drawn like the background: a line each
    root = copy_sequence(davis_root, tmp_path)
    masks = root / "Annotations" / "480p" / "blobs"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(masks / "00003.png")
    bad = Image.fromarray(np.full((*SOURCE_SIZE,), 7, dtype=np.uint8), mode="P")
    bad.putpalette(bytes(3 * 256))
    bad.save(masks / "00005.png")
    assert script.main([*args, f"data.root={root}"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[:2] for line in lines] == [
        ["blobs", str(masks / "00003.png")],
        ["blobs", str(masks / "00005.png")],
    ]
    assert "mask size 8x8 differs from its frame's 48x32" in lines[0]
    assert "palette index 7" in lines[1]
    assert script.main([*args, f"data.root={root}", "--quick"]) == 1  # sizes: headers only
    assert len(capsys.readouterr().out.splitlines()) == 1
