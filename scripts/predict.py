"""Predict NIfTI label maps with a trained run.

Usage::

    python scripts/predict.py run=outputs/<run> input=<case folder | image file | dataset root> \
        output=<file.nii.gz | folder> [predict.sliding_window=true] [predict.cases=val] ...

The options are the keys of ``configs/predict.yaml``. Each label map has the input's shape,
affine and header and the input dataset's label convention. Exits with status 2 and one line on
stderr for a bad argument or file.
"""

from __future__ import annotations

import logging
import sys

from revseg.cli import exit_on_error
from revseg.config import compose_config


def main(argv: list[str]) -> int:
    from revseg.data.prediction import predict

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


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    with exit_on_error():
        from hydra.errors import HydraException

        try:
            sys.exit(main(sys.argv[1:]))
        except HydraException as error:  # an unknown key or a malformed override
            from revseg.errors import ConfigError

            raise ConfigError(str(error).splitlines()[0]) from None
