"""BraTS post-processing: enhancing tumour below the threshold becomes tumour core (necrosis)."""

import numpy as np
import pytest
import torch

from revseg.data.layouts import discover
from revseg.data.synthetic import make_synthetic_brats
from revseg.errors import ConfigError
from revseg.inference.postprocessing import relabel_small_enhancing
from revseg.inference.prediction import Ensemble, Predictor


def _regions(*et_boxes):
    regions = np.zeros((3, 12, 12, 12), dtype=bool)
    regions[0, 1:11, 1:11, 1:11] = True  # WT
    regions[1, 2:10, 2:10, 2:10] = True  # TC
    for box in et_boxes:
        regions[(2, *box)] = True
    return regions


SMALL = (slice(2, 3), slice(2, 4), slice(2, 4))  # 4 voxels
LARGE = (slice(5, 9), slice(5, 7), slice(5, 7))  # 16 voxels
DIAGONAL = (slice(3, 4), slice(4, 5), slice(4, 5))  # touches SMALL by a corner only


def test_total_below_the_threshold_becomes_tumour_core():
    regions = _regions(SMALL, LARGE)
    out, count = relabel_small_enhancing(regions, 21)  # 20 ET voxels < 21
    assert count == 20 and not out[2].any()
    np.testing.assert_array_equal(out[:2], regions[:2])  # WT and TC unchanged
    out, count = relabel_small_enhancing(regions, 20)  # not below
    assert count == 0 and out is regions


def test_components_below_the_threshold_only():
    regions = _regions(SMALL, LARGE)
    out, count = relabel_small_enhancing(regions, 5, "component")
    assert count == 4
    np.testing.assert_array_equal(out[2], _regions(LARGE)[2])
    np.testing.assert_array_equal(out[:2], regions[:2])
    assert regions[2].sum() == 20  # the input is not changed


def test_components_are_26_connected():
    regions = _regions(SMALL, DIAGONAL)  # one component of 5 voxels through a corner
    assert relabel_small_enhancing(regions, 5, "component")[1] == 0
    assert relabel_small_enhancing(regions, 6, "component")[1] == 5


def test_relabelled_voxels_join_tc_and_wt_when_the_prediction_had_et_alone():
    regions = np.zeros((3, 4, 4, 4), dtype=bool)
    regions[2, 1, 1, 1] = True  # ET outside WT and TC
    out, count = relabel_small_enhancing(regions, 2)
    assert count == 1 and out[:, 1, 1, 1].tolist() == [True, True, False]


def test_off_and_bad_settings():
    regions = _regions(SMALL)
    assert relabel_small_enhancing(regions, 0)[1] == 0
    with pytest.raises(ConfigError, match=r"^predict.et_min_voxels must be an int >= 0, got -1"):
        relabel_small_enhancing(regions, -1)
    with pytest.raises(ConfigError, match=r"^predict.et_min_voxels must be an int >= 0, got 1.5"):
        relabel_small_enhancing(regions, 1.5)
    with pytest.raises(ConfigError, match=r"^predict.et_min_mode must be one of total, component"):
        relabel_small_enhancing(regions, 3, "largest")


class BrainModel(torch.nn.Module):
    """Enhancing tumour wherever the input has a non-zero voxel (the brain)."""

    def forward(self, x):
        brain = (x != 0).any(1, keepdim=True).float()
        return (brain * 20 - 10).repeat(1, 3, 1, 1, 1)


@pytest.mark.parametrize(("layout", "necrotic"), [("brats2021", 1), ("brats2023", 1), ("msd", 2)])
def test_label_map_shows_the_necrotic_label_of_the_convention(tmp_path, layout, necrotic):
    root = make_synthetic_brats(tmp_path / layout, 2, (20, 18, 16), seed=1, layout=layout)
    found = discover(root)
    case = found.cases[0]
    predictor = Predictor(BrainModel(), crop_size=(32, 32, 16))
    plain, _ = Ensemble([predictor]).predict_case(found, case)
    brain = plain != 0
    assert set(np.unique(plain)) == {0, found.layout.convention.enhancing}
    label, count = Ensemble([predictor], et_min_voxels=int(brain.sum()) + 1).predict_case(
        found, case
    )
    assert count == brain.sum()
    np.testing.assert_array_equal(label, np.where(brain, necrotic, 0))
    label, count = Ensemble([predictor], et_min_voxels=int(brain.sum())).predict_case(found, case)
    assert count == 0
    np.testing.assert_array_equal(label, plain)
