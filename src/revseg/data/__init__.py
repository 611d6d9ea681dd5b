"""Datasets and MONAI transforms: BraTS volumes (real or generated).

- :mod:`revseg.data.brats`: finding BraTS cases, the train/val split, the data module ``BratsData``.
- :mod:`revseg.data.transforms`: the MONAI pipeline, label <-> region conversion, readers.
- :mod:`revseg.data.synthetic`: the generated BraTS-like demo dataset.

Names are imported lazily, so ``revseg.data.synthetic`` (and ``scripts/make_synthetic.py``) work
without importing MONAI and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from revseg.data.brats import MODALITIES, BratsData, find_cases, split_cases
    from revseg.data.synthetic import make_synthetic_brats, synthesize_case
    from revseg.data.transforms import (
        LabelToRegionsd,
        SimpleITKReader,
        build_transforms,
        label_to_regions,
        regions_to_label,
    )

__all__ = [
    "MODALITIES",
    "BratsData",
    "LabelToRegionsd",
    "SimpleITKReader",
    "build_transforms",
    "find_cases",
    "label_to_regions",
    "make_synthetic_brats",
    "regions_to_label",
    "split_cases",
    "synthesize_case",
]

_MODULE_OF = {
    "MODALITIES": "brats",
    "BratsData": "brats",
    "find_cases": "brats",
    "split_cases": "brats",
    "make_synthetic_brats": "synthetic",
    "synthesize_case": "synthetic",
    "LabelToRegionsd": "transforms",
    "SimpleITKReader": "transforms",
    "build_transforms": "transforms",
    "label_to_regions": "transforms",
    "regions_to_label": "transforms",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
