"""Checks of a dataset's files before training: every problem one line naming the case and file.

Two levels:

- **quick** (at the start of every training run; reads headers only): a missing modality or
  segmentation, an unreadable or truncated file, complex voxels, a 3D/4D mismatch (a 4D file
  where a 3D volume belongs, a 3D file where MSD has a 4D image of four volumes), modalities or
  the segmentation whose shapes or affines differ;
- **full** (``scripts/check_data.py``, or ``data.check=full``): also reads every voxel: NaN or Inf
  voxels, an empty volume (all zero), label values outside the dataset's convention.

The training pipeline re-checks the voxel-level problems as it reads each case (see
:class:`revseg.data.transforms.CheckImaged`), so they never pass silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import nibabel as nib
import numpy as np

from revseg.data.layouts import MODALITIES, CaseFiles, LabelConvention
from revseg.data.transforms import _READ_ERRORS, _check_nifti_complete, _one_line
from revseg.errors import DataError

__all__ = ["Problem", "check_case", "check_cases", "format_problems"]

_AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Problem:
    """One problem of one case: ``<case>: <file>: <message>``."""

    case: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.file}: {self.message}" if self.file else (
            f"{self.case}: {self.message}"
        )  # fmt: skip


def _strip_path(message: str, path: str) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _header(path: str) -> tuple[nib.Nifti1Image | None, str | None]:
    """The image (header read, data not) or the reason it cannot be used."""
    try:
        _check_nifti_complete(path)
        return nib.load(path), None
    except DataError as error:
        return None, _strip_path(str(error), path)
    except _READ_ERRORS as error:
        return None, f"cannot read: {_one_line(error)}"


def _voxel_problems(path: str, image: nib.Nifti1Image, label: LabelConvention | None) -> list[str]:
    try:
        data = np.asanyarray(image.dataobj)
    except _READ_ERRORS as error:
        return [f"cannot read: {_one_line(error)}"]
    volumes = [data] if data.ndim == 3 else [data[..., i] for i in range(data.shape[-1])]
    problems = []
    for index, volume in enumerate(volumes):
        where = "" if len(volumes) == 1 else f" in volume {index}"
        if np.issubdtype(volume.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(volume)))
            if bad:
                problems.append(f"{bad} NaN/Inf voxels{where}")
                continue
        if label is None and not volume.any():
            problems.append(f"empty volume (all voxels are 0){where}")
    if label is not None and not problems:
        values = np.unique(data)
        extra = [v for v in values.tolist() if v not in label.values]
        if extra:
            shown = ", ".join(f"{v:g}" for v in extra[:5])
            problems.append(
                f"label values {shown} not in {label.describe()} (convention {label.name})"
            )
    return problems


def check_case(
    case: CaseFiles,
    convention: LabelConvention,
    *,
    four_d: bool = False,
    require_label: bool = True,
    voxels: bool = False,
) -> list[Problem]:
    """Check one case's files.

    Args:
        case: the case, from :func:`revseg.data.layouts.discover`.
        convention: the dataset's label values.
        four_d: the image is one 4D file of four volumes (MSD), not one 3D file per modality.
        require_label: a missing segmentation is a problem.
        voxels: also read the voxels (NaN/Inf, empty volumes, label values).

    Returns:
        The problems, in file order; empty if the case is fine.
    """
    problems: list[Problem] = []

    def add(path: str, message: str) -> None:
        problems.append(Problem(case.case, path, message))

    for what, path in case.missing:
        if what != "seg":
            add(path, f"missing {what} file")
        elif require_label:
            add(path, "missing segmentation file")
    names = list(zip(MODALITIES, case.image)) if not four_d else [("image", case.image[0])]
    if case.label:
        names.append(("seg", case.label))
    reference: tuple[str, tuple[int, ...], np.ndarray] | None = None
    for what, path in names:
        if not path:
            continue
        image, reason = _header(path)
        if image is None:
            add(path, reason or "cannot read")
            continue
        dtype = image.get_data_dtype()
        if np.issubdtype(dtype, np.complexfloating):
            add(path, f"complex voxels ({dtype}): store real intensities (e.g. the magnitude)")
            continue
        shape = tuple(int(n) for n in image.shape)
        if what == "image" and (len(shape) != 4 or shape[3] != len(MODALITIES)):
            add(path, f"{len(shape)}D image {shape}: expected 4D with {len(MODALITIES)} volumes")
            continue
        if what != "image" and len(shape) != 3:
            add(path, f"{len(shape)}D image {shape} where a 3D volume is expected")
            continue
        if reference is None:
            reference = (path, shape[:3], image.affine)
        elif shape[:3] != reference[1]:
            add(path, f"shape {shape[:3]} differs from {reference[1]} of {reference[0]}")
            continue
        else:
            difference = float(np.abs(image.affine - reference[2]).max())
            if difference > _AFFINE_TOLERANCE_MM:
                add(path, f"affine differs from that of {reference[0]} by {difference:.3g}")
                continue
        if voxels:
            for message in _voxel_problems(path, image, convention if what == "seg" else None):
                add(path, message)
    return problems


def check_cases(
    cases: Sequence[CaseFiles],
    convention: LabelConvention,
    *,
    four_d: bool = False,
    require_label: bool = True,
    voxels: bool = False,
    workers: int = 0,
) -> list[Problem]:
    """:func:`check_case` for every case, in ``workers`` processes when > 1 (voxel checks).

    Returns:
        All problems, in case order.
    """
    check = partial(
        check_case,
        convention=convention,
        four_d=four_d,
        require_label=require_label,
        voxels=voxels,
    )
    if workers > 1 and voxels and len(cases) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, cases, chunksize=4))
    else:
        results = [check(case) for case in cases]
    return [problem for result in results for problem in result]


def format_problems(problems: Sequence[Problem], root: str | os.PathLike, advice: str) -> str:
    """The message for a :class:`DataError`: a header line, one line per problem, the advice."""
    cases = len({p.case for p in problems})
    lines = [f"data.root: {len(problems)} problem(s) in {cases} case(s) of {root}:"]
    lines += [f"  {problem}" for problem in problems]
    lines.append(advice)
    return "\n".join(lines)
