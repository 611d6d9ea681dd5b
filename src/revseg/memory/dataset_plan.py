"""Planning for a dataset: ``revseg-plan data=nnunet data.root=... budget_gb=N``.

As nnU-Net's planning does (Isensee et al. 2021), the dataset's fingerprint is read from the
files' headers alone (:func:`summarize_dataset`: cases, channels, labels, median / min / max
shape and spacing, the shapes at ``data.spacing``), then every model of :data:`ZOO` is planned at
the dataset's full field of view (the largest case, resampled when ``data.spacing`` is set,
padded to the model's divisor: the size the data module trains at) with the run's precision and
device rules (:func:`plan_dataset`). Where the full field of view exceeds the budget, the largest
patch that fits is found by taking the divisor off the longest side until the plan fits; the
deepest encoder that fits at that input is found by bisection. The chosen model (the config's)
becomes an experiment config (:func:`experiment_yaml`) that ``train.py --config-dir DIR
experiment=plan_<dataset>`` trains.

Every figure is a plan (:mod:`revseg.memory.trace`): traced tensor bytes and, for a CUDA run,
the computed and estimated parts of the device's memory; a budget is compared with the total.

Example::

    summary = summarize_dataset(cfg.data)
    plan = plan_dataset(cfg, overrides, summary, budget_bytes=8 * 2**30)
    print("\\n".join(summary.lines() + plan.lines()))
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from revseg.data.nnunet import format_values
from revseg.errors import ConfigError
from revseg.memory.measure import format_bytes
from revseg.memory.plan import (
    Plan,
    compose_train_config,
    deepest_fit,
    precision_from_config,
    step_model_from_config,
)
from revseg.validation import model_divisor

__all__ = [
    "PAIRS",
    "ZOO",
    "DatasetPlan",
    "DatasetSummary",
    "ModelFit",
    "ZooModel",
    "experiment_yaml",
    "is_dataset_config",
    "plan_dataset",
    "plan_model",
    "summarize_dataset",
]

NNUNET_TARGET = "revseg.data.nnunet_data.NnUNetData"


@dataclass(frozen=True)
class ZooModel:
    """A model the dataset is planned for: a label, the ``train.py`` overrides that make it, and
    the ``model.<key>`` whose deepest value that fits is searched (``None``: not searched)."""

    label: str
    overrides: tuple[str, ...]
    depth_key: str | None = None


CHECKPOINTED = "unet_baseline, checkpointing"
CHECKPOINTED_4 = "unet_baseline 4 encoder blocks, checkpointing"
ZOO: tuple[ZooModel, ...] = (
    ZooModel("prev_unet depth 1", ("model=prev_unet",), "encoder_depth"),
    ZooModel(CHECKPOINTED, ("model=unet_baseline", "model.checkpointing=true"), "encoder_blocks"),
    ZooModel("prev_unet depth 4", ("model=prev_unet", "model.encoder_depth=4")),
    ZooModel(
        CHECKPOINTED_4,
        ("model=unet_baseline", "model.encoder_blocks=4", "model.checkpointing=true"),
    ),
)
"""The models of every dataset plan: the paper's partially reversible U-Net and the plain U-Net
with gradient checkpointing (the strongest alternative), at one and at four blocks per encoder
level (the pairs of the benchmark's full-FOV section)."""

PAIRS: dict[str, str] = {
    "prev_unet depth 1": CHECKPOINTED,
    "prev_unet depth 4": CHECKPOINTED_4,
}
"""Each reversible model's checkpointed baseline (``vs ckpt``: its peak / the baseline's)."""


def is_dataset_config(cfg: DictConfig) -> bool:
    """Whether the composed config's data is an nnU-Net-format dataset (``data=nnunet``)."""
    return str(OmegaConf.select(cfg, "data._target_", default="")) == NNUNET_TARGET


# --------------------------------------------------------------------------------------------
# the dataset


def _spread(values: np.ndarray) -> str:
    """``median A, min B, max C`` over the cases, the rows of ``values``."""
    return (
        f"median {format_values(np.median(values, axis=0))}, "
        f"min {format_values(values.min(axis=0))}, max {format_values(values.max(axis=0))}"
    )


@dataclass(frozen=True)
class DatasetSummary:
    """The dataset's fingerprint, from ``dataset.json`` and the files' headers.

    Shapes and spacings are per case in the files' ``(x, y, z)`` order, which is the arrays'
    ``(D, H, W)`` in revseg.

    Attributes:
        spec: ``dataset.json`` (:class:`~revseg.data.nnunet.DatasetSpec`).
        cases: the training case ids.
        shapes: ``(cases, 3)`` voxels.
        spacings: ``(cases, 3)`` mm.
        target_spacing: ``data.spacing`` resolved (``median``: the median spacing), or None.
        resampled_shapes: ``(cases, 3)``: each case's shape on the grid it is trained on (the
            data module's :meth:`~revseg.data.nnunet_data.NnUNetData.trained_shapes`).
        crop_size: ``data.crop_size`` when set (it replaces the full field of view).
    """

    spec: Any
    cases: tuple[str, ...]
    shapes: np.ndarray
    spacings: np.ndarray
    target_spacing: tuple[float, float, float] | None
    resampled_shapes: np.ndarray
    crop_size: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        return self.spec.root.name

    @property
    def region_based(self) -> bool:
        return bool(self.spec.region_based)

    @property
    def loss(self) -> str:
        """The loss option for the dataset's labels (nnU-Net's defaults)."""
        return "dice_bce" if self.region_based else "dice_ce"

    def full_fov(self, divisor: int) -> tuple[int, int, int]:
        """``data.crop_size``, else the largest (resampled) case padded to ``divisor``: the size
        the data module trains at with ``crop_size: null`` and ``divisor``."""
        if self.crop_size is not None:
            return self.crop_size
        from revseg.data.nnunet_data import full_fov_size

        return full_fov_size(self.resampled_shapes.tolist(), divisor)

    def lines(self) -> list[str]:
        """The report, one fact a line."""
        spec = self.spec
        kind = "region-based: a sigmoid per region" if spec.region_based else "label-based: softmax"
        channels = ", ".join(f"{i} {n}" for i, n in enumerate(spec.channel_names))
        if spec.region_based:
            labels = ", ".join(
                f"{n} {list(v)}" for n, v in zip(spec.label_names, spec.label_values)
            )
        else:
            labels = ", ".join(f"{n} {v}" for n, v in zip(spec.label_names, spec.label_values))
        ct = (
            f"; CT normalisation for channel(s) {list(spec.ct_channels)}"
            if spec.ct_channels
            else ""
        )
        out = [
            f"dataset {self.name} ({spec.root}): nnU-Net v{spec.version}, {len(self.cases)} "
            f"training cases, files {spec.file_ending}",
            f"  channels ({spec.in_channels}): {channels}{ct}",
            f"  labels ({spec.out_channels} output channels, {kind}, loss={self.loss}): {labels}",
            f"  shape (voxels, x y z = the network's D H W): {_spread(self.shapes)}",
            f"  spacing (mm): {_spread(self.spacings)}",
        ]
        if self.target_spacing is not None:
            resampled = self.resampled_shapes
            out.append(
                f"  at data.spacing {format_values(self.target_spacing)} mm: median shape "
                f"{format_values(np.median(resampled, axis=0))}, "
                f"max {format_values(resampled.max(axis=0))}"
            )
        if self.crop_size is not None:
            out.append(
                f"  data.crop_size {format_values(self.crop_size)}: planned instead of the full FOV"
            )
        return out


def summarize_dataset(data_cfg: DictConfig) -> DatasetSummary:
    """Read the dataset a ``data=nnunet`` config names: ``dataset.json`` and every training
    case's header (no voxels; a generated task, ``data.generate``, is written first).

    Raises:
        ConfigError: a bad ``data.*`` value.
        DataError: a bad dataset (one line naming the file or key).
    """
    from revseg.config import build

    data = build(data_cfg, "data")
    headers = data.headers
    target = data.target_spacing
    return DatasetSummary(
        spec=data.spec,
        cases=tuple(headers),
        shapes=np.asarray([h.shape for h in headers.values()], dtype=np.int64),
        spacings=np.asarray([h.spacing[:3] for h in headers.values()], dtype=np.float64),
        target_spacing=None if target is None else tuple(float(v) for v in target),
        resampled_shapes=np.asarray(data.trained_shapes(), dtype=np.int64),
        crop_size=data.crop_size,
    )


# --------------------------------------------------------------------------------------------
# the models


@dataclass
class ModelFit:
    """One model planned for the dataset.

    Attributes:
        label: the model's label (a :data:`ZOO` label, or the config's own model).
        overrides: the model overrides that make it.
        divisor: its input sizes' factor.
        fov: the full field of view at that divisor (or ``data.crop_size``).
        fov_plan: the plan at ``fov``.
        budget_bytes: the budget, or None (nothing fitted).
        patch: where the full FOV does not fit, the largest patch that does (None: the full FOV
            fits, or nothing does).
        patch_plan: its plan.
        depth_key, depth, depth_capped, depth_plan: the deepest ``model.<depth_key>`` that fits
            at :attr:`input` (``depth_capped``: ``max_depth`` fits, a lower bound).
    """

    label: str
    overrides: tuple[str, ...]
    divisor: int
    fov: tuple[int, ...]
    fov_plan: Plan
    budget_bytes: int | None = None
    patch: list[int] | None = None
    patch_plan: Plan | None = None
    depth_key: str | None = None
    depth: int | None = None
    depth_capped: bool = False
    depth_plan: Plan | None = None

    @property
    def fits(self) -> bool | None:
        """The full FOV fits the budget (None without one)."""
        if self.budget_bytes is None:
            return None
        return self.fov_plan.total_bytes <= self.budget_bytes

    @property
    def input(self) -> list[int] | None:
        """What to train at: the full FOV where it fits (or without a budget), else the patch."""
        return list(self.fov) if self.fits is not False else self.patch

    @property
    def input_plan(self) -> Plan | None:
        return self.fov_plan if self.fits is not False else self.patch_plan


def _at(cfg: DictConfig, spatial: Sequence[int]) -> DictConfig:
    """``cfg`` with ``data.crop_size`` = ``spatial`` (the size the plan is for)."""
    c = copy.deepcopy(cfg)
    OmegaConf.update(c, "data.crop_size", [int(s) for s in spatial], merge=False)
    OmegaConf.update(c, "data.patch_size", None, merge=False)
    return c


def _traced(cfg: DictConfig, model: Any, spatial: Sequence[int]) -> tuple[Any, Plan]:
    """The step model traced for ``spatial`` (slab choices depend on the size) and its plan."""
    with torch.random.fork_rng(devices=[]):
        step = step_model_from_config(_at(cfg, spatial), model, spatial)
    return step, step.checked_plan(spatial)


def _shrink(step: Any, shape: list[int], budget: float, divisor: int) -> list[int] | None:
    """Take ``divisor`` off the longest side (the first of equals) until ``step``'s plan fits."""
    shape = list(shape)
    while step.plan(shape).total_bytes > budget:
        longest = max(range(3), key=lambda i: (shape[i], -i))
        if shape[longest] <= divisor:
            return None
        shape[longest] -= divisor
    return shape


def plan_model(
    cfg: DictConfig,
    summary: DatasetSummary,
    budget_bytes: float | None = None,
    label: str = "",
    overrides: Sequence[str] = (),
    depth_key: str | None = None,
    max_depth: int = 16,
) -> ModelFit:
    """Plan the model of ``cfg`` at the dataset's full field of view and fit the budget.

    Raises:
        ConfigError: as :func:`~revseg.memory.plan.plan_from_config`.
    """
    from revseg.config import build

    with torch.random.fork_rng(devices=[]):  # building a model draws its initial weights
        model = build(cfg.model, "model")
    divisor = model_divisor(model)
    fov = summary.full_fov(divisor)
    step, fov_plan = _traced(cfg, model, fov)
    fit = ModelFit(label, tuple(overrides), divisor, tuple(fov), fov_plan)
    if budget_bytes is None:
        return fit
    fit.budget_bytes = int(budget_bytes)
    if not fit.fits:
        shape: list[int] | None = list(fov)
        for _ in range(8):  # the answer traced again at its own size, until it fits
            shape = _shrink(step, shape, budget_bytes, divisor)
            if shape is None:
                break
            step, plan = _traced(cfg, model, shape)
            if plan.total_bytes <= budget_bytes:
                fit.patch, fit.patch_plan = shape, plan
                break
    if depth_key is not None and depth_key in cfg.model and fit.input is not None:
        fit.depth_key = depth_key
        fit.depth, fit.depth_capped, fit.depth_plan = deepest_fit(
            _at(cfg, fit.input), fit.input, budget_bytes, max_depth, key=depth_key
        )
    return fit


def _is_model_override(arg: str) -> bool:
    key = arg.split("=", 1)[0].lstrip("+~")
    return key == "model" or key.startswith("model.")


def _dataset_overrides(summary: DatasetSummary, overrides: Sequence[str]) -> list[str]:
    """The model's channels from ``dataset.json`` and, unless ``loss=`` is given, its loss."""
    out = [
        f"model.in_channels={summary.spec.in_channels}",
        f"model.out_channels={summary.spec.out_channels}",
    ]
    if not any(a.split("=", 1)[0].lstrip("+") == "loss" for a in overrides):
        out.append(f"loss={summary.loss}")
    return out


@dataclass
class DatasetPlan:
    """The zoo's fits and the chosen model's (see :func:`plan_dataset`).

    Attributes:
        summary: the dataset.
        precision, rules: ``trainer.precision`` and the device's autocast rules.
        budget_bytes: the budget, or None.
        zoo: the fits of :data:`ZOO` by label (empty with ``zoo=false``).
        chosen: the fit of the config's own model (a zoo entry when it is one).
        chosen_cfg: the composed config of the chosen model, with the dataset's channels and loss.
    """

    summary: DatasetSummary
    precision: str
    rules: str
    budget_bytes: int | None
    zoo: dict[str, ModelFit]
    chosen: ModelFit
    chosen_cfg: DictConfig
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The plans as a Markdown table (readable as text) and the deepest encoders."""
        cuda = self.rules == "cuda"
        where = "device memory" if cuda else "CPU tensor memory"
        budget = (
            f"budget {format_bytes(self.budget_bytes)} of {where}"
            if self.budget_bytes is not None
            else "no budget (budget_gb=N fits one)"
        )
        out = [
            "",
            f"planned for {'CUDA (trainer.device=cuda)' if cuda else 'the CPU'}, {self.precision}"
            f", batch {self.chosen.fov_plan.input_shape[0]}; {budget}",
        ]
        if not cuda:
            out.append("  planned for the CPU: for a GPU's memory add trainer.device=cuda")
        peak = ["traced peak", "total (device)"] if cuda else ["predicted peak"]
        header = [
            "model",
            "params",
            "full FOV",
            *peak,
            "vs ckpt",
            "fits",
            "largest patch that fits",
        ]
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        fits = list(self.zoo.values())
        if self.chosen.label not in self.zoo:
            fits.append(self.chosen)
        for fit in fits:
            out.append("| " + " | ".join(self._row(fit, cuda)) + " |")
        for fit in fits:
            if fit.depth_key is None:
                continue
            at = format_values(fit.input or ())
            if fit.depth is None:
                out.append(f"deepest {fit.label} at {at}: none fits (model.{fit.depth_key}=1 over)")
                continue
            more = " or more (search stops at max_depth)" if fit.depth_capped else ""
            out.append(
                f"deepest {fit.label.rsplit(' depth', 1)[0]} at {at}: model.{fit.depth_key}="
                f"{fit.depth}{more} ({_total(fit.depth_plan)})"
            )
        return out + [f"note: {n}" for n in self.notes]

    def _row(self, fit: ModelFit, cuda: bool) -> list[str]:
        plan = fit.fov_plan
        figures = [format_bytes(plan.peak_bytes)] + (
            [format_bytes(plan.total_bytes)] if cuda else []
        )
        ref = self.zoo.get(PAIRS.get(fit.label, ""))
        ratio = "–"
        if ref is not None and tuple(ref.fov) == tuple(fit.fov):
            ratio = f"{plan.peak_bytes / ref.fov_plan.peak_bytes:.3f}"
            if cuda:
                ratio += f" ({plan.total_bytes / ref.fov_plan.total_bytes:.3f} total)"
        fits = {None: "–", True: "yes", False: "no"}[fit.fits]
        if fit.fits is False:
            patch = (
                f"{format_values(fit.patch)} ({_total(fit.patch_plan)})"
                if fit.patch
                else "none (the fixed part exceeds the budget)"
            )
        else:
            patch = "– (full FOV)" if fit.fits else "–"
        label = fit.label + (" (chosen)" if fit is self.chosen else "")
        return [label, f"{plan.params:,}", format_values(fit.fov), *figures, ratio, fits, patch]


def _total(plan: Plan | None) -> str:
    if plan is None:
        return "–"
    if plan.total_bytes == plan.peak_bytes:
        return f"predicted peak {format_bytes(plan.peak_bytes)}"
    return f"total {format_bytes(plan.total_bytes)}, traced {format_bytes(plan.peak_bytes)}"


def plan_dataset(
    cfg: DictConfig,
    overrides: Sequence[str],
    summary: DatasetSummary,
    budget_bytes: float | None = None,
    max_depth: int = 16,
    zoo: bool = True,
) -> DatasetPlan:
    """Plan every model of :data:`ZOO` (``zoo``) and the config's own model for the dataset.

    Args:
        cfg: the composed ``train`` config (``data=nnunet``) of ``overrides``.
        overrides: the command line's ``train.py`` overrides: the zoo's models take those that
            are not about the model (precision, device, optimizer, batch size, ...).
        summary: :func:`summarize_dataset` of ``cfg.data``.
        budget_bytes: the budget (the device's memory for ``trainer.device=cuda``), or None.
        max_depth: where the depth searches stop.
        zoo: plan the zoo too (else only the config's model).

    Raises:
        ConfigError: a config the planner cannot plan (one line naming the key).
    """
    precision, rules = precision_from_config(cfg)
    extra = _dataset_overrides(summary, overrides)
    others = [a for a in overrides if not _is_model_override(a)]
    own = tuple(a for a in overrides if _is_model_override(a))
    choice = str(OmegaConf.select(cfg, "hydra.runtime.choices.model", default="model"))
    fits: dict[str, ModelFit] = {}
    chosen_cfg = compose_train_config([*overrides, *extra])
    chosen = None
    for entry in ZOO if zoo else ():
        row_cfg = compose_train_config([*others, *entry.overrides, *extra])
        fits[entry.label] = plan_model(
            row_cfg, summary, budget_bytes, entry.label, entry.overrides, entry.depth_key,
            max_depth,
        )  # fmt: skip
        if chosen is None and OmegaConf.to_container(row_cfg.model) == OmegaConf.to_container(
            chosen_cfg.model
        ):
            chosen = fits[entry.label]
    if chosen is None:
        label = " ".join([choice, *(a for a in own if not a.startswith("model="))])
        depth_key = next((k for k in ("encoder_depth", "encoder_blocks") if k in cfg.model), None)
        chosen = plan_model(chosen_cfg, summary, budget_bytes, label, own, depth_key, max_depth)
    return DatasetPlan(
        summary,
        precision,
        rules,
        None if budget_bytes is None else int(budget_bytes),
        fits,
        chosen,
        chosen_cfg,
    )


# --------------------------------------------------------------------------------------------
# the experiment

# groups an experiment may override; debug presets and paths stay the user's
_GROUPS = ("model", "data", "loss", "optimizer", "scheduler", "trainer", "metrics", "callbacks",
           "logger")  # fmt: skip


def experiment_name(summary: DatasetSummary) -> str:
    """``plan_<dataset folder>``, characters other than letters, digits, ``_`` and ``-``
    replaced by ``_``."""
    return "plan_" + re.sub(r"[^A-Za-z0-9_-]", "_", summary.name)


def _diff(a: Any, b: Any) -> dict:
    """The leaves of ``a`` (a nested dict) that ``b`` lacks or holds otherwise."""
    out = {}
    for key, value in a.items():
        other = b.get(key) if isinstance(b, dict) else None
        if isinstance(value, dict) and isinstance(other, dict):
            sub = _diff(value, other)
            if sub:
                out[key] = sub
        elif isinstance(b, dict) and key in b and value == other:
            continue
        else:
            out[key] = value
    return out


def _merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


class _Dumper(yaml.SafeDumper):
    """Mappings in block style, lists in flow style (``crop_size: [48, 48, 16]``)."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def experiment_yaml(plan: DatasetPlan, command: str, config_dir: str | Path) -> str:
    """The experiment config of the chosen model: ``# @package _global_``, the group options
    that differ from ``train.yaml``'s, the dataset's data keys (root, crop and patch size,
    divisor), the model's channels, and every other value the planning command set.

    Raises:
        ConfigError: nothing fits the budget (no input to write).
    """
    fit, cfg, summary = plan.chosen, plan.chosen_cfg, plan.summary
    if fit.input is None:
        raise ConfigError(
            "budget_gb: nothing fits the budget (the fixed part, parameters and optimizer state, "
            "exceeds it): no experiment written"
        )
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    defaults = OmegaConf.to_container(compose_train_config([]).hydra.runtime.choices)
    chosen = {g: choices.get(g) for g in _GROUPS if choices.get(g) is not None}
    base_overrides = [f"{g}={c}" for g, c in chosen.items()]
    if choices.get("debug"):
        base_overrides.append(f"debug={choices['debug']}")
    base = compose_train_config(base_overrides)
    mine = OmegaConf.to_container(cfg, resolve=False)
    theirs = OmegaConf.to_container(base, resolve=False)
    for c in (mine, theirs):
        c.pop("hydra", None)
    full = fit.fits is not False
    values: dict[str, Any] = {
        "data": {
            "root": str(Path(summary.spec.root).resolve()),
            "crop_size": list(fit.fov),
            "divisor": fit.divisor,
            "patch_size": None if full else list(fit.input),
        },
        "model": {
            "in_channels": summary.spec.in_channels,
            "out_channels": summary.spec.out_channels,
        },
        "trainer": {"precision": plan.precision},
    }
    values = _merge(_merge({k: {} for k in values}, _diff(mine, theirs)), values)
    lines = [
        "# @package _global_",
        f"# Written by revseg-plan on {datetime.date.today().isoformat()} for {summary.name}:",
        f"#   {command}",
        f"# {fit.label} at "
        + (
            f"the full field of view {format_values(fit.fov)}"
            if full
            else f"patches of {format_values(fit.input)} "
            f"(the full FOV {format_values(fit.fov)} does not fit)"
        )
        + f", {plan.precision}, planned "
        f"{'for CUDA' if plan.rules == 'cuda' else 'for the CPU'}: {_total(fit.input_plan)}"
        + ("" if plan.budget_bytes is None else f" of a {format_bytes(plan.budget_bytes)} budget"),
        f"# {len(summary.cases)} cases; channels {', '.join(summary.spec.channel_names)}; "
        f"labels {', '.join(summary.spec.label_names)} ({summary.loss})",
        "# Train with:",
        f"#   python train.py --config-dir {config_dir} experiment={experiment_name(summary)}",
        "defaults:",
    ]
    lines += [f"  - override /{g}: {c}" for g, c in chosen.items() if c != defaults.get(g)]
    body = yaml.dump(values, Dumper=_Dumper, sort_keys=False).rstrip("\n")
    return "\n".join(lines) + "\n\n" + body + "\n"
