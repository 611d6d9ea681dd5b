"""BraTS metrics against values computed independently here: borders from the six neighbours,
distances by brute force between border voxel coordinates in mm (no distance transform), the
official definitions written out plainly. Every edge case of the official tool, and each
deliberate difference from it (voxel spacing), on small volumes."""

import math

import numpy as np
import pytest
import torch

from revseg.data.layouts import BRATS, BRATS2023, BRATS2024, MSD
from revseg.errors import ConfigError, DataError
from revseg.metrics.brats import (
    HD95_MAX,
    HD95_MAX_STRICT,
    RegionMetrics,
    case_metrics,
    hd95,
    label_regions,
    lesion_metrics,
    missing_case_metrics,
    summarize,
)

SHAPE = (20, 18, 16)
GRID = np.indices(SHAPE)


def ball(centre, radius):
    return sum((g - c) ** 2 for g, c in zip(GRID, centre)) <= radius**2


def border(mask):
    """Voxels of ``mask`` with a 6-neighbour outside it (outside the volume counts as outside)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def directed(a, b, spacing):
    """For each border voxel of ``a``: the distance (mm) to the nearest border voxel of ``b``,
    by brute force over all pairs (index difference times the spacing)."""
    steps = np.argwhere(border(a))[:, None, :] - np.argwhere(border(b))[None, :, :]
    return np.sqrt(((steps * np.asarray(spacing, dtype=np.float64)) ** 2).sum(-1)).min(axis=1)


def official_hd95(a, b, spacing=(1, 1, 1)):
    return float(
        np.percentile(np.concatenate([directed(a, b, spacing), directed(b, a, spacing)]), 95)
    )


def strict_hd95(a, b, spacing=(1, 1, 1)):
    return max(
        np.percentile(directed(a, b, spacing), 95), np.percentile(directed(b, a, spacing), 95)
    )


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


TRUTH = ball((10, 9, 8), 5)  # 222 border voxels
BLOB = np.zeros(SHAPE, bool)
BLOB[:2, :2, :4] = True  # 16 border voxels: 3.5 % of both directions' distances, 6.7 % of one
CASES = {
    "identical": TRUTH,
    "eroded": ball((10, 9, 8), 3),
    "dilated": ball((10, 9, 8), 6),
    "shifted": np.roll(TRUTH, (2, 1, 0), axis=(0, 1, 2)),
    "distant false positive": TRUTH | BLOB,
}


@pytest.mark.parametrize("name", CASES)
def test_dice_and_hd95_equal_the_official_definition(name):
    pred = CASES[name]
    out = case_metrics(pred[None], TRUTH[None], regions=("WT",))
    assert out["dice_WT"] == pytest.approx(dice(pred, TRUTH), abs=1e-12)
    assert out["hd95_WT"] == pytest.approx(official_hd95(pred, TRUTH), abs=1e-6)
    strict = case_metrics(pred[None], TRUTH[None], convention="strict", regions=("WT",))
    assert strict["hd95_WT"] == pytest.approx(strict_hd95(pred, TRUTH), abs=1e-6)
    assert strict["hd95_WT"] >= out["hd95_WT"]


def test_a_small_distant_false_positive_is_invisible_to_the_official_hd95_only():
    pred = CASES["distant false positive"]
    assert hd95(pred, TRUTH) == 0.0  # fewer than 5 % of the border distances are non-zero
    assert hd95(pred, TRUTH, convention="strict") > 8.0  # the blob is 8.5 to 13 mm away


def test_edge_cases_official_and_strict():
    empty = np.zeros(SHAPE, bool)
    far = ball((3, 3, 3), 2)
    near = ball((15, 14, 12), 2)
    rows = {
        "both empty": (empty, empty, (math.nan, math.nan), (1.0, 0.0)),
        "pred empty": (empty, TRUTH, (0.0, HD95_MAX), (0.0, HD95_MAX_STRICT)),
        "truth empty": (TRUTH, empty, (0.0, HD95_MAX), (0.0, HD95_MAX_STRICT)),
        "no overlap": (far, near, (0.0, HD95_MAX), (0.0, strict_hd95(far, near))),
    }
    for name, (pred, truth, official, strict) in rows.items():
        got = case_metrics(pred[None], truth[None], regions=("ET",))
        np.testing.assert_allclose((got["dice_ET"], got["hd95_ET"]), official, err_msg=name)
        got = case_metrics(pred[None], truth[None], convention="strict", regions=("ET",))
        np.testing.assert_allclose((got["dice_ET"], got["hd95_ET"]), strict, err_msg=name)


def test_empty_in_both_is_left_out_of_the_means():
    pred = np.stack([TRUTH, TRUTH, np.zeros(SHAPE, bool)])
    out = case_metrics(pred, pred)
    assert math.isnan(out["dice_ET"]) and out["dice_mean"] == 1.0 and out["hd95_mean"] == 0.0
    other = case_metrics(pred[:, ::-1].copy(), pred)
    mean = summarize({"a": out, "b": other})
    assert math.isnan(mean["dice_ET"])
    assert mean["dice_WT"] == pytest.approx((1.0 + other["dice_WT"]) / 2)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 3.0), (0.8, 1.2, 2.5)])
def test_anisotropic_spacing_is_applied_along_each_axis(spacing):
    """The official global HD95 ignores the spacing (= the unit-spacing value below) and its
    lesion-wise HD95 reverses it: revseg uses each array axis's own spacing, in both."""
    pred = np.roll(TRUTH, (1, 0, 2), axis=(0, 1, 2))
    expected = official_hd95(pred, TRUTH, spacing)
    assert expected != pytest.approx(official_hd95(pred, TRUTH))
    assert expected != pytest.approx(official_hd95(pred, TRUTH, spacing[::-1]))
    out = case_metrics(pred[None], TRUTH[None], spacing, regions=("WT",), lesion_wise=True)
    assert out["hd95_WT"] == pytest.approx(expected, abs=1e-6)
    assert out["lesion_hd95_WT"] == pytest.approx(expected, abs=1e-6)
    tolerance = min(spacing)
    nsd = (
        (directed(pred, TRUTH, spacing) <= tolerance).mean()
        + (directed(TRUTH, pred, spacing) <= tolerance).mean()
    ) / 2
    assert out["lesion_nsd_WT"] == pytest.approx(nsd, abs=1e-12)


def test_lesion_wise_matches_lesions_one_to_one():
    a, b, c = ball((5, 5, 4), 3), ball((14, 12, 11), 3), ball((4, 14, 12), 2)
    truth = a | b | ball((15, 4, 4), 2)  # the third true lesion is missed
    pred = np.roll(a, 1, axis=0) | np.roll(b, 1, axis=1) | c  # c is a false positive
    out = lesion_metrics(pred, truth)
    assert (out["tp"], out["fp"], out["fn"]) == (2, 1, 1)
    pairs = [(np.roll(a, 1, axis=0), a), (np.roll(b, 1, axis=1), b)]
    assert out["lesion_dice"] == pytest.approx(np.mean([dice(p, t) for p, t in pairs]))
    assert out["lesion_hd95"] == pytest.approx(np.mean([official_hd95(p, t) for p, t in pairs]))
    nsd = [
        ((directed(p, t, (1, 1, 1)) <= 1).mean() + (directed(t, p, (1, 1, 1)) <= 1).mean()) / 2
        for p, t in pairs
    ]
    assert out["lesion_nsd"] == pytest.approx(np.mean(nsd))


def test_one_predicted_lesion_over_two_true_ones_matches_the_better_one():
    left, right = ball((10, 4, 8), 3), ball((10, 13, 8), 2)
    pred = np.zeros(SHAPE, bool)
    pred[6:15, 2:12, 5:12] = True  # covers most of left, touches right
    assert (pred & right).any()
    out = lesion_metrics(pred, left | right)
    assert (out["tp"], out["fp"], out["fn"]) == (1, 0, 1)
    assert out["lesion_dice"] == pytest.approx(dice(pred, left))


def test_lesion_wise_edge_cases():
    empty = np.zeros(SHAPE, bool)
    none = lesion_metrics(empty, empty)
    assert (none["tp"], none["fp"], none["fn"]) == (0, 0, 0)
    assert all(math.isnan(none[k]) for k in ("lesion_dice", "lesion_hd95", "lesion_nsd"))
    missed = lesion_metrics(empty, TRUTH)
    assert (missed["fn"], missed["lesion_dice"], missed["lesion_hd95"]) == (1, 0.0, HD95_MAX)
    # 26-connected: two voxels touching at a corner are one lesion
    corner = np.zeros(SHAPE, bool)
    corner[2, 2, 2] = corner[3, 3, 3] = True
    assert lesion_metrics(corner, corner)["tp"] == 1


def test_missing_prediction_is_scored_like_the_official_tool():
    truth = np.stack([TRUTH, TRUTH, np.zeros(SHAPE, bool)])
    out = missing_case_metrics(truth, lesion_wise=True)
    assert [out[f"dice_{r}"] for r in ("WT", "TC", "ET")] == [0.0, 0.0, 0.0]
    assert [out[f"hd95_{r}"] for r in ("WT", "TC", "ET")] == [HD95_MAX] * 3
    assert (out["fn_WT"], out["fn_ET"]) == (1, 0)  # the official tool writes 0 for every count
    assert missing_case_metrics(truth, "strict")["hd95_ET"] == HD95_MAX_STRICT


def test_label_sets():
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, 0, :] = [1, 2, 3, 4]
    wt, tc, et, rc = label_regions(label, BRATS2024)
    assert wt[0, 0].tolist() == [True, True, True, False]  # the cavity is not tumour
    assert tc[0, 0].tolist() == [True, False, True, False]
    assert et[0, 0].tolist() == [False, False, True, False]
    assert rc[0, 0].tolist() == [False, False, False, True]
    with pytest.raises(DataError, match="label values 4 not in 0/1/2/3"):
        label_regions(label, BRATS2023)
    old = np.where(label == 3, 0, label)  # 0/1/2/4
    assert label_regions(old, BRATS)[2][0, 0].tolist() == [False, False, False, True]
    msd = label_regions(np.where(label == 4, 0, label), MSD)  # 1 oedema, 2 non-enhancing
    assert msd[1][0, 0].tolist() == [False, True, True, False]


def test_bad_convention_names_the_key():
    with pytest.raises(ConfigError, match="^evaluate.convention must be one of official, strict"):
        case_metrics(TRUTH[None], TRUTH[None], convention="monai", regions=("WT",))


def test_validation_uses_the_same_metrics():
    truth = torch.from_numpy(np.stack([TRUTH, TRUTH, np.zeros(SHAPE, bool)])).float()
    shifted = torch.roll(truth, 2, dims=1)
    metrics = RegionMetrics(lesion_wise=True)
    metrics.update(truth[None] * 20 - 10, truth[None])
    metrics.update(shifted[None] * 20 - 10, truth[None])
    out = metrics.compute()
    expected = summarize(
        {
            "same": case_metrics(truth.numpy() > 0, truth.numpy() > 0, lesion_wise=True),
            "shifted": case_metrics(shifted.numpy() > 0, truth.numpy() > 0, lesion_wise=True),
        }
    )
    for key in ("dice_WT", "hd95_WT", "dice_mean", "hd95_mean", "tp_WT", "lesion_dice_WT"):
        assert out[key] == pytest.approx(expected[key])
    assert math.isnan(out["dice_ET"]) and out["hd95_undefined"] == 2  # ET empty in both, twice
    assert out["hd95_WT"] == pytest.approx(official_hd95(shifted[0].numpy() > 0, TRUTH) / 2)
