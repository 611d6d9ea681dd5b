"""Check a dataset's files before training; every problem is one line naming the case and file.

Usage::

    python scripts/check_data.py data=brats data.root=/data/BraTS2021 [data.layout=...] [--quick]
    python scripts/check_data.py data=davis data.root=/data/DAVIS data.sequence=bear

Takes the same overrides as ``train.py``. Reads every voxel (NaN/Inf, empty volumes, label
values) besides the headers (missing or unreadable files, truncated files, shapes, affines,
3D/4D); ``--quick`` checks the headers only, as training does at start. For DAVIS: every frame
and mask opens and sizes agree (``--quick``), and every mask's palette indices and colours. Exit
status: 0 when every case is fine (or with ``data.skip_bad_cases=true``, which lists the cases
training would leave out), 1 when a case has a problem, 2 for a bad argument.
"""

from __future__ import annotations

import sys
import time

from revseg.cli import exit_on_error, exit_with_help_if_asked
from revseg.config import build, compose_config
from revseg.errors import ConfigError


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    overrides = [a for a in argv if a != "--quick"]
    cfg = compose_config("train", [*overrides, "paths.output_dir=."], require=False)
    if cfg.data.get("root") is None or str(cfg.data.root) == "???":
        raise ConfigError("data.root is required: give it on the command line (data.root=...)")
    data = build(cfg.data, "data")
    start = time.perf_counter()
    problems = data.check_data(full=not quick)
    seconds = time.perf_counter() - start
    for problem in problems:
        print(problem)
    bad = sorted({p.case for p in problems})
    what = "headers" if quick else "headers and voxels"
    print(
        f"{data.root}: {data.describe()}, {what} checked in {seconds:.1f} s: "
        + (f"{len(problems)} problem(s) in {len(bad)} case(s)" if problems else "no problems"),
        file=sys.stderr,
    )
    if problems and getattr(data, "skip_bad_cases", False):
        print(
            f"data.skip_bad_cases=true: training would leave out {', '.join(bad)}", file=sys.stderr
        )
        return 0
    return 1 if problems else 0


if __name__ == "__main__":
    exit_with_help_if_asked(sys.argv[1:], __doc__)
    with exit_on_error():
        sys.exit(main(sys.argv[1:]))
