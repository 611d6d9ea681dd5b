"""Generate the synthetic demo video (DAVIS layout: JPEG frames, palette PNG masks) on disk.

Usage::

    python scripts/make_synthetic_video.py --root data/synthetic_video --sequence blobs \
        --frames 40 --size 96 96 --objects 2 --void-width 0 --seed 0 [--overwrite]

An existing video with the same settings is kept as is. Exits with status 2 and one line on
stderr when the folder holds something else.
"""

from __future__ import annotations

import argparse
import sys
import time

from revseg.data.synthetic_video import make_synthetic_video, read_video_manifest
from revseg.errors import RevsegError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic_video", help="dataset folder to create")
    parser.add_argument("--sequence", default="blobs", help="sequence (folder) name")
    parser.add_argument("--frames", type=int, default=40, help="number of frames")
    parser.add_argument(
        "--size", type=int, nargs=2, default=[96, 96], metavar=("H", "W"), help="frame size"
    )
    parser.add_argument("--objects", type=int, default=2, help="number of moving objects (1-8)")
    parser.add_argument(
        "--void-width", type=int, default=0, help="void band (index 255) along object boundaries"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a generated video with other settings"
    )
    args = parser.parse_args(argv)
    existed = read_video_manifest(args.root) is not None and not args.overwrite
    start = time.perf_counter()
    try:
        root = make_synthetic_video(
            args.root,
            args.sequence,
            args.frames,
            args.size,
            seed=args.seed,
            num_objects=args.objects,
            void_width=args.void_width,
            overwrite=args.overwrite,
        )
    except (RevsegError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    what = f"{args.sequence}: {args.frames} frames of {args.size[0]}x{args.size[1]}"
    if existed:
        print(f"{root}: already holds {what} (seed {args.seed}), kept")
    else:
        print(f"{root}: wrote {what} (seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
