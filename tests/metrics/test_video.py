"""Video metrics on hand-made predictions: IoU of the video and per frame, J, Dice, void, plots."""

import math

import numpy as np
import pytest
import torch

from revseg.metrics.video import VOID, VideoMetrics, iou_per_frame_plot, overlay_frame

T, H, W = 4, 8, 8


def logits_of(mask: torch.Tensor) -> torch.Tensor:
    """Confident logits that threshold to ``mask``."""
    return torch.where(mask.bool(), 8.0, -8.0)


def square_video() -> torch.Tensor:
    """``(1, 1, T, H, W)``: a 4x4 object in every frame (16 pixels a frame)."""
    target = torch.zeros(1, 1, T, H, W)
    target[..., 2:6, 2:6] = 1
    return target


def test_perfect_prediction_scores_one():
    metrics = VideoMetrics(annotated_frames=[1])
    target = square_video()
    pred = metrics.update(logits_of(target), target)
    torch.testing.assert_close(pred, target)
    out = metrics.compute()
    for key in ("iou_object", "iou_background", "iou_mean", "dice_object", "dice_mean"):
        assert out[key] == pytest.approx(1.0), key
    for key in ("j_mean", "j_recall", "j_mean_annotated", "j_mean_unannotated"):
        assert out[key] == pytest.approx(1.0), key
    torch.testing.assert_close(metrics.per_frame_iou(), torch.ones(T, 1))


def test_disjoint_prediction_scores_zero():
    metrics = VideoMetrics()
    target = square_video()
    wrong = torch.zeros_like(target)
    wrong[..., 0:2, 6:8] = 1  # elsewhere
    metrics.update(logits_of(wrong), target)
    out = metrics.compute()
    assert out["iou_object"] == 0.0 and out["dice_object"] == 0.0
    assert out["j_mean"] == 0.0 and out["j_recall"] == 0.0
    # background: true and predicted everywhere but on the 16 + 4 object pixels of a frame;
    # their union is every pixel
    background = (H * W - 16 - 4) / (H * W)
    assert out["iou_background"] == pytest.approx(background)
    assert out["iou_mean"] == pytest.approx(background / 2)


def test_per_frame_values_and_pooled_iou():
    metrics = VideoMetrics(annotated_frames=[0, 2])
    target = square_video()
    pred = target.clone()
    pred[0, 0, 1, 2:4, 2:6] = 0  # frame 1: half the object -> 8 / 16
    pred[0, 0, 2, 0, 0] = 1  # frame 2: one false positive -> 16 / 17
    pred[0, 0, 3] = 0  # frame 3: missed -> 0
    metrics.update(logits_of(pred), target)
    expected = torch.tensor([1.0, 0.5, 16 / 17, 0.0])
    torch.testing.assert_close(metrics.per_frame_iou()[:, 0], expected)
    out = metrics.compute()
    assert out["j_mean"] == pytest.approx(float(expected.mean()))
    assert out["j_recall"] == pytest.approx(0.5)  # frames 0 and 2 above 0.5
    assert out["j_mean_annotated"] == pytest.approx((1.0 + 16 / 17) / 2)
    assert out["j_mean_unannotated"] == pytest.approx(0.25)
    # pooled over the video: intersection 16 + 8 + 16 + 0, union 16 + 16 + 17 + 16
    assert out["iou_object"] == pytest.approx(40 / 65)
    assert out["dice_object"] == pytest.approx(2 * 40 / (64 + 41))


def test_empty_frames_count_as_perfect_when_both_empty():
    metrics = VideoMetrics()
    target = square_video()
    target[0, 0, 0] = 0  # the object leaves in frame 0
    metrics.update(logits_of(target), target)
    torch.testing.assert_close(metrics.per_frame_iou()[:, 0], torch.ones(T))


def test_void_voxels_are_ignored():
    target = square_video()
    target[0, 0, :, 1, :] = VOID  # a void row in every frame
    pred = target.clone().clamp(0, 1)
    pred[0, 0, :, 1, :] = 1  # any prediction on void is not counted
    metrics = VideoMetrics()
    metrics.update(logits_of(pred), target)
    out = metrics.compute()
    assert out["iou_object"] == 1.0 and out["iou_background"] == 1.0 and out["j_mean"] == 1.0
    pred[0, 0, :, 1, :] = 0
    metrics.reset()
    metrics.update(logits_of(pred), target)
    assert metrics.compute()["iou_mean"] == 1.0


def test_mean_over_videos_and_reset():
    metrics = VideoMetrics()
    target = square_video().repeat(2, 1, 1, 1, 1)
    pred = target.clone()
    pred[1] = 0  # second video: nothing predicted
    metrics.update(logits_of(pred), target)
    out = metrics.compute()
    assert out["iou_object"] == pytest.approx(0.5)
    assert out["j_mean"] == pytest.approx(0.5)
    metrics.reset()
    assert all(math.isnan(v) for v in metrics.compute().values())
    assert metrics.figures() == {}


def test_several_object_channels():
    metrics = VideoMetrics(names=("object1", "object2"))
    target = torch.zeros(1, 2, T, H, W)
    target[:, 0, :, 0:3, 0:3] = 1
    target[:, 1, :, 5:8, 5:8] = 1
    pred = target.clone()
    pred[:, 1] = 0
    metrics.update(logits_of(pred), target)
    out = metrics.compute()
    assert out["iou_object1"] == 1.0 and out["iou_object2"] == 0.0
    assert out["dice_mean"] == pytest.approx(0.5)
    assert out["j_mean"] == pytest.approx(0.5)
    assert metrics.per_frame_iou().shape == (T, 2)


def test_shape_errors():
    metrics = VideoMetrics()
    with pytest.raises(ValueError, match="channels"):
        metrics.update(torch.zeros(1, 2, T, H, W), torch.zeros(1, 2, T, H, W))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        metrics.update(torch.zeros(1, 1, H, W), torch.zeros(1, 1, H, W))


@pytest.mark.parametrize("backend", ["matplotlib", "pillow"])
def test_figure_is_an_image_with_the_curve(backend):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    curve = np.array([[1.0, 1.0, 0.0, 0.0, 1.0]])
    image = iou_per_frame_plot(curve, annotated_frames=[1], size=(200, 400), backend=backend)
    assert image.shape == (3, 200, 400) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # the curve's colour (blue) is drawn, and the plot is not blank
    blue = (image[2] > 0.5) & (image[0] < 0.4)
    assert blue.sum() > 50
    assert (image.std(0) > 0).any()


def test_figures_of_metrics():
    metrics = VideoMetrics(annotated_frames=[0])
    target = square_video()
    metrics.update(logits_of(target), target)
    figures = metrics.figures()
    assert list(figures) == ["iou_per_frame"]
    image = figures["iou_per_frame"]
    assert image.ndim == 3 and image.shape[0] == 3 and image.shape[1] > 100
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


class _DeviceTensor(torch.Tensor):
    """Stands for a CUDA tensor: ``numpy()`` refuses it, as torch refuses a CUDA tensor."""

    def numpy(self, *args, **kwargs):  # type: ignore[override]
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    def cpu(self, *args, **kwargs):  # type: ignore[override]
        return torch.Tensor._make_subclass(torch.Tensor, self.detach())


def test_figures_of_metrics_on_a_gpu(monkeypatch):
    """The per-frame IoU lives on the metrics' device (CUDA in training); the figure copies it to
    the CPU instead of calling numpy() on it (the first validation of a video model on a GPU
    crashed there)."""
    metrics = VideoMetrics(annotated_frames=[0])
    target = square_video()
    metrics.update(logits_of(target), target)
    on_device = torch.Tensor._make_subclass(_DeviceTensor, metrics.per_frame_iou())
    monkeypatch.setattr(metrics, "per_frame_iou", lambda: on_device)
    with pytest.raises(TypeError):
        on_device.T.numpy()  # the stand-in behaves as a CUDA tensor does
    assert list(metrics.figures()) == ["iou_per_frame"]


def test_overlay_colours_errors():
    image = torch.zeros(3, T, H, W)
    label = square_video()[0]
    label[0, T // 2, 0, 0] = VOID
    pred = label.clamp(0, 1).clone()
    pred[0, T // 2, 2:4, 2:6] = 0  # missed: blue
    pred[0, T // 2, 7, 7] = 1  # false positive: red
    overlay = overlay_frame(image, label, pred)
    assert overlay.shape == (3, H, W)
    assert overlay[:, 4, 4].argmax() == 1  # hit: green
    assert overlay[:, 2, 2].argmax() == 2  # missed: blue
    assert overlay[:, 7, 7].argmax() == 0  # false positive: red
    torch.testing.assert_close(overlay[:, 0, 0], torch.full((3,), 0.55 * 0.6))  # void: grey
    torch.testing.assert_close(overlay[:, 0, 7], torch.zeros(3))  # true negative: the frame
