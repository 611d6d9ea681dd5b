"""Generate the synthetic demo data on disk: ``scripts/make_synthetic.py`` (BraTS-like volumes in
any layout of :data:`revseg.data.layouts.LAYOUTS`) and ``scripts/make_synthetic_video.py`` (a
DAVIS-layout video).

An existing dataset with the same settings is kept as is. Exits with status 2 and one line on
stderr when the folder holds something else. Imports neither MONAI nor torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from revseg.errors import RevsegError

__all__ = ["brats_main", "video_main"]


def _parser(description: str, root: str, what: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default=root, help="dataset folder to create")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace a generated {what} with other settings"
    )
    return parser


def _generate(make: Callable[[], Path], existed: bool, what: str, seed: int) -> int:
    """Run the generator ``make``; one line saying what was written (or kept), or the error."""
    start = time.perf_counter()
    try:
        root = make()
    except (RevsegError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if existed:
        print(f"{root}: already holds {what} (seed {seed}), kept")
    else:
        print(f"{root}: wrote {what} (seed {seed}) in {time.perf_counter() - start:.1f} s")
    return 0


def brats_main(argv: list[str] | None = None) -> int:
    """``make_synthetic.py --root data/synthetic_brats --num-cases 16 --shape 48 48 48 --seed 0
    [--layout <name>] [--overwrite]``, ``<name>`` one of
    :func:`revseg.data.layouts.example_layouts` (``--help`` lists them)."""
    from revseg.data.layouts import example_layouts
    from revseg.data.synthetic import make_synthetic_brats, read_manifest

    parser = _parser(
        "Generate the synthetic BraTS-like demo dataset on disk (BraTS 2021 layout, or any other).",
        "data/synthetic_brats",
        "dataset",
    )
    parser.add_argument("--num-cases", type=int, default=16, help="number of cases")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[48, 48, 48], metavar=("X", "Y", "Z"),
        help="volume shape",
    )  # fmt: skip
    parser.add_argument(
        "--layout",
        choices=tuple(example_layouts()),
        default="brats2021",
        help="the published layout to imitate",
    )
    args = parser.parse_args(argv)
    existed = read_manifest(args.root) is not None and not args.overwrite

    def make() -> Path:
        return make_synthetic_brats(
            args.root,
            args.num_cases,
            args.shape,
            seed=args.seed,
            overwrite=args.overwrite,
            layout=args.layout,
        )

    shape = "x".join(str(n) for n in args.shape)
    return _generate(make, existed, f"{args.num_cases} cases of {shape}", args.seed)


def video_main(argv: list[str] | None = None) -> int:
    """``make_synthetic_video.py --root data/synthetic_video --sequence blobs --frames 40
    --size 96 96 --objects 2 --void-width 0 --seed 0 [--overwrite]``"""
    from revseg.data.synthetic_video import make_synthetic_video, read_video_manifest

    parser = _parser(
        "Generate the synthetic demo video (DAVIS layout: JPEG frames, palette PNG masks) on disk.",
        "data/synthetic_video",
        "video",
    )
    parser.add_argument("--sequence", default="blobs", help="sequence (folder) name")
    parser.add_argument("--frames", type=int, default=40, help="number of frames")
    parser.add_argument(
        "--size", type=int, nargs=2, default=[96, 96], metavar=("H", "W"), help="frame size"
    )
    parser.add_argument("--objects", type=int, default=2, help="number of moving objects (1-8)")
    parser.add_argument(
        "--void-width", type=int, default=0, help="void band (index 255) along object boundaries"
    )
    args = parser.parse_args(argv)
    existed = read_video_manifest(args.root) is not None and not args.overwrite

    def make() -> Path:
        return make_synthetic_video(
            args.root,
            args.sequence,
            args.frames,
            args.size,
            seed=args.seed,
            num_objects=args.objects,
            void_width=args.void_width,
            overwrite=args.overwrite,
        )

    what = f"{args.sequence}: {args.frames} frames of {args.size[0]}x{args.size[1]}"
    return _generate(make, existed, what, args.seed)
