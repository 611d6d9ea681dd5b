"""Generate the synthetic demo video (DAVIS layout: JPEG frames, palette PNG masks) on disk.

Usage::

    python scripts/make_synthetic_video.py --root data/synthetic_video --sequence blobs \\
        --frames 40 --size 96 96 --objects 2 --void-width 0 --seed 0 [--overwrite]

See :mod:`revseg.cli.synthetic`.
"""

import sys

from revseg.cli.synthetic import video_main

if __name__ == "__main__":
    sys.exit(video_main())
