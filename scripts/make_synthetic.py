"""Generate the synthetic BraTS-like demo dataset on disk (BraTS 2021 layout, or any other).

Usage::

    python scripts/make_synthetic.py --root data/synthetic_brats --num-cases 16 --shape 48 48 48 \
        --seed 0 [--layout brats2021|brats2018|brats2019|brats2020|brats2023|msd] [--overwrite]

An existing dataset with the same settings is kept as is. Exits with status 2 and one line on
stderr when the folder holds something else.
"""

from __future__ import annotations

import argparse
import sys
import time

from revseg.data.synthetic import LAYOUTS, make_synthetic_brats, read_manifest
from revseg.errors import RevsegError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic_brats", help="dataset folder to create")
    parser.add_argument("--num-cases", type=int, default=16, help="number of cases")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[48, 48, 48], metavar=("X", "Y", "Z"),
        help="volume shape",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="brats2021", help="the published layout to imitate"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a generated dataset with other settings"
    )
    args = parser.parse_args(argv)
    existed = read_manifest(args.root) is not None and not args.overwrite
    start = time.perf_counter()
    try:
        root = make_synthetic_brats(
            args.root,
            args.num_cases,
            args.shape,
            seed=args.seed,
            overwrite=args.overwrite,
            layout=args.layout,
        )
    except (RevsegError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shape = "x".join(str(n) for n in args.shape)
    if existed:
        print(f"{root}: already holds {args.num_cases} cases of {shape} (seed {args.seed}), kept")
    else:
        seconds = time.perf_counter() - start
        print(
            f"{root}: wrote {args.num_cases} cases of {shape} (seed {args.seed}) in {seconds:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
