"""Generate the synthetic BraTS-like demo dataset on disk (BraTS 2021 layout, or any other).

Usage::

    python scripts/make_synthetic.py --root data/synthetic_brats --num-cases 16 --shape 48 48 48 \\
        --seed 0 [--layout <name>] [--overwrite]

``--help`` lists the layouts (:func:`revseg.data.layouts.example_layouts`).

See :mod:`revseg.cli.synthetic`.
"""

import sys

from revseg.cli.synthetic import brats_main

if __name__ == "__main__":
    sys.exit(brats_main())
