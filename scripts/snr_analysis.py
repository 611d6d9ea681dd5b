"""Numerical error of a model's reversible parts on a real batch (Hascoet et al., section 4.1.1).

Usage::

    python scripts/snr_analysis.py model=<name> [train.py overrides ...] [snr.float64=true]
    python scripts/snr_analysis.py run=outputs/<run> [data.root=...] [snr.checkpoint=last]

Without ``run=`` the model is the composed train config's (untrained, seeded by ``seed``) and the
batch comes from its data module (the demo data generates itself); with ``run=`` the trained
model and the data config come from the run's checkpoint (``data.*`` overrides apply to it).
Prints a markdown table per layer (SNR in dB and relative error of every rebuilt block and
layer input) and per layer type (measured SNR reduction alpha next to the paper's closed form),
and writes them as JSON to ``output=`` (default ``<run>/snr.json``, or ``snr.json``). The
options are the keys of ``configs/snr_analysis.yaml``. Exits with status 2 and one line on
stderr for a bad key, value or path.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from revseg.cli import exit_on_error, exit_with_help_if_asked
from revseg.errors import ConfigError

OWN_KEYS = ("run", "output")


def _number(node: Any, key: str, kind: type, minimum: float | None = None) -> Any:
    """``node[key]`` as ``kind`` (int or float); a ConfigError naming ``snr.<key>`` otherwise."""
    value = node[key]
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(value)):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"snr.{key} must be a number ({kind.__name__}), got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"snr.{key} must be >= {minimum}, got {value!r}")
    return number


def _is_own(arg: str) -> bool:
    key = arg.split("=", 1)[0].lstrip("+~")
    return key in OWN_KEYS or key.startswith("snr.")


def _num(value: float | None, fmt: str = ".4g") -> str:
    if value is None:
        return "-"
    return "exact" if value == math.inf else format(value, fmt)


def markdown(report: Any) -> str:
    """A table per layer and a table per layer type of a
    :class:`~revseg.training.reconstruction.SNRReport`."""
    title = f"{report.dtype}, {report.mode} mode"
    lines = [
        f"### Reconstruction per layer ({title})",
        "",
        "| part | # | layer | kind | SNR (dB) | rel. error |",
        "| --- | ---: | --- | --- | ---: | ---: |",
    ]
    for r in report.layers:
        lines.append(
            f"| {r.part} | {r.position} | {r.name} | {r.kind} | {_num(r.snr_db, '.1f')} "
            f"| {r.rel_error:.3g} |"
        )
    lines += [
        "",
        f"### SNR reduction alpha = snr_in / snr_out per layer type ({title}, output noise "
        f"{report.noise_snr_db:g} dB, {report.trials} draws)",
        "",
        "| kind | layers | alpha measured | alpha (dB) | closed form | worst SNR (dB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in report.kinds():
        lines.append(
            f"| {k['kind']} | {k['count']} | {_num(k['alpha'])} | {_num(k['alpha_db'], '.2f')} "
            f"| {_num(k['closed_form'])} | {_num(k['min_snr_db'], '.1f')} |"
        )
    return "\n".join(lines)


def _compose(argv: list[str]) -> tuple[Any, str]:
    """The composed ``snr_analysis`` config (the train config plus ``run``, ``output``, ``snr``)
    and the model option it names."""
    from omegaconf import open_dict

    from revseg.config import compose_config, require_keys

    cfg = compose_config("snr_analysis", argv, require=False, return_hydra_config=True)
    name = cfg.hydra.runtime.choices.get("model") or str(cfg.model._target_).rsplit(".", 1)[-1]
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.paths.output_dir = None  # the analysis makes no run directory
    require_keys(cfg)
    return cfg, name


def _run_config(run: str, checkpoint: str, device: Any, overrides: list[str]) -> tuple:
    """``(model, config, name)`` of a trained run, with ``data.*`` ``overrides`` applied."""
    from omegaconf import OmegaConf

    from revseg.inference.prediction import load_run

    for arg in overrides:
        if not arg.startswith("data.") or "=" not in arg:
            raise ConfigError(
                f"{arg}: with run= the model and config are the run's; only data.* overrides apply"
            )
    model, cfg = load_run(run, checkpoint, device)
    for arg in overrides:
        key = arg.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise ConfigError(f"{key}: no such key in the run's config")
        OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([arg]), key))
    summary = Path(run) / "summary.json"
    name = json.loads(summary.read_text()).get("model") if summary.is_file() else None
    return model, cfg, name or type(model).__name__


def main(argv: list[str]) -> int:
    from revseg.config import build
    from revseg.training.checkpoint import write_text_atomic
    from revseg.training.reconstruction import analyze_reconstruction
    from revseg.training.trainer import resolve_device, seed_everything

    own = [a for a in argv if _is_own(a)]
    with_run = any(a.startswith("run=") and a != "run=null" for a in own)
    # with run=, the train overrides are for the run's config: compose the script's keys only
    opts, name = _compose(own if with_run else argv)
    s = opts.snr
    for key, allowed in (("split", ("train", "val")), ("mode", ("train", "eval"))):
        if s[key] not in allowed:
            raise ConfigError(f"snr.{key} must be {' or '.join(allowed)}, got {s[key]!r}")
    kwargs = dict(
        mode=str(s.mode),
        noise_snr_db=_number(s, "noise_snr_db", float),
        trials=_number(s, "trials", int, minimum=1),
        seed=_number(s, "seed", int),
    )
    device = resolve_device(str(s.device))
    if with_run:
        rest = [a for a in argv if not _is_own(a)]
        model, cfg, name = _run_config(str(opts.run), str(s.checkpoint), device, rest)
    else:
        cfg = opts
        seed_everything(int(cfg.seed))
        model = build(cfg.model, "model").to(device)
    data = build(cfg.data, "data")
    data.setup()
    loader = data.train_dataloader(seed=int(cfg.seed)) if s.split == "train" else None
    batch = next(iter(loader if loader is not None else data.val_dataloader()))
    x = batch["image"].to(device)
    models = {"float32": (model.float(), x.float())}
    if s.float64:
        models["float64"] = (copy.deepcopy(model).double(), x.double())
    reports = {}
    for dtype, (m, inp) in models.items():
        try:
            reports[dtype] = analyze_reconstruction(m, inp, **kwargs)
        except ValueError as err:
            raise ConfigError(f"model={name}: {err}") from None
    output = Path(opts.output or (Path(str(opts.run)) / "snr.json" if opts.run else "snr.json"))
    result = {
        "model": name,
        "run": None if opts.run is None else str(opts.run),
        "checkpoint": None if opts.run is None else str(s.checkpoint),
        "batch": {"split": str(s.split), "shape": list(x.shape), "cases": batch.get("case")},
        "reports": {dtype: report.to_dict() for dtype, report in reports.items()},
    }
    write_text_atomic(json.dumps(result, indent=2, allow_nan=False, default=str) + "\n", output)
    print(f"## Reconstruction SNR of {name} on a {s.split} batch {tuple(x.shape)}\n")
    for report in reports.values():
        print(markdown(report) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    exit_with_help_if_asked(sys.argv[1:], __doc__)
    with exit_on_error():
        sys.exit(main(sys.argv[1:]))
