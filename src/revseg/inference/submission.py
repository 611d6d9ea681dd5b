"""BraTS challenge submission folders: the official file names, and the checks a submission
must pass before it is uploaded.

A submission is one flat folder (or zip) of a file per case, named as the input's layout says
(:meth:`revseg.data.layouts.Layout.submission_name`): every BraTS edition names a case's
segmentation after the case id, the name of the case's folder (``BraTS2021_00001.nii.gz``,
``BraTS-GLI-00001-000.nii.gz``), the Decathlon (MSD) after the image file
(``BRATS_001.nii.gz``).

A file passes when it has the input case's shape (240 x 240 x 155 for the challenge data) and
affine, an integer data type, and labels within the layout's convention (0/1/2/4 up to 2021,
0/1/2/3 from 2023 and in MSD).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from revseg.data.layouts import CaseFiles, Discovery, Layout
from revseg.errors import DataError

__all__ = ["SubmissionError", "check_submission", "submission_name"]

AFFINE_TOLERANCE = 1e-5
"""Largest difference of an affine entry from the input's (mm; float32 headers round)."""


class SubmissionError(DataError):
    """A submission folder fails the checks; ``problems`` holds one line per bad file."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{self.problems[0]}{more}")


def submission_name(case: CaseFiles, layout: Layout) -> str:
    """The official file name of a case's segmentation in ``layout`` (``<case id>.nii.gz`` in
    every BraTS edition and the Decathlon)."""
    return layout.submission_name(case.case)


def _number(value: np.generic) -> int | float:
    number = value.item()
    return int(number) if float(number).is_integer() else number


def _file_problems(path: Path, case: CaseFiles, allowed: tuple[int, ...]) -> list[str]:
    try:
        reference = nib.load(case.image[0])
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for a bad file
        return [f"cannot read the input image {case.image[0]}: {str(error).splitlines()[0]}"]
    try:
        image = nib.load(os.fspath(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for a bad file
        return [f"cannot be read: {str(error).splitlines()[0]}"]
    problems = []
    if tuple(image.shape) != tuple(reference.shape[:3]):
        problems.append(f"shape {tuple(image.shape)} != the input's {tuple(reference.shape[:3])}")
    elif not np.allclose(image.affine, reference.affine, rtol=0.0, atol=AFFINE_TOLERANCE):
        problems.append("affine differs from the input's")
    dtype = image.get_data_dtype()
    if not np.issubdtype(dtype, np.integer):
        problems.append(f"data type {dtype} is not an integer type")
    values = [_number(v) for v in np.unique(data) if v not in allowed]
    if values:
        problems.append(
            f"labels {values} outside {'/'.join(map(str, allowed))} (the layout's convention)"
        )
    return problems


def check_submission(
    folder: str | os.PathLike, found: Discovery, cases: Sequence[CaseFiles] | None = None
) -> None:
    """Check a submission folder against the input cases it was predicted from.

    Every case must have its :func:`submission_name` file, with the shape and affine of the
    case's first image, an integer data type and labels within ``found.layout.convention``; the
    folder must hold nothing else.

    Args:
        folder: the submission folder.
        found: the input dataset (layout, label convention, cases).
        cases: the cases that must be there; None: all of ``found.cases``.

    Raises:
        SubmissionError: one problem line per bad, missing or unexpected file.
    """
    folder = Path(folder)
    cases = found.cases if cases is None else cases
    allowed = found.layout.convention.values
    problems = []
    expected = {submission_name(case, found.layout): case for case in cases}
    for name, case in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing (the submission file of case {case.case})")
            continue
        bad = _file_problems(path, case, allowed)
        if bad:
            problems.append(f"{path}: {'; '.join(bad)}")
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.name not in expected:
                problems.append(f"{entry}: not a submission file of the input's cases")
    if problems:
        raise SubmissionError(problems)
