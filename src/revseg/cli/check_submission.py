"""Check a BraTS submission folder before uploading it.

Usage::

    revseg-check-submission pred=<folder> input=<dataset root> [data.layout=...] \\
        [cases.split=<run>/split.json cases.which=val]

Every case of the input needs its ``<case id>.nii.gz`` (the official name) with the case's shape
and affine, an integer data type and labels within the layout's convention; the folder must hold
nothing else (see :mod:`revseg.inference.submission`). Prints one ``error:`` line per bad, missing
or extra file and exits with status 2; 0 when the folder passes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from revseg.cli import run_main
from revseg.config import compose_config
from revseg.errors import ConfigError, DataError


def _cases(found, split: str | None, which: str) -> list:
    if which == "all" and split is None:
        return found.cases
    if which not in ("all", "train", "val"):
        raise ConfigError(f"cases.which must be all, train or val, got {which!r}")
    if split is None:
        raise ConfigError(f"cases.which={which} needs cases.split=<run>/split.json")
    if which == "all":
        return found.cases
    try:
        ids = set(json.loads(Path(split).read_text())[which])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"cases.split: cannot read the {which} cases from {split}") from None
    return [case for case in found.cases if case.case in ids]


def main(argv: list[str]) -> int:
    from revseg.inference.prediction import resolve_input
    from revseg.inference.submission import SubmissionError, check_submission

    cfg = compose_config("check_submission", argv)
    found, _ = resolve_input(cfg.input, str(cfg.data.layout))
    cases = _cases(found, cfg.cases.split, str(cfg.cases.which))
    if not Path(cfg.pred).is_dir():
        raise DataError(f"pred: {cfg.pred} is not a folder")
    try:
        check_submission(cfg.pred, found, cases)
    except SubmissionError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(error.problems)} problem(s) in {cfg.pred}", file=sys.stderr)
        return 2
    convention = found.layout.convention
    print(
        f"{cfg.pred}: {len(cases)} files pass ({found.layout.name}, labels {convention.describe()})"
    )
    return 0


def run() -> None:
    """The ``revseg-check-submission`` command (and ``python scripts/check_submission.py``)."""
    run_main(main)
