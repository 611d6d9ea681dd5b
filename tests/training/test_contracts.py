"""The contracts between the trainer and its parts are Protocols, checked where things are built."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from revseg.errors import ConfigError
from revseg.training.contracts import (
    AdaptiveRanks,
    BuildsMetrics,
    DataModule,
    MemoryReport,
    ParameterGroups,
    Previews,
    WritesSplit,
    check_data_module,
    validation_metrics,
)

from conftest import TINY_VIDEO, compose_train


def test_the_data_modules_satisfy_the_contract(tmp_path):
    brats = instantiate(compose_train(f"data.root={tmp_path}").data)
    video = instantiate(
        compose_train("model=hyperbolic_blr", *TINY_VIDEO, f"data.root={tmp_path}").data
    )
    for data in (brats, video):
        assert isinstance(data, DataModule) and isinstance(data, WritesSplit)
        check_data_module(data)
    # the video brings its own metrics (IoU, J&F per object) and preview; BraTS takes the
    # trainer's region metrics and slice panel
    assert isinstance(video, BuildsMetrics) and isinstance(video, Previews)
    assert not isinstance(brats, BuildsMetrics) and not isinstance(brats, Previews)


def test_model_capabilities_are_found_by_protocol():
    caps = (ParameterGroups, MemoryReport, AdaptiveRanks)
    found = {
        name: [isinstance(instantiate(compose_train(f"model={name}").model), c) for c in caps]
        for name in ("prev_unet", "revup_unet", "hyperbolic_blr")
    }
    assert found == {
        "prev_unet": [False, False, False],
        "revup_unet": [True, False, False],
        "hyperbolic_blr": [False, True, True],
    }


def test_a_target_that_is_no_data_module_is_one_line_naming_the_key():
    class Folder:
        def setup(self) -> None: ...

    with pytest.raises(ConfigError, match=r"^data: .*Folder is not a data module \(missing "):
        check_data_module(Folder())
    with pytest.raises(ConfigError, match="input_shape, train_cases, val_cases"):
        check_data_module(Folder())


def test_the_metrics_group_reaches_the_metrics_that_take_it(tmp_path):
    from revseg.metrics.brats import RegionMetrics

    options = {"hd95": False, "lesion_wise": True}
    brats = instantiate(compose_train(f"data.root={tmp_path}").data)
    region = validation_metrics(brats, options)  # BraTS: region metrics with every option
    assert isinstance(region, RegionMetrics) and region.lesion_wise and not region.hd95

    class Named:  # takes the options it names, only those
        def build_metrics(self, hd95: bool = True):
            return ("named", hd95)

    class Any_:  # takes every option
        def build_metrics(self, **options):
            return ("any", options)

    assert validation_metrics(Named(), options) == ("named", False)
    assert validation_metrics(Any_(), options) == ("any", options)
