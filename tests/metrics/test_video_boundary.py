"""DAVIS boundary F and J&F against the benchmark's definition written out plainly here: the
boundary map pixel by pixel, the tolerance as a dilation by an explicit disk."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from revseg.metrics.video import VOID, VideoMetrics, boundary_f, boundary_map


def reference_boundary(seg):
    """``seg2bmap``: a pixel differing from its right, lower or lower-right neighbour (on the
    last row only the right one counts, on the last column only the lower one, the corner never)."""
    h, w = seg.shape
    out = np.zeros_like(seg, dtype=bool)
    for y in range(h):
        for x in range(w):
            right = seg[y, x + 1] if x + 1 < w else False
            down = seg[y + 1, x] if y + 1 < h else False
            diagonal = seg[y + 1, x + 1] if x + 1 < w and y + 1 < h else False
            if y == h - 1 and x == w - 1:
                value = False
            elif y == h - 1:
                value = seg[y, x] != right
            elif x == w - 1:
                value = seg[y, x] != down
            else:
                value = seg[y, x] != right or seg[y, x] != down or seg[y, x] != diagonal
            out[y, x] = value
    return out


def reference_f(pred, truth, void=None, bound_th=0.008):
    if void is not None:
        pred, truth = pred & ~void, truth & ~void
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape))
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = xx**2 + yy**2 <= radius**2
    fg, gt = reference_boundary(pred), reference_boundary(truth)
    fg_dil = ndimage.binary_dilation(fg, structure=disk)
    gt_dil = ndimage.binary_dilation(gt, structure=disk)
    n_fg, n_gt = fg.sum(), gt.sum()
    if n_fg == 0 and n_gt > 0:
        p, rec = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        p, rec = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        p, rec = 1.0, 1.0
    else:
        p, rec = (fg & gt_dil).sum() / n_fg, (gt & fg_dil).sum() / n_gt
    return 0.0 if p + rec == 0 else 2 * p * rec / (p + rec)


def blob(shape, centre, radius):
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + ((xx - centre[1]) / 1.5) ** 2 <= radius**2


@pytest.mark.parametrize("seed", range(4))
def test_boundary_f_equals_the_davis_definition(seed):
    rng = np.random.default_rng(seed)
    shape = (60, 90) if seed % 2 else (37, 41)
    truth = blob(shape, (20, 25), 10) | blob(shape, (30, 60), 5)
    pred = ndimage.binary_dilation(truth, iterations=int(rng.integers(1, 4)))
    pred = np.roll(pred, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1))
    pred ^= rng.random(shape) < 0.02  # speckle
    void = np.zeros(shape, bool)
    void[:, : int(rng.integers(0, 10))] = True
    np.testing.assert_array_equal(boundary_map(truth), reference_boundary(truth))
    for th in (0.008, 0.05, 2):
        assert boundary_f(pred, truth, void, th) == pytest.approx(
            reference_f(pred, truth, void, th), abs=1e-12
        )
    assert 0.0 < boundary_f(pred, truth) < 1.0


def test_boundary_f_edge_cases():
    empty = np.zeros((20, 20), bool)
    square = empty.copy()
    square[5:10, 5:10] = True
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(square, empty) == 0.0 and boundary_f(empty, square) == 0.0
    assert boundary_f(square, square) == 1.0
    far = np.roll(square, 8, axis=1)
    assert boundary_f(far, square) == 0.0  # 8 pixels off, tolerance ceil(0.008 * 28.3) = 1
    assert boundary_f(np.roll(square, 1, axis=1), square) == pytest.approx(
        reference_f(np.roll(square, 1, axis=1), square)
    )


def test_video_metrics_report_f_and_j_and_f():
    target = torch.zeros(1, 1, 3, 24, 24)
    target[..., 6:14, 6:14] = 1
    target[0, 0, 2] = 0  # no object in the last frame
    pred = target.clone()
    pred[0, 0, 1] = torch.roll(target[0, 0, 1], 3, dims=1)  # frame 1 shifted by 3 pixels
    pred[0, 0, 2, 0:3, 0:3] = 1  # frame 2: a false positive where there is no object
    target[0, 0, 0, 0, :] = VOID  # void pixels in frame 0
    metrics = VideoMetrics()
    metrics.update(torch.where(pred.bool(), 8.0, -8.0), target)
    out = metrics.compute()
    void = (target[0, 0] == VOID).numpy()
    truth = (target[0, 0] == 1).numpy()
    expected = [reference_f(pred[0, 0, t].numpy() > 0, truth[t], void[t]) for t in range(3)]
    assert expected[0] == 1.0 and 0 < expected[1] < 1 and expected[2] == 0.0
    torch.testing.assert_close(
        metrics.per_frame_f()[:, 0], torch.tensor(expected, dtype=torch.float32)
    )
    assert out["f_mean"] == pytest.approx(np.mean(expected))
    assert out["f_object"] == pytest.approx(np.mean(expected))
    assert out["f_recall"] == pytest.approx(np.mean([e > 0.5 for e in expected]))
    assert out["jf_mean"] == pytest.approx((out["j_mean"] + out["f_mean"]) / 2)
    assert out["j_object"] == pytest.approx(out["j_mean"])
