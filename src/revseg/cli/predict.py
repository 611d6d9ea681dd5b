"""Predict NIfTI label maps with a trained run.

Usage::

    revseg-predict run=outputs/<run> input=<case folder | image file | dataset root> \
        output=<file.nii.gz | folder> [predict.sliding_window=true] [predict.cases=val] ...

The options are the keys of ``configs/predict.yaml``. Each label map has the input's shape,
affine and header and the input dataset's label convention. Exits with status 2 and one line on
stderr for a bad argument or file.
"""

from __future__ import annotations

import logging

from revseg.cli import run_main
from revseg.config import compose_config


def main(argv: list[str]) -> int:
    from revseg.inference.prediction import predict

    cfg = compose_config("predict", argv)
    p = cfg.predict
    records = predict(
        cfg.run,
        cfg.input,
        cfg.output,
        checkpoint=str(p.checkpoint),
        device=str(p.device),
        layout=str(cfg.data.layout),
        reader=cfg.data.reader,
        sliding_window=bool(p.sliding_window),
        roi_size=None if p.roi_size is None else list(p.roi_size),
        overlap=float(p.overlap),
        sw_batch_size=int(p.sw_batch_size),
        mode=str(p.mode),
        threshold=float(p.threshold),
        cases=str(p.cases),
    )
    for record in records:
        print(f"{record['case']}: {record['output']} ({record['seconds']:.1f} s)")
    print(f"wrote {len(records)} label map(s)")
    return 0


def run() -> None:
    """The ``revseg-predict`` command (and ``python scripts/predict.py``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    run_main(main)
