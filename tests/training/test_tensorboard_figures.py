"""What a run shows in TensorBoard beyond scalars: one hparams session per run whose metrics are
the end of the run, also after a resume; a labelled validation figure (input, truth, prediction,
one opaque colour per region or label, a legend) for BraTS, nnU-Net labels and video, written as
``val_slice.png`` too."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from trainer_builder import make_trainer

from helpers import Writer
from revseg.data.figures import PALETTE, frame_figure, slice_panel
from revseg.metrics.video import VOID
from revseg.training.hparams import write_hparams
from revseg.training.trainer import train

from conftest import TINY, compose_train

SESSION_START = "_hparams_/session_start_info"


def events(run):
    """Every event of every event file under ``run``, as written (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    for path in sorted(run.rglob("*tfevents*")):
        yield from LegacyEventFileLoader(str(path)).Load()


def sessions_and_values(run, tag: str):
    """The number of hparams sessions started in ``run`` and ``tag``'s ``(step, value)``s."""
    started, values = 0, []
    for event in events(run):
        for value in event.summary.value:
            started += value.tag == SESSION_START
            if value.tag == tag:
                values.append((event.step, value.simple_value))
    return started, values


def test_resumed_run_has_one_hparams_session_with_the_final_metrics(tmp_path, tiny_data_root):
    """Before, a resumed run wrote a second session: two ``hparam/dice_mean`` at step 0."""
    run = tmp_path / "run"
    common = [*TINY, f"data.root={tiny_data_root}", f"paths.output_dir={run}"]
    first = train(compose_train(*common))
    started, values = sessions_and_values(run, "hparam/dice_mean")
    assert started == 1
    assert [v for _, v in values] == [np.float32(first["final_metrics"]["val/dice_mean"])]
    resumed = train(compose_train(*common, "trainer.max_epochs=2", "trainer.resume=true"))
    started, values = sessions_and_values(run, "hparam/dice_mean")
    assert started == 1
    assert values == [(2, np.float32(resumed["final_metrics"]["val/dice_mean"]))]
    # TensorBoard itself reads the run folder as one run with one session and these values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("hparam/dice_mean")] == values
    content = acc.PluginTagToContent("hparams")[SESSION_START]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["model"].string_value  # the network's name
    assert start.hparams["lr"].number_value == 1e-3
    assert {e.step for e in acc.Scalars("val/dice_mean")} == {1, 2}  # the training scalars stay


def test_write_hparams_replaces_the_session(tmp_path):
    write_hparams(tmp_path, {"model": "a"}, {"hparam/dice_mean": 0.25}, step=1)
    (tmp_path / "events.out.tfevents.0000000001.host.hparams").write_bytes(b"")  # an older one
    path = write_hparams(tmp_path, {"model": "a"}, {"hparam/dice_mean": 0.5}, step=3)
    assert sorted(tmp_path.iterdir()) == [path]
    assert sessions_and_values(tmp_path, "hparam/dice_mean") == (1, [(3, 0.5)])


def nested_regions(shape=(32, 32, 32)):
    """WT ⊇ TC ⊇ ET, centred squares through every slice."""
    label = torch.zeros(3, *shape)
    label[0, 8:24, 8:24] = 1
    label[1, 12:20, 12:20] = 1
    label[2, 14:18, 14:18] = 1
    return label


def colours(figure: torch.Tensor) -> set[tuple[int, int, int]]:
    """The colours of a figure that are not grey (text and input are grey; labels are not)."""
    pixels = (figure.permute(1, 2, 0) * 255).round().to(torch.int64).reshape(-1, 3)
    grey = (pixels.max(1).values - pixels.min(1).values) <= 2
    return {tuple(p) for p in pixels[~grey].unique(dim=0).tolist()}


def titled(figure: torch.Tensor, panels: int) -> bool:
    """Dark (text) pixels in the band above each of ``panels`` equal columns."""
    band = figure[:, :20].min(0).values < 0.4
    return all(part.any() for part in band.chunk(panels, dim=1))


def test_brats_figure_is_large_labelled_and_colours_do_not_mix():
    """Before: a (3, 32, 96) strip, regions added as red + green + blue (WT+TC yellow)."""
    label = nested_regions()
    pred = torch.roll(label, 3, dims=1)
    figure = slice_panel(torch.randn(4, 32, 32, 32), label, pred)
    assert figure.shape[0] == 3 and figure.shape[1] >= 192 + 40 and figure.shape[2] >= 3 * 192
    assert 0 <= figure.min() and figure.max() <= 1
    assert titled(figure, 3)
    # only the three regions' colours: each pixel the innermost region's (ET over TC over WT)
    assert colours(figure) == set(PALETTE[:3])
    rgb = (figure.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    count = {name: np.all(rgb == c, -1).sum() for name, c in zip(("wt", "tc", "et"), PALETTE)}
    scale = math.ceil(192 / 32)
    legend = 14 * 14  # the swatch inside its outline
    assert count["et"] == 2 * 4 * 4 * scale**2 + legend  # truth and prediction
    assert count["tc"] == 2 * (8 * 8 - 4 * 4) * scale**2 + legend
    assert count["wt"] == 2 * (16 * 16 - 8 * 8) * scale**2 + legend


def test_nnunet_preview_names_and_colours_its_labels():
    """One-hot labels with the background first: the background is not coloured."""
    from revseg.data.nnunet_data import NnUNetData

    spec = SimpleNamespace(
        foreground_names=("left", "right"), region_based=False, channel_names=("MRI",)
    )
    label = torch.zeros(3, 20, 24, 8)
    label[0] = 1
    label[1, 2:8, 2:8], label[0, 2:8, 2:8] = 1, 0
    label[2, 10:16, 10:20], label[0, 10:16, 10:20] = 1, 0
    figure = NnUNetData.preview(SimpleNamespace(spec=spec), torch.rand(1, 20, 24, 8), label, label)
    assert colours(figure) == set(PALETTE[:2])
    assert titled(figure, 3) and figure.shape[-1] >= 3 * 192


def test_video_figure_colours_each_object_and_void():
    image = torch.rand(3, 5, 40, 60)
    label = torch.zeros(2, 5, 40, 60)
    label[0, :, 5:15, 5:20] = 1
    label[1, :, 20:35, 30:55] = 1
    label[:, :, 16:19] = VOID
    figure = frame_figure(image, label, (label == 1).float(), ("object1", "object2"))
    assert figure.shape[-1] >= 4 * 192 and titled(figure, 4)
    assert set(PALETTE[:2]) <= colours(figure)


class ImageWriter(Writer):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, dict[int, torch.Tensor]] = {}

    def add_image(self, tag, image, step) -> None:
        self.images.setdefault(tag, {})[step] = image


def test_validation_writes_the_figure_to_tensorboard_and_the_run_directory(
    tmp_path, tiny_data_root
):
    trainer = make_trainer(tmp_path, tiny_data_root)
    trainer.writer = writer = ImageWriter()
    trainer.validate()
    shown = writer.images["val/slice_input_label_prediction"][0]
    png = np.asarray(Image.open(tmp_path / "val_slice.png"))
    assert png.shape == (shown.shape[1], shown.shape[2], 3) and png.shape[0] >= 192
    assert np.array_equal(png, (shown.permute(1, 2, 0) * 255).round().byte().numpy())
    assert not list(tmp_path.glob(".val_slice.png.*"))  # written atomically, nothing left over
