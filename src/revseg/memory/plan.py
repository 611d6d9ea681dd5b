"""Memory planner, from the config: the predicted peak of a training step and what fits a budget.

The method is :mod:`revseg.memory.trace` (Hydra-free: a model, an optimizer factory, a loss). This
module is the glue to a run: it finds the input size, the batch, the input channels, the model's
divisor and name in the composed ``train`` config, and plans either what the config names
(:func:`plan_from_config`, the ``revseg-plan`` command, the benchmark) or the objects ``train()``
already built (:func:`plan_run`: its model, optimizer, loss and data module, nothing rebuilt).

Example::

    plan = plan_from_config(cfg)              # cfg: the composed ``train`` config
    print(plan.table())
    fit = fit_budget(cfg, budget_bytes=12 * 2**30)
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from revseg.device import autocast_dtype
from revseg.errors import ConfigError
from revseg.memory.autocast_rules import rules_for_device
from revseg.memory.trace import CATEGORIES, Plan, StepModel, trace_model
from revseg.validation import model_divisor, positive_ints

__all__ = [
    "CATEGORIES",
    "Plan",
    "BudgetFit",
    "StepModel",
    "trace_model",
    "plan_from_config",
    "plan_run",
    "step_model_from_config",
    "fit_budget",
    "deepest_fit",
    "input_shape_from_config",
    "compose_train_config",
    "precision_from_config",
]


# --------------------------------------------------------------------------------------------
# from the config


def input_shape_from_config(cfg: DictConfig) -> tuple[int, list[int]]:
    """``(batch, spatial)`` of a training input.

    ``data.patch_size`` if set, else ``data.crop_size``; for data configs without these, the
    data module's ``input_shape`` (built, not set up: nothing is read).

    Raises:
        ConfigError: no input size can be found, or it is not a list of positive ints.
    """
    data = cfg.get("data") or {}
    batch = int(data.get("batch_size", 1) or 1)
    for key in ("patch_size", "crop_size"):
        value = data.get(key)
        if value is None:
            continue
        return batch, list(positive_ints(value, f"data.{key}"))
    if data.get("_target_"):
        from revseg.config import build

        try:
            module = build(data, "data")
            shape = module.input_shape
        except Exception as err:  # noqa: BLE001 - any failure means: no size from the data module
            raise ConfigError(
                f"data: cannot get the input size to plan memory ({err})".splitlines()[0]
            ) from err
        return int(getattr(module, "batch_size", batch) or batch), list(
            positive_ints(shape, "data")
        )
    raise ConfigError("data.crop_size (or data.patch_size) is needed to plan memory")


def _name(cfg: DictConfig) -> str:
    from revseg.config import model_name

    choice = OmegaConf.select(cfg, "hydra.runtime.choices.model", default=None)
    if choice:  # composed with return_hydra_config=True (scripts/memory_plan.py)
        return str(choice)
    try:
        return model_name(cfg)
    except Exception:  # noqa: BLE001 - only a label
        return str(cfg.model.get("_target_", "model")).rsplit(".", 1)[-1]


def _loss_and_optimizer(cfg: DictConfig) -> tuple[Any, Any]:
    from revseg.config import build

    loss_fn = build(cfg.loss, "loss") if cfg.get("loss") else None
    opt = build(cfg.optimizer, "optimizer") if cfg.get("optimizer") else None
    if opt is not None and not callable(opt):
        raise ConfigError("optimizer: the config must be a _partial_ optimizer")
    return loss_fn, opt


def step_model_from_config(
    cfg: DictConfig, model: nn.Module | None = None, spatial: Sequence[int] | None = None
) -> StepModel:
    """:func:`trace_model` for the model, optimizer and loss the composed config names
    (``spatial``: the size the plan is for, where the model's slabs depend on it)."""
    from revseg.config import build

    if model is None:
        model = build(cfg.model, "model")
    batch, _ = input_shape_from_config(cfg)
    loss_fn, optimizer_factory = _loss_and_optimizer(cfg)
    return _trace(cfg, model, batch, spatial, optimizer_factory, loss_fn)


def _trace(
    cfg: DictConfig,
    model: nn.Module,
    batch: int,
    spatial: Sequence[int] | None,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> StepModel:
    """:func:`trace_model` with the input channels, divisor and name found in ``cfg``."""
    in_channels = int(cfg.model.get("in_channels", 0) or 0) or _first_conv_channels(model)
    precision, rules = precision_from_config(cfg)
    return trace_model(
        model,
        batch,
        in_channels,
        model_divisor(model),
        optimizer_factory=optimizer_factory,
        loss_fn=loss_fn,
        name=_name(cfg),
        planned_voxels=None if spatial is None else math.prod(spatial),
        planned_shape=None if spatial is None else list(spatial),
        precision=precision,
        rules=rules,
        ddp=str(OmegaConf.select(cfg, "trainer.strategy", default="single")) == "ddp",
        accumulate=int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1) or 1),
    )


def precision_from_config(cfg: DictConfig) -> tuple[str, str]:
    """``(precision, rules)`` of the run: ``trainer.precision`` (fp32 when unset) and the autocast
    rules of ``trainer.device`` (:func:`~revseg.memory.autocast_rules.rules_for_device`: a CPU
    machine plans ``trainer.device=cuda`` with CUDA's rules).

    Raises:
        ConfigError: an unknown precision or device name (one line naming the key).
    """
    trainer = cfg.get("trainer") or {}
    precision = str(trainer.get("precision", "fp32") or "fp32")
    autocast_dtype(precision)
    return precision, rules_for_device(str(trainer.get("device", "auto") or "auto"))


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    raise ConfigError("model.in_channels is needed to plan memory")


def _checked(step_model: StepModel, spatial: Sequence[int], writer: Any | None) -> Plan:
    plan = step_model.checked_plan(spatial)
    if writer is not None:
        writer.add_text("memory/plan", plan.table(), 0)
    return plan


def plan_from_config(
    cfg: DictConfig,
    model: nn.Module | None = None,
    spatial: Sequence[int] | None = None,
    writer: Any | None = None,
) -> Plan:
    """Predict the peak memory of a training step of the composed ``train`` config.

    Args:
        cfg: the composed config (model, data.crop_size / patch_size, batch_size, optimizer, loss).
        model: the built model (a CPU copy is traced; the model is not changed); ``None`` builds
            it from ``cfg.model``.
        spatial: plan for this spatial size instead of the config's.
        writer: a TensorBoard ``SummaryWriter``: the breakdown is logged as text
            (``memory/plan``) at step 0.

    Raises:
        ConfigError: the config lacks what the plan needs (one line naming the key).
    """
    if spatial is None:
        spatial = input_shape_from_config(cfg)[1]
    with torch.random.fork_rng(devices=[]):  # building a model draws its initial weights
        step_model = step_model_from_config(cfg, model, spatial)
    return _checked(step_model, spatial, writer)


def plan_run(
    cfg: DictConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    data: Any,
    writer: Any | None = None,
) -> Plan:
    """Predict the peak memory of a training step of the run ``train()`` set up.

    The objects are the run's own: nothing is built from the config again. A CPU copy of
    ``model`` is traced with a fresh optimizer of ``optimizer``'s class and ``defaults`` (per-group
    settings such as a scaled learning rate do not change the memory), ``loss_fn`` as it is, at
    ``data.input_shape`` with ``data.batch_size``; ``cfg`` only names the model (and its input
    channels, when the model does not say).

    Args:
        cfg: the composed ``train`` config of the run.
        model: the run's model (not changed; on any device).
        optimizer: the run's optimizer; ``None`` leaves the optimizer step out.
        loss_fn: the run's ``(logits, label) -> loss``; ``None``: the mean square of the logits.
        data: the run's data module (``input_shape``: ``(D, H, W)``; ``batch_size``, else the
            config's ``data.batch_size``).
        writer: a TensorBoard ``SummaryWriter``: the breakdown is logged as text
            (``memory/plan``) at step 0.

    Raises:
        ConfigError: the input size is not one the model takes.
    """
    spatial = [int(s) for s in data.input_shape]
    batch = int(getattr(data, "batch_size", 0) or 0) or int(cfg.data.get("batch_size", 1) or 1)
    factory = None if optimizer is None else _fresh_optimizer(optimizer)
    step_model = _trace(cfg, model, batch, spatial, factory, loss_fn)
    return _checked(step_model, spatial, writer)


def _fresh_optimizer(optimizer: torch.optim.Optimizer) -> Callable[[Any], torch.optim.Optimizer]:
    """``params -> optimizer`` of ``optimizer``'s class with its ``defaults`` (those its
    constructor takes: AdamW's ``defaults`` hold a ``decoupled_weight_decay`` it sets itself)."""
    cls = type(optimizer)
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return lambda params: cls(params, **kwargs)


# --------------------------------------------------------------------------------------------
# budgets


@dataclass
class BudgetFit:
    """What fits a memory budget (see :func:`fit_budget`).

    Attributes:
        budget_bytes: the budget.
        cube: the largest cube ``[s, s, s]`` (s a multiple of the divisor) that fits, or ``None``.
        scaled_crop: the config's crop scaled by one factor (each side rounded down to the
            divisor) as large as fits, or ``None``.
        encoder_depth: the deepest ``model.encoder_depth`` that fits at the config's input, or
            ``None`` when the model has no such key; ``encoder_depth_capped`` tells it is only a
            lower bound (the search stops at ``max_depth``).
        plans: the plans of the answers, by name.
    """

    budget_bytes: int
    cube: list[int] | None
    scaled_crop: list[int] | None
    encoder_depth: int | None
    encoder_depth_capped: bool
    plans: dict[str, Plan]


def _scaled(shape: Sequence[int], t: float, divisor: int) -> list[int]:
    return [max(divisor, int(s * t) // divisor * divisor) for s in shape]


def fit_budget(
    cfg: DictConfig, budget_bytes: float, max_depth: int = 16, depth: bool = True
) -> BudgetFit:
    """The largest field of view, and the deepest encoder, whose predicted total
    (:attr:`Plan.total_bytes`: for a CUDA run with the computed terms and the estimated allowance,
    a margin stated in each plan's table) fits the budget.

    Raises:
        ConfigError: as :func:`plan_from_config`.
    """
    from revseg.config import build

    model = build(cfg.model, "model")
    step_model = step_model_from_config(cfg, model)
    divisor = step_model.divisor
    _, crop = input_shape_from_config(cfg)
    vmax = step_model.max_voxels(budget_bytes)  # traced + fixed terms: an upper bound

    def fits(shape: list[int]) -> bool:
        return math.prod(shape) <= vmax and step_model.plan(shape).total_bytes <= budget_bytes

    plans: dict[str, Plan] = {}
    side = int(round(vmax ** (1 / 3))) // divisor * divisor if vmax > 0 else 0
    while side > 0 and not fits([side] * 3):
        side -= divisor
    cube = [side] * 3 if side >= divisor else None
    if cube:
        plans["cube"] = step_model.plan(cube)
    scaled = None
    if fits(_scaled(crop, 0.0, divisor)):
        lo, hi = 0.0, 1.0
        while fits(_scaled(crop, hi, divisor)) and hi < 1e4:
            lo, hi = hi, 2 * hi
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(_scaled(crop, mid, divisor)) else (lo, mid)
        scaled = _scaled(crop, lo, divisor)
        plans["scaled_crop"] = step_model.plan(scaled)
    best_depth, capped = None, False
    if depth and "encoder_depth" in cfg.model:
        best_depth, capped = _deepest(cfg, crop, budget_bytes, max_depth, plans)
    return BudgetFit(int(budget_bytes), cube, scaled, best_depth, capped, plans)


def _deepest(
    cfg: DictConfig, crop: Sequence[int], budget: float, max_depth: int, plans: dict[str, Plan]
) -> tuple[int | None, bool]:
    """:func:`deepest_fit` over ``model.encoder_depth``, its plan kept in ``plans``."""
    depth, capped, plan = deepest_fit(cfg, crop, budget, max_depth)
    if plan is not None:
        plans["encoder_depth"] = plan
    return depth, capped


def deepest_fit(
    cfg: DictConfig,
    spatial: Sequence[int],
    budget_bytes: float,
    max_depth: int = 16,
    key: str = "encoder_depth",
) -> tuple[int | None, bool, Plan | None]:
    """The largest ``model.<key>`` (an int: blocks per level, ``encoder_depth`` or the baseline's
    ``encoder_blocks``) whose plan at ``spatial`` fits the budget, by bisection (peak memory
    grows monotonically with depth).

    Returns:
        ``(depth, capped, plan)``: ``None`` depth (and plan) when even 1 does not fit; ``capped``
        when ``max_depth`` fits, so the answer is only a lower bound.
    """
    cache: dict[int, Plan] = {}

    def plan_at(d: int) -> Plan:
        if d not in cache:
            c = copy.deepcopy(cfg)
            OmegaConf.update(c, f"model.{key}", d, merge=False)
            cache[d] = plan_from_config(c, spatial=spatial)
        return cache[d]

    if plan_at(1).total_bytes > budget_bytes:
        return None, False, None
    lo, hi = 1, 2
    while hi <= max_depth and plan_at(hi).total_bytes <= budget_bytes:
        lo, hi = hi, 2 * hi
    if hi > max_depth:
        if plan_at(max_depth).total_bytes <= budget_bytes:
            return max_depth, True, plan_at(max_depth)
        hi = max_depth
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan_at(mid).total_bytes <= budget_bytes else (lo, mid)
    return lo, False, plan_at(lo)


def compose_train_config(overrides: Sequence[str]) -> DictConfig:
    """The composed ``train`` config, as ``python train.py <overrides>`` would see it (with the
    ``hydra`` node, whose ``runtime.choices`` name the model); ``data.root`` may stay unset.

    Raises:
        ConfigError: an unknown group option or key, or a bad value (one line).
    """
    from revseg.config import compose_config

    cfg = compose_config("train", overrides, require=False, return_hydra_config=True)
    # the data location is not needed to plan memory
    if OmegaConf.is_missing(cfg.data, "root"):
        cfg.data.root = None
    return cfg
