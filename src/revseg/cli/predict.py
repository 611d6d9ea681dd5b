"""Predict NIfTI label maps with a trained run.

Usage::

    revseg-predict run=outputs/<run> input=<case folder | image file | dataset root> \\
        output=<file.nii.gz | folder> [predict.sliding_window=true] [predict.cases=val] ...

    revseg-predict run=[outputs/a,outputs/b] ... predict.tta=true      # ensemble, mirroring
    revseg-predict run=outputs/multirun_<time> input=<root> output=<folder> predict.submission=true
    revseg-predict run=<data=nnunet run> input=<DatasetXXX/imagesTs> output=<folder>
        # nnU-Net names: {case}{ending}

The options are the keys of ``configs/predict.yaml``. Each label map has the input's shape,
affine and header and the input dataset's label convention. Exits with status 2 and one line on
stderr for a bad argument or file (a submission that fails its checks: one line per bad file).
"""

from __future__ import annotations

import logging
import sys

from omegaconf import ListConfig

from revseg.cli import run_main
from revseg.config import compose_config


def main(argv: list[str]) -> int:
    from revseg.inference.prediction import predict
    from revseg.inference.submission import SubmissionError

    cfg = compose_config("predict", argv)
    p = cfg.predict
    try:
        records = _predict(predict, cfg)
    except SubmissionError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    for record in records:
        runs = f", {record['runs']} runs" if record["runs"] > 1 else ""
        relabelled = record["et_relabelled"]
        note = f", {relabelled} ET voxels relabelled" if relabelled else ""
        print(f"{record['case']}: {record['output']} ({record['seconds']:.1f} s{runs}{note})")
    print(f"wrote {len(records)} label map(s)")
    if p.submission:
        print(f"submission {cfg.output}: {len(records)} files checked")
    return 0


def _predict(predict, cfg) -> list[dict]:
    from revseg.inference.prediction import run_dirs

    p = cfg.predict
    runs = run_dirs(list(cfg.run) if isinstance(cfg.run, ListConfig) else cfg.run)
    if len(runs) > 1:
        print(f"ensemble of {len(runs)} runs: {', '.join(map(str, runs))}")
    from revseg.inference.nnunet import is_nnunet_run, predict_folder

    if is_nnunet_run(runs):  # data=nnunet: {case}{file_ending} in the dataset's convention
        device, tta = str(p.device), _bool(p.tta, "predict.tta")
        return predict_folder(runs, cfg.input, cfg.output, checkpoint=str(p.checkpoint),
                              device=device, tta=tta)  # fmt: skip
    return predict(
        runs,
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
        tta=_bool(p.tta, "predict.tta"),
        et_min_voxels=p.et_min_voxels,
        et_min_mode=str(p.et_min_mode),
        submission=_bool(p.submission, "predict.submission"),
    )


def _bool(value, key: str) -> bool:
    from revseg.errors import ConfigError

    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def run() -> None:
    """The ``revseg-predict`` command (and ``python scripts/predict.py``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    run_main(main)
