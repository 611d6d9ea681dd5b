"""BraTS post-processing of predicted regions: small enhancing tumour relabelled as tumour core.

The BraTS score of enhancing tumour (ET) is all or nothing on cases without ET in the reference
(Dice 1 for an empty prediction, 0 for a single false-positive voxel), and many low-grade cases
have none. Isensee et al. ("No New-Net", BraTS 2018; nnU-Net for BraTS 2020) therefore relabel the
predicted ET as necrosis / non-enhancing core when its volume is below a threshold chosen on the
cross-validation. The voxels stay in the tumour core and the whole
tumour: only the ET region changes, and the label map then shows the dataset's necrotic label
(1 in BraTS, 2 in MSD) there.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from revseg.errors import ConfigError

__all__ = ["ET_MIN_MODES", "check_et_min", "relabel_small_enhancing"]

ET_MIN_MODES = ("total", "component")
"""``predict.et_min_mode``: compare the total ET volume, or each connected ET component (26-
connectivity), with ``predict.et_min_voxels``."""


def check_et_min(min_voxels: int, mode: str) -> None:
    """Check ``predict.et_min_voxels`` and ``predict.et_min_mode``.

    Raises:
        ConfigError: ``min_voxels`` not an int >= 0 or ``mode`` unknown (naming the key).
    """
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, (int, np.integer)):
        raise ConfigError(f"predict.et_min_voxels must be an int >= 0, got {min_voxels!r}")
    if min_voxels < 0:
        raise ConfigError(f"predict.et_min_voxels must be an int >= 0, got {min_voxels}")
    if mode not in ET_MIN_MODES:
        raise ConfigError(
            f"predict.et_min_mode must be one of {', '.join(ET_MIN_MODES)}, got {mode!r}"
        )


def relabel_small_enhancing(
    regions: np.ndarray, min_voxels: int, mode: str = "total"
) -> tuple[np.ndarray, int]:
    """Move enhancing tumour below ``min_voxels`` from ET to the tumour core (necrosis).

    Args:
        regions: ``(3, X, Y, Z)`` bool, WT, TC, ET.
        min_voxels: ``mode="total"``: when the case has fewer ET voxels than this, all of them are
            relabelled; ``mode="component"``: every connected ET component (26-connectivity)
            with fewer voxels is. 0 leaves the regions as they are.
        mode: ``"total"`` (Isensee et al.) or ``"component"``.

    Returns:
        ``(regions, number of voxels relabelled)``; a copy when any voxel changed. The relabelled
        voxels are in WT and TC and not in ET.

    Raises:
        ConfigError: ``min_voxels`` negative or ``mode`` unknown (naming ``predict.*``).
    """
    check_et_min(min_voxels, mode)
    et = regions[2]
    if min_voxels == 0 or not et.any():
        return regions, 0
    if mode == "total":
        small = et if et.sum() < min_voxels else np.zeros_like(et)
    else:
        components, _ = ndimage.label(et, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(components.ravel())
        sizes[0] = min_voxels  # the background is never small
        small = (sizes < min_voxels)[components]
    count = int(small.sum())
    if count == 0:
        return regions, 0
    out = np.array(regions, dtype=bool, copy=True)
    out[0] |= small
    out[1] |= small
    out[2] &= ~small
    return out, count
