"""BraTS label conventions and the tumour regions the networks predict and the metrics score.

The one home of these definitions: the data (reading and checking label maps), the metrics and
the evaluation use them (``revseg.data.layouts`` re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BRATS", "BRATS2023", "BRATS2024", "MSD", "REGIONS", "LabelConvention"]

REGIONS = ("WT", "TC", "ET")
"""The three nested tumour regions the networks predict (and the metrics score), in this order:
whole tumour, tumour core, enhancing tumour."""


@dataclass(frozen=True)
class LabelConvention:
    """The label values of a dataset's segmentation maps (0 is always background).

    The three nested regions the networks predict are WT = ``label in {necrotic, oedema,
    enhancing}``, TC = ``label in {necrotic, enhancing}``, ET = ``label == enhancing``. BraTS 2024
    post-treatment glioma adds a fourth label, the resection cavity (RC), which is none of them
    (as in the official ``gli`` evaluation config).
    """

    name: str
    necrotic: int
    oedema: int
    enhancing: int
    resection: int | None = None

    @property
    def values(self) -> tuple[int, ...]:
        """The allowed label values, sorted."""
        labels = (0, self.necrotic, self.oedema, self.enhancing)
        return tuple(sorted(labels + ((self.resection,) if self.resection is not None else ())))

    def describe(self) -> str:
        return "/".join(str(v) for v in self.values)


BRATS = LabelConvention("brats2018-2021", necrotic=1, oedema=2, enhancing=4)
"""BraTS 2018-2021: 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour."""
BRATS2023 = LabelConvention("brats2023", necrotic=1, oedema=2, enhancing=3)
"""BraTS 2023 and later: 1 necrotic core, 2 oedema (SNFH), 3 enhancing tumour."""
BRATS2024 = LabelConvention("brats2024", necrotic=1, oedema=2, enhancing=3, resection=4)
"""BraTS 2024 post-treatment glioma: as 2023, and 4 resection cavity (read by the evaluation;
the 2023 layout's truth may hold it)."""
MSD = LabelConvention("msd", necrotic=2, oedema=1, enhancing=3)
"""Decathlon Task01: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour."""
