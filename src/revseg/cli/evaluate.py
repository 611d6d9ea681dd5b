"""Evaluate predicted label maps with the official BraTS metrics: Dice and HD95 per region per
case, lesion-wise metrics, means, and a box plot.

Usage::

    revseg-evaluate pred=<folder | file> truth=<dataset root | case folder | flat folder | file> \\
        output=<folder> [evaluate.convention=official|strict] [evaluate.labels=auto|...] \\
        [evaluate.cases=all|predicted]

Predictions are matched to the truth's cases by case id (the file name is or contains it); a
truth case with no prediction is listed as missing and, by default (``evaluate.cases=all``, the
official rule), scored as Dice 0, HD95 373; ``evaluate.cases=predicted`` scores only the cases
that have a prediction (after ``revseg-predict predict.cases=val``, the validation cases). The
first line printed says which. A prediction that matches no case is listed and skipped. Writes
``metrics.csv``, ``lesionwise.csv``, ``summary.csv``, ``metrics.json`` and ``boxplot.png`` into
``output`` (see :func:`revseg.inference.evaluation.write_reports`). Exits with status 2 and one
line on stderr for a bad argument or file.

A ``truth`` that is a DAVIS root (``Annotations/`` and ``JPEGImages/``) evaluates video results
instead: DAVIS J&F and the toolkit's CSV files (:mod:`revseg.inference.video_evaluation`).
"""

from __future__ import annotations

import sys

from revseg.cli import run_main
from revseg.config import compose_config
from revseg.errors import ConfigError


def main(argv: list[str]) -> int:
    from revseg.inference import video_evaluation

    if video_evaluation.names_davis_truth(argv):  # DAVIS video results: their own command
        return video_evaluation.main(argv)
    from revseg.inference.evaluation import check_cases, evaluate, find_inputs, write_reports
    from revseg.metrics.brats import CONVENTIONS, HD95_MAX, HD95_MAX_STRICT, summarize

    cfg = compose_config("evaluate", argv)
    options = cfg.evaluate
    cases = check_cases(str(options.cases))
    if options.labels == "auto" and cfg.data.layout == "auto":
        from revseg.inference.nnunet import nnunet_truth_spec

        spec = nnunet_truth_spec(cfg.truth)  # truth=<DatasetXXX/labelsTr>: per dataset.json label
        if spec is not None:
            return _evaluate_nnunet(cfg, spec, cases)
    if options.convention not in CONVENTIONS:
        raise ConfigError(
            f"evaluate.convention must be one of {', '.join(CONVENTIONS)}, "
            f"got {options.convention!r}"
        )
    inputs = find_inputs(cfg.pred, cfg.truth, str(cfg.data.layout), str(options.labels))
    hd95_max = HD95_MAX_STRICT if options.convention == "strict" else HD95_MAX
    as_missing = f"Dice 0, HD95 {hd95_max:g}"
    for path in inputs.unmatched:
        print(f"warning: {path} matches no truth case; skipped", file=sys.stderr)
    _warn_missing(inputs.missing, cases, as_missing)
    per_case, regions = evaluate(
        inputs, str(options.convention), bool(options.lesion_wise), cases=cases
    )
    extra = {
        "pred": str(cfg.pred),
        "truth": str(cfg.truth),
        "layout": inputs.layout,
        "label_convention": inputs.convention.name,
        "convention": str(options.convention),
        "cases_scored": cases,
        "unmatched": [str(p) for p in inputs.unmatched],
    }
    written = write_reports(
        per_case, cfg.output, extra, regions, inputs.missing, plot=bool(options.plot)
    )
    mean = summarize(per_case)
    print(
        f"{_scope(cases, len(per_case), len(inputs.missing), as_missing)}; labels "
        f"{inputs.convention.name}, convention {options.convention}"
    )
    columns = (*regions, "mean")
    print("        " + "  ".join(f"{r:>7}" for r in columns))
    for metric in ("dice", "hd95"):
        values = [mean[f"{metric}_{r}"] for r in columns]
        print(f"{metric:>6}  " + "  ".join(f"{v:7.3f}" for v in values))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _scope(cases: str, scored: int, missing: int, as_missing: str) -> str:
    """The first line's start: which cases were scored (``evaluate.cases``)."""
    if cases == "predicted":
        return (
            f"scored the {scored} case(s) with a prediction only (evaluate.cases=predicted); "
            f"{missing} truth case(s) without one left out"
        )
    return (
        f"scored all {scored} truth case(s) (evaluate.cases=all, the official rule); {missing} "
        f"without a prediction scored {as_missing}"
    )


def _warn_missing(missing: list[str], cases: str, as_missing: str) -> None:
    for case in missing:
        fate = "left out" if cases == "predicted" else f"scored {as_missing}"
        print(f"warning: case {case} has no prediction; {fate}", file=sys.stderr)


def _evaluate_nnunet(cfg, spec, cases: str) -> int:
    """Dice, IoU and HD95 per label of an nnU-Net-format dataset, named as in dataset.json."""
    from revseg.inference.nnunet import evaluate_folder, write_evaluation
    from revseg.metrics.labels import metric_name, summarize_labels

    per_case, missing, unmatched = evaluate_folder(cfg.pred, cfg.truth, spec)
    if cases == "predicted":
        per_case = {case: m for case, m in per_case.items() if case not in missing}
    for name in unmatched:
        print(f"warning: {name} matches no truth case; skipped", file=sys.stderr)
    _warn_missing(missing, cases, "Dice 0")
    extra = {
        "pred": str(cfg.pred),
        "truth": str(cfg.truth),
        "labels": list(spec.foreground_names),
        "cases_scored": cases,
        "missing": missing,
    }
    written = write_evaluation(per_case, cfg.output, extra)
    mean = summarize_labels(per_case)
    print(f"{_scope(cases, len(per_case), len(missing), 'Dice 0')}; dataset {spec.root.name}")
    width = max(len(n) for n in (*spec.foreground_names, "mean"))
    print(" " * width + "    dice     iou    hd95")
    for name in (*spec.foreground_names, "mean"):
        key = metric_name(name) if name != "mean" else "mean"
        row = "".join(f"{mean[f'{m}_{key}']:8.3f}" for m in ("dice", "iou", "hd95"))
        print(f"{name:>{width}}{row}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run() -> None:
    """The ``revseg-evaluate`` command (and ``python scripts/evaluate.py``)."""
    run_main(main)
