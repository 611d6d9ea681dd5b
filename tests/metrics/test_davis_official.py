"""DAVIS J and F in the official (davis2017-evaluation, semi-supervised) convention and in revseg's,
against values worked out by hand in the comments: a shifted square, the boundary tolerance at
its threshold, the frame set, void, swapped / missing / late objects, non-contiguous ids, the
per-object statistics, and scoring at the annotations' resolution."""

import math

import numpy as np
import pytest
import torch

from revseg.metrics.video import (
    Annotations,
    VideoMetrics,
    boundary_f,
    davis_statistics,
    jaccard,
    score_sequence,
    summarize_objects,
)


def square(shape, rows, cols, value=1):
    out = np.zeros(shape, dtype=np.uint8)
    out[..., rows[0] : rows[1], cols[0] : cols[1]] = value
    return out


def logits_of(mask) -> torch.Tensor:
    return torch.where(torch.as_tensor(mask).bool(), 8.0, -8.0)


# ------------------------------------------------------------------ one frame, one object


def test_shifted_square_by_hand():
    # truth: rows 10..19, cols 10..19 of 40x40; prediction shifted right by 2
    truth = square((40, 40), (10, 20), (10, 20)) > 0
    pred = square((40, 40), (10, 20), (12, 22)) > 0
    # J: overlap 10 x 8 = 80, union 100 + 100 - 80 = 120
    assert jaccard(pred, truth) == pytest.approx(2 / 3)
    # F: tolerance ceil(0.008 * 56.6) = 1 pixel. Each boundary is the ring of an 11x11 box
    # (40 pixels): truth rows/cols 9 and 19, prediction rows 9 and 19, cols 11 and 21. Of the
    # prediction's ring, 10 of 11 pixels of the top row and of the bottom row lie within 1 of
    # the truth's, 2 of the 9 left-column pixels between them (next to the rows), none of the
    # right column: precision 22 / 40; recall the same by symmetry; F = 0.55
    assert boundary_f(pred, truth) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "shape, radius",
    [((100, 100), 2), ((480, 854), 8)],  # ceil(0.008 * 141.4) = 2; ceil(0.008 * 979.6) = 8
)
def test_boundary_tolerance_at_its_threshold(shape, radius):
    # truth: the columns left of c; prediction: d more. Both boundaries are one full column
    # (c - 1 and c + d - 1), d apart: F = 1 up to the radius, 0 beyond; J = c / (c + d)
    c = 40
    truth = np.zeros(shape, dtype=bool)
    truth[:, :c] = True
    for d, expected in ((radius, 1.0), (radius + 1, 0.0)):
        pred = np.zeros(shape, dtype=bool)
        pred[:, : c + d] = True
        assert boundary_f(pred, truth) == expected, d
        assert jaccard(pred, truth) == pytest.approx(c / (c + d))


def test_empty_masks():
    empty = np.zeros((10, 10), dtype=bool)
    full = square((10, 10), (2, 6), (2, 6)) > 0
    assert jaccard(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert jaccard(full, empty) == 0.0 and boundary_f(full, empty) == 0.0
    assert jaccard(empty, full) == 0.0 and boundary_f(empty, full) == 0.0


# ------------------------------------------------------------------------------ sequences


def test_official_frames_leave_out_the_first_and_the_last():
    # 5 frames, the object right in frames 1..3 and not predicted in frames 0 and 4
    truth = square((5, 12, 12), (3, 8), (3, 8))
    pred = truth.copy()
    pred[[0, 4]] = 0
    official = score_sequence(pred, truth, "official", "seq")
    assert official.frames == (1, 2, 3)
    np.testing.assert_array_equal(official.j, [[1, 1, 1]])
    np.testing.assert_array_equal(official.f, [[1, 1, 1]])
    revseg = score_sequence(pred, truth, "revseg", "seq")
    assert revseg.frames == (0, 1, 2, 3, 4)
    np.testing.assert_array_equal(revseg.j, [[0, 1, 1, 1, 0]])  # 3 of 5 frames right
    # a sequence of 2 frames has no frame to score officially: NaN, not a number made up
    short = score_sequence(pred[:2], truth[:2], "official", "seq")
    assert short.j.shape == (1, 0) and math.isnan(summarize_objects([short])["jf_mean"])


def test_void_counts_as_background_officially():
    # 10x10 frames (tolerance ceil(0.008 * 14.1) = 1): object rows 2..5, cols 2..5 (16 px),
    # void at cols 6..7 of those rows (255); the prediction covers object and void (24 px)
    truth = square((3, 10, 10), (2, 6), (2, 6))
    truth[:, 2:6, 6:8] = 255
    pred = square((3, 10, 10), (2, 6), (2, 8))
    official = score_sequence(pred, truth, "official", "seq")
    assert official.object_ids == (1,)  # void is no object
    # J = 16 / 24. F: boundary rings of the boxes rows 1..5 x cols 1..5 (truth, 16 px) and
    # cols 1..7 (prediction, 20 px). Prediction pixels within 1 of the truth's: rows 1 and 5
    # at cols 1..6 (12) and col 1 (3): precision 15 / 20; truth pixels within 1 of the
    # prediction's: all but (3, 5): recall 15 / 16; F = 2PR / (P + R) = 5 / 6
    np.testing.assert_allclose(official.j, [[2 / 3]])
    np.testing.assert_allclose(official.f, [[5 / 6]])
    # revseg leaves void out of both: the prediction is then the truth
    revseg = score_sequence(pred, truth, "revseg", "seq")
    np.testing.assert_array_equal(revseg.j, [[1, 1, 1]])
    np.testing.assert_array_equal(revseg.f, [[1, 1, 1]])


def two_objects(frames=3):
    """Object 1 at cols 2..5, object 2 at cols 12..15 (rows 2..5) of 10x20 frames."""
    truth = square((frames, 10, 20), (2, 6), (2, 6), 1)
    truth[:, 2:6, 12:16] = 2
    return truth


def test_swapped_objects_score_zero_per_object():
    truth = two_objects()
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0)).astype(np.uint8)
    scores = score_sequence(swapped, truth, "official", "seq")
    np.testing.assert_array_equal(scores.j, [[0], [0]])
    np.testing.assert_array_equal(scores.f, [[0], [0]])  # boundaries 10 px apart, tolerance 1
    assert summarize_objects([scores])["jf_mean"] == 0.0
    # merged into one "any object" mask, the swap would be invisible
    assert jaccard(swapped > 0, truth > 0).tolist() == [1.0, 1.0, 1.0]


def test_a_missing_object():
    truth = two_objects()
    pred = np.where(truth == 1, 1, 0).astype(np.uint8)  # object 2 never predicted
    scores = score_sequence(pred, truth, "official", "seq")
    np.testing.assert_array_equal(scores.j, [[1], [0]])
    np.testing.assert_array_equal(scores.f, [[1], [0]])  # no predicted boundary: P, R = 1, 0
    out = summarize_objects([scores])
    assert (out["j_mean"], out["f_mean"], out["jf_mean"]) == (0.5, 0.5, 0.5)
    assert [row["object"] for row in scores.per_object()] == ["seq_1", "seq_2"]


def test_an_object_absent_in_some_frames_and_appearing_after_frame_0():
    # 6 frames (scored: 1..4); object 2 only in frames 1 and 2, never predicted. The toolkit
    # takes its objects from frame 0 and stops on a result holding index 2; revseg scores it.
    truth = two_objects(6)
    truth[[0, 3, 4, 5]] = np.where(truth[[0, 3, 4, 5]] == 2, 0, truth[[0, 3, 4, 5]])
    pred = np.where(truth == 1, 1, 0).astype(np.uint8)
    scores = score_sequence(pred, truth, "official", "seq")
    assert scores.object_ids == (1, 2) and scores.frames == (1, 2, 3, 4)
    # frames 1, 2: object 2 missed (0); frames 3, 4: absent and not predicted (1)
    np.testing.assert_array_equal(scores.j[1], [0, 0, 1, 1])
    np.testing.assert_array_equal(scores.f[1], [0, 0, 1, 1])
    row = scores.per_object()[1]
    # 4 frames: quarter points 1, 1.75, 2.5, 3.25, 4 -> 1, 2, 3, 3, 4: the first part is
    # frames 1..2 of 4 (values 0, 0), the last frames 3..4 (1, 1): decay 0 - 1
    assert (row["j_mean"], row["j_recall"], row["j_decay"]) == (0.5, 0.5, -1.0)


def test_non_contiguous_ids_score_only_the_objects_present():
    # ids 1 and 3: the toolkit would add an empty object 2; revseg scores the two there are
    truth = np.where(two_objects() == 2, 3, two_objects()).astype(np.uint8)
    scores = score_sequence(truth, truth, "official", "seq")
    assert scores.object_ids == (1, 3)
    assert [row["object"] for row in scores.per_object()] == ["seq_1", "seq_3"]
    # indices of no object (here 2) in the prediction count as background
    pred = np.where(truth == 3, 2, truth).astype(np.uint8)
    np.testing.assert_array_equal(score_sequence(pred, truth, "official").j, [[1], [0]])


def test_statistics_by_hand():
    # 6 frames: quarter points 1, 2.25, 3.5, 4.75, 6 -> 1, 2, 4, 5, 6 (halves up): first part
    # frames 1..2 (1.0, 0.8), last part frames 5..6 (0.2, 0.0); recall: 3 of 6 above 0.5
    assert davis_statistics([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]) == pytest.approx((0.5, 0.5, 0.8))
    # 10 frames: 1, 3.25, 5.5, 7.75, 10 -> 1, 3, 6, 8, 10: mean(0, 1, 2) - mean(7, 8, 9)
    assert davis_statistics(np.arange(10.0)) == pytest.approx((4.5, 0.9, -7.0))
    assert davis_statistics([0.5]) == (0.5, 0.0, 0.0)  # not above 0.5
    assert all(math.isnan(v) for v in davis_statistics([]))


def test_global_figures_are_means_over_objects():
    truth = two_objects()
    one = score_sequence(truth == 1, truth == 1, "official", "a")  # 1 object, J = F = 1
    missed = score_sequence(np.zeros_like(truth), truth, "official", "b")  # 2 objects, 0
    out = summarize_objects([one, missed])
    assert out["j_mean"] == pytest.approx(1 / 3) and out["f_mean"] == pytest.approx(1 / 3)
    assert out["jf_mean"] == pytest.approx(1 / 3) and out["j_recall"] == pytest.approx(1 / 3)


def test_bad_arguments():
    truth = two_objects()
    with pytest.raises(ValueError, match="convention"):
        score_sequence(truth, truth, "toolkit")
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        score_sequence(truth[:, :5], truth)
    with pytest.raises(ValueError, match="annotations"):
        VideoMetrics(convention="official")


# ------------------------------------------------- validation: the annotations' resolution


def annotations_8x8(channel_ids=(1,), object_ids=(1,), masks=None):
    if masks is None:  # 3 frames of 8x8: a 3x3 object at rows 2..4, cols 2..4
        masks = square((3, 8, 8), (2, 5), (2, 5))
    return Annotations("seq", masks, np.arange(len(masks)), channel_ids, object_ids)


def test_validation_scores_at_the_annotations_resolution():
    # a 2x2 block on the 4x4 grid is a 4x4 block (rows 2..5, cols 2..5) at 8x8: J = 9 / 16 on
    # the scored frame 1; on the grid the 3x3 object (nearest) would be matched exactly
    annotations = annotations_8x8()
    pred = square((1, 1, 3, 4, 4), (1, 3), (1, 3))
    metrics = VideoMetrics(["object"], convention="official", annotations=annotations)
    metrics.update(logits_of(pred), torch.from_numpy(pred).float())
    out = metrics.compute()
    assert out["j_mean"] == pytest.approx(9 / 16) and out["j_object1"] == pytest.approx(9 / 16)
    assert out["iou_object"] == 1.0  # the grid figures stay on the grid
    assert metrics.scored_frames() == [1]
    assert metrics.per_frame_iou().shape == (1, 1)
    assert set(metrics.figures()) == {"iou_per_frame"}


def test_validation_swapped_channels_and_frame_mapping():
    # two objects, one channel each; the network predicts each object's region in the other's
    # channel on 2 volume frames standing for 4 annotated frames (0, 0, 1, 1)
    masks = np.zeros((4, 6, 8), dtype=np.uint8)
    masks[:, 1:4, 0:3], masks[:, 1:4, 5:8] = 1, 2
    annotations = Annotations("seq", masks, np.array([0, 0, 1, 1]), (1, 2), (1, 2))
    swapped = torch.zeros(1, 2, 2, 6, 8)
    swapped[0, 0, :, 1:4, 5:8] = swapped[0, 1, :, 1:4, 0:3] = 1
    metrics = VideoMetrics(["object1", "object2"], convention="official", annotations=annotations)
    metrics.update(logits_of(swapped), swapped)
    out = metrics.compute()
    assert out["jf_mean"] == 0.0 and out["j_object1"] == out["j_object2"] == 0.0
    metrics.reset()
    right = swapped.flip(1)
    metrics.update(logits_of(right), right)
    assert metrics.compute()["jf_mean"] == 1.0 and metrics.scored_frames() == [1, 2]


def test_annotated_split_is_over_annotated_frames():
    # 5 annotated frames, scored 1..3; the prediction misses frame 2 only
    masks = square((5, 8, 8), (2, 5), (2, 5))
    annotations = Annotations("seq", masks, np.arange(5), (1,), (1,))
    pred = torch.from_numpy(masks[None, None] > 0).float()
    pred[:, :, 2] = 0
    metrics = VideoMetrics(
        ["object"], annotated_frames=[2, 4], convention="official", annotations=annotations
    )
    metrics.update(logits_of(pred), pred)
    out = metrics.compute()
    assert out["j_mean_annotated"] == 0.0 and out["j_mean_unannotated"] == 1.0
