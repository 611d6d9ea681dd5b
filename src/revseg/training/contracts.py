"""The contracts between the trainer and what it is given, as :class:`typing.Protocol` classes.

Data modules, models and callbacks are built from the config by Hydra (``_target_``); these
protocols say what the trainer relies on, and :func:`check_data_module` checks a built data
module once, at composition time, with one clear error instead of an ``AttributeError`` an epoch
later. Optional capabilities are separate protocols, tested with ``isinstance``:

* a data module (:class:`DataModule`) may also :class:`BuildsMetrics` (its own validation
  metrics, e.g. DAVIS's IoU / J&F per object; else BraTS region metrics:
  :func:`validation_metrics`), :class:`Previews` (its own TensorBoard panel) and
  :class:`WritesSplit` (the cases used, written to the run directory);
* a model may have :class:`ParameterGroups` (per-group learning-rate scales: RevUp's Fixup
  scalars), a :class:`MemoryReport` (its own analytic memory terms: Peters et al.'s Table 2) and
  :class:`AdaptiveRanks` (block ranks the rank-growth callback changes);
* callbacks see the trainer through :class:`TrainerView` (this module, not the trainer's, so
  callbacks and trainer do not import each other).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from revseg.errors import ConfigError

__all__ = [
    "VAL_DICE_MEAN",
    "AdaptiveRanks",
    "BuildsMetrics",
    "DataModule",
    "Figures",
    "MemoryReport",
    "Metrics",
    "ParameterGroups",
    "Previews",
    "TrainerView",
    "WritesSplit",
    "check_data_module",
    "val_key",
    "validation_metrics",
]

VAL_PREFIX = "val/"
"""Validation metrics are logged (TensorBoard, ``summary.json``) as ``val/<name>``."""
VAL_DICE_MEAN = "val/dice_mean"
"""The default ``trainer.monitor``: the mean Dice of the region (or label, object) means
(:func:`revseg.metrics.brats.summarize`), the number that picks ``checkpoints/best.pt``."""


def val_key(name: str) -> str:
    """The logged key of a validation metric: ``dice_mean`` -> :data:`VAL_DICE_MEAN`."""
    return VAL_PREFIX + name


@runtime_checkable
class DataModule(Protocol):
    """What the trainer needs of a data module (``cfg.data``'s ``_target_``).

    ``setup()`` reads and checks the data; afterwards ``input_shape`` is the spatial shape of one
    training sample, ``train_cases`` / ``val_cases`` name the cases, and the loaders yield
    ``{"image": (B, C_in, *input_shape), "label": (B, C_out, ...), "case": [...]}`` batches
    (plus an optional ``"loss_mask"`` of the voxels the loss counts). ``in_channels`` /
    ``out_channels``, where the module knows them, are checked against the model's.
    """

    def setup(self) -> None: ...

    @property
    def input_shape(self) -> Sequence[int]: ...

    @property
    def train_cases(self) -> Sequence[str]: ...

    @property
    def val_cases(self) -> Sequence[str]: ...

    def train_dataloader(self, seed: int | None = None, pin_memory: bool = False) -> Iterable: ...

    def val_dataloader(self, pin_memory: bool = False) -> Iterable: ...


@runtime_checkable
class Metrics(Protocol):
    """Validation metrics: ``update(logits, target) -> prediction`` per batch, ``compute()`` the
    epoch's values by name (logged as ``val/<name>``), ``reset()`` for the next epoch."""

    def reset(self) -> None: ...

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def compute(self) -> dict[str, float]: ...


@runtime_checkable
class Figures(Protocol):
    """Metrics that also draw images for TensorBoard: ``figures() -> {name: (3, H, W)}``."""

    def figures(self) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class BuildsMetrics(Protocol):
    """A data module's own validation metrics. ``build_metrics`` names as keyword parameters the
    options of the ``metrics`` config group (``configs/metrics/``) it uses, e.g. ``hd95``;
    :func:`validation_metrics` passes only those."""

    def build_metrics(self, **options: Any) -> Metrics: ...


@runtime_checkable
class Previews(Protocol):
    def preview(
        self, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor
    ) -> torch.Tensor: ...


@runtime_checkable
class WritesSplit(Protocol):
    def write_split(self, output_dir: str | Path) -> Path: ...


@runtime_checkable
class ParameterGroups(Protocol):
    """``parameter_groups() -> [{"params": [...], "lr_scale": s}, ...]``."""

    def parameter_groups(self) -> list[dict[str, Any]]: ...


@runtime_checkable
class MemoryReport(Protocol):
    """``memory_report(spatial_shape, batch_size)``: an object with ``megabytes()`` and a
    readable ``str`` (e.g. :class:`~revseg.models.hyperbolic_net.HyperbolicMemory`)."""

    def memory_report(self, spatial_shape: Sequence[int], batch_size: int = 1) -> Any: ...


@runtime_checkable
class AdaptiveRanks(Protocol):
    def ranks(self) -> list[int]: ...

    def set_ranks(self, rank: Any, **kwargs: Any) -> Any: ...


class TrainerView(Protocol):
    """What a callback may read and change of the trainer."""

    network: nn.Module  # the network itself (not the DDP or torch.compile wrapper)
    data: DataModule
    device: torch.device
    precision: str
    epoch: int  # epochs completed
    global_step: int
    should_stop: bool
    writer: Any | None  # a TensorBoard SummaryWriter on the main process

    def sync_optimizer_params(self) -> None:
        """Make the optimizer (and DDP) follow parameters a callback added or removed."""


def validation_metrics(data: Any, options: Mapping[str, Any]) -> Metrics:
    """The validation metrics of ``data``: its own (:class:`BuildsMetrics`, given the
    ``options`` its ``build_metrics`` names), else BraTS region metrics
    (:class:`~revseg.metrics.brats.RegionMetrics` with every option).

    Args:
        options: the ``metrics`` config group (``hd95``, ``lesion_wise``).
    """
    if not isinstance(data, BuildsMetrics):
        from revseg.metrics.brats import RegionMetrics

        return RegionMetrics(**options)
    parameters = inspect.signature(data.build_metrics).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return data.build_metrics(**options)
    names = {p.name for p in parameters}
    return data.build_metrics(**{k: v for k, v in options.items() if k in names})


def check_data_module(data: Any, key: str = "data") -> None:
    """Raise :class:`~revseg.errors.ConfigError` naming ``key`` and what is missing unless
    ``data`` is a :class:`DataModule`."""
    if isinstance(data, DataModule):
        return
    wanted = ("setup", "input_shape", "train_cases", "val_cases")
    wanted += ("train_dataloader", "val_dataloader")
    missing = [name for name in wanted if not hasattr(type(data), name)]
    raise ConfigError(
        f"{key}: {type(data).__module__}.{type(data).__qualname__} is not a data module "
        f"(missing {', '.join(missing)}; see revseg.training.contracts.DataModule)"
    )
