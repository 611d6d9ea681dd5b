"""Memory planner: the peak memory of a training step, predicted from the config before training.

Counting bytes module by module breaks whenever a model changes. The planner instead *traces*
one real training step (forward, loss, backward, optimizer step) of the model on two tiny inputs
on the CPU, under a dispatch-mode ledger like the CPU tracker of
:class:`~revseg.memory.measure.PeakMemoryMeter`: every tensor storage is recorded when an op
creates it and when it is freed. Each storage gets a category:

* ``parameters``, ``optimizer state`` (Adam: two moments per parameter), ``batch`` (input and
  label): alive for the whole step;
* ``gradients``: the parameters' ``.grad`` storages;
* ``reversible states``: created in the forward pass inside a memory-saving reversible module (a
  module with ``inverse`` and ``memory_saving = True``) and still alive when the forward ends:
  what reversible parts keep for backward (one output per sequence);
* ``non-reversible activations``: created in the forward pass outside them and still alive when
  the forward ends (saved activations, skips, logits);
* ``workspace``: everything else: forward temporaries, the recomputation of reversible blocks,
  gradient temporaries of the backward, the optimizer's scratch.

Tensor sizes of these models are affine in the number of voxels (activations grow with it, GroupNorm
statistics and parameters do not), and the sequence of ops does not depend on the input size. So
at every point of the step, each category is ``fixed + per_voxel * voxels``; two traces give both
terms, and the predicted peak at any field of view is the maximum over the step's points of the
extrapolated live bytes (Hascoet et al. 2019 model memory as bytes per pixel; this is the same idea
resolved in time). The breakdown reports the categories at that peak. Nothing is assumed about the
architecture, so any model the config names is planned the same way.

The prediction is of tensor bytes, what ``torch.cuda.max_memory_allocated`` and the CPU tracker
report; scratch buffers inside kernels (CPU ``slow_conv3d`` columns, cuDNN workspaces) and the CUDA
allocator's rounding are not in it.

Example::

    plan = plan_from_config(cfg)              # cfg: the composed ``train`` config
    print(plan.table())
    fit = fit_budget(cfg, budget_bytes=12 * 2**30)
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from revseg.errors import ConfigError
from revseg.memory.measure import format_bytes
from revseg.nn import fused_step
from revseg.nn.reversible import is_reversible_part

__all__ = [
    "CATEGORIES",
    "Plan",
    "BudgetFit",
    "StepModel",
    "trace_model",
    "plan_from_config",
    "fit_budget",
    "input_shape_from_config",
    "compose_train_config",
    "model_divisor",
]

CATEGORIES = (
    "parameters",
    "gradients",
    "optimizer state",
    "batch",
    "reversible states",
    "non-reversible activations",
    "workspace",
)
_CAT = {name: i for i, name in enumerate(CATEGORIES)}
_FWD_REV, _FWD_PLAIN = -1, -2  # born in the forward pass, inside / outside reversible parts


# --------------------------------------------------------------------------------------------
# the ledger


class _Ref(weakref.ref):
    __slots__ = ("uid", "nbytes")


class _Ledger(TorchDispatchMode):
    """Records storage births and deaths (``deltas``) and a sample point after every op."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas: list[tuple[int, int]] = []  # (uid, +/- bytes) in time order
        self.points: list[int] = []  # len(deltas) right after each op's outputs
        self.initial: dict[int, int] = {}  # uid -> bytes alive from the start
        self.kind: dict[int, int] = {}  # uid -> category index or _FWD_*
        self.born_at: dict[int, int] = {}  # uid -> index in deltas
        self.dead_at: dict[int, int] = {}
        self._refs: dict[int, _Ref] = {}
        self._next = 0
        self.phase_kind = _CAT["workspace"]  # kind of storages born now

    def _free(self, ref: _Ref) -> None:
        self.dead_at[ref.uid] = len(self.deltas)
        self.deltas.append((ref.uid, -ref.nbytes))

    def uid_of(self, t: torch.Tensor) -> int | None:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        ref = self._refs.get(id(s))
        return ref.uid if ref is not None and ref() is s else None

    def see(self, t: torch.Tensor, kind: int, initial: bool) -> None:
        if t.device.type != "cpu":
            return
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        nbytes = s.nbytes()
        ref = self._refs.get(id(s))
        if ref is not None and ref() is s:
            if nbytes != ref.nbytes:  # resize_
                self.deltas.append((ref.uid, nbytes - ref.nbytes))
                ref.nbytes = nbytes
            return
        ref = _Ref(s, self._free)
        ref.uid, ref.nbytes = self._next, nbytes
        self._next += 1
        self._refs[id(s)] = ref
        self.kind[ref.uid] = kind
        if initial:  # alive since the start of the step
            self.initial[ref.uid] = nbytes
        else:
            self.born_at[ref.uid] = len(self.deltas)
            self.deltas.append((ref.uid, nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, tuple(kwargs.values()))):
            self.see(t, _CAT["workspace"], initial=True)  # no-op for known storages
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self.see(t, self.phase_kind, initial=False)
        self.points.append(len(self.deltas))
        return out

    def timeline(self, forward_end: int) -> np.ndarray:
        """Live bytes per category at each sample point: ``(len(CATEGORIES), n_points)``."""
        cut = self.points[forward_end - 1] if forward_end else 0
        kept = set(self.initial) | {u for u, i in self.born_at.items() if i < cut}
        kept -= {u for u, i in self.dead_at.items() if i < cut}
        cat = {}
        for uid, kind in self.kind.items():
            if kind == _FWD_REV:
                kind = _CAT["reversible states"] if uid in kept else _CAT["workspace"]
            elif kind == _FWD_PLAIN:
                kind = _CAT["non-reversible activations"] if uid in kept else _CAT["workspace"]
            cat[uid] = kind
        current = np.zeros(len(CATEGORIES), dtype=np.float64)
        for uid, nbytes in self.initial.items():
            current[cat[uid]] += nbytes
        out = np.empty((len(CATEGORIES), len(self.points)), dtype=np.float64)
        position = 0
        for k, end in enumerate(self.points):
            for uid, delta in self.deltas[position:end]:
                current[cat[uid]] += delta
            position = end
            out[:, k] = current
        return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def _is_reversible(module: nn.Module) -> bool:
    return is_reversible_part(module) and bool(module.memory_saving)


# --------------------------------------------------------------------------------------------
# tracing one training step


@dataclass
class _Trace:
    voxels: int  # spatial voxels of one sample
    timeline: np.ndarray  # (categories, points)
    phases: tuple[int, int]  # first point of backward, first point of the optimizer step


def _region_label(logits: torch.Tensor) -> torch.Tensor:
    return (torch.rand_like(logits) > 0.5).to(logits.dtype)


def _trace_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
) -> _Trace:
    """Trace a training step on a random ``shape`` input, with the optimizer state in place (as
    in every step after the first)."""
    dtype = next(model.parameters()).dtype
    image = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        label = _region_label(model(image))

    if optimizer is not None:  # make the optimizer state, as after a first training step
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
    model.zero_grad(set_to_none=True)
    ledger = _Ledger()
    params = list(model.parameters()) + list(model.buffers())
    for p in params:
        ledger.see(p, _CAT["parameters"], initial=True)
    if optimizer is not None:
        for t in _tensors([dict(s) for s in optimizer.state.values()]):
            ledger.see(t, _CAT["optimizer state"], initial=True)
    for t in (image, label):
        ledger.see(t, _CAT["batch"], initial=True)

    depth = [0]

    def enter(*_: Any) -> None:
        depth[0] += 1
        ledger.phase_kind = _FWD_REV

    def leave(*_: Any) -> None:
        depth[0] -= 1
        ledger.phase_kind = _FWD_REV if depth[0] else _FWD_PLAIN

    handles = []
    for module in model.modules():
        if _is_reversible(module):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    try:
        ledger.phase_kind = _FWD_PLAIN
        with ledger:
            loss = loss_fn(model(image), label)
            forward_end = len(ledger.points)
            ledger.phase_kind = _CAT["workspace"]
            loss.backward()
            backward_end = len(ledger.points)
            for p in model.parameters():
                if p.grad is not None:
                    ledger.see(p.grad, _CAT["workspace"], initial=False)
                    ledger.kind[ledger.uid_of(p.grad)] = _CAT["gradients"]
            if optimizer is not None:
                optimizer.step()
            del loss
    finally:
        for h in handles:
            h.remove()
    timeline = ledger.timeline(forward_end)
    model.zero_grad(set_to_none=True)
    return _Trace(math.prod(shape[2:]), timeline, (forward_end, backward_end))


# --------------------------------------------------------------------------------------------
# the affine model and the plan


@dataclass
class Plan:
    """Predicted peak memory of one training step and what it is made of.

    Attributes:
        model: the model's name.
        input_shape: ``(B, C_in, D, H, W)`` of the training input.
        peak_bytes: predicted peak tensor bytes of a training step.
        breakdown: bytes per category (:data:`CATEGORIES`) live at the predicted peak.
        peak_phase: ``forward``, ``backward`` or ``optimizer``: where the peak falls.
        kept_after_forward: bytes kept for backward when the forward ends, by reversible parts
            and by non-reversible parts.
        params: number of parameters.
        notes: caveats of this plan (e.g. a surrogate loss).
    """

    model: str
    input_shape: tuple[int, ...]
    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    kept_after_forward: dict[str, int]
    params: int
    notes: list[str] = field(default_factory=list)

    @property
    def voxels(self) -> int:
        """Voxels of the training batch (``B * D * H * W``)."""
        return self.input_shape[0] * math.prod(self.input_shape[2:])

    @property
    def bytes_per_voxel(self) -> float:
        return self.peak_bytes / self.voxels

    def table(self) -> str:
        """The breakdown as a Markdown table (also readable as plain text and in TensorBoard)."""
        shape = "x".join(map(str, self.input_shape[2:]))
        lines = [
            f"memory plan: {self.model}, {self.params:,} parameters, batch {self.input_shape[0]}"
            f" x {self.input_shape[1]} x {shape}",
            "",
            "| part | bytes | size | share |",
            "|---|---:|---:|---:|",
        ]
        for name in CATEGORIES:
            value = self.breakdown[name]
            share = 100 * value / self.peak_bytes if self.peak_bytes else 0.0
            lines.append(f"| {name} | {value:,} | {format_bytes(value)} | {share:.1f}% |")
        lines.append(
            f"| **predicted peak** ({self.peak_phase}) | {self.peak_bytes:,} | "
            f"**{format_bytes(self.peak_bytes)}** | 100% |"
        )
        kept = self.kept_after_forward
        lines += [
            "",
            f"kept for backward when the forward ends: reversible parts "
            f"{format_bytes(kept['reversible'])}, non-reversible parts "
            f"{format_bytes(kept['non-reversible'])}; {self.bytes_per_voxel:.0f} bytes per voxel",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "breakdown": dict(self.breakdown),
            "kept_after_forward": dict(self.kept_after_forward),
            "bytes_per_voxel": self.bytes_per_voxel,
            "params": self.params,
            "notes": list(self.notes),
        }


@dataclass
class StepModel:
    """Live bytes of a training step as ``fixed + per_voxel * voxels`` per category and point.

    Built by :func:`trace_model` from two traces; :meth:`plan` evaluates it at any input size and
    :meth:`max_voxels` inverts it for a memory budget.
    """

    model: str
    batch: int
    in_channels: int
    divisor: int
    params: int
    fixed: np.ndarray  # (categories, points)
    per_voxel: np.ndarray  # (categories, points)
    phases: tuple[int, int]
    notes: list[str]

    def live(self, voxels: int) -> np.ndarray:
        return self.fixed + self.per_voxel * voxels

    def plan(self, spatial: Sequence[int]) -> Plan:
        """The plan for an input of spatial size ``spatial`` (D, H, W)."""
        live = self.live(math.prod(spatial))
        total = live.sum(axis=0)
        k = int(np.argmax(total))
        fwd_end = self.phases[0] - 1
        kept = live[:, fwd_end] if fwd_end >= 0 else np.zeros(len(CATEGORIES))
        phase = (
            "forward" if k < self.phases[0] else "backward" if k < self.phases[1] else "optimizer"
        )
        return Plan(
            model=self.model,
            input_shape=(self.batch, self.in_channels, *map(int, spatial)),
            peak_bytes=int(round(total[k])),
            breakdown={name: int(round(live[i, k])) for i, name in enumerate(CATEGORIES)},
            peak_phase=phase,
            kept_after_forward={
                "reversible": int(round(kept[_CAT["reversible states"]])),
                "non-reversible": int(round(kept[_CAT["non-reversible activations"]])),
            },
            params=self.params,
            notes=list(self.notes),
        )

    def checked_plan(self, spatial: Sequence[int]) -> Plan:
        """:meth:`plan`, after checking that every size is a multiple of :attr:`divisor`.

        Raises:
            ConfigError: a size the model's downsamplings cannot take.
        """
        if any(s % self.divisor for s in spatial):
            raise ConfigError(
                f"input size {list(spatial)}: every size must be divisible by {self.divisor} "
                f"(the model's downsamplings)"
            )
        return self.plan(spatial)

    def max_voxels(self, budget_bytes: float) -> int:
        """The most spatial voxels per sample whose predicted peak fits ``budget_bytes``."""
        fixed, slope = self.fixed.sum(axis=0), self.per_voxel.sum(axis=0)
        if np.any(fixed > budget_bytes):
            return 0
        growing = slope > 0
        if not growing.any():
            return np.iinfo(np.int64).max
        return int(np.floor(np.min((budget_bytes - fixed[growing]) / slope[growing])))


def model_divisor(model: nn.Module, cfg: DictConfig | None = None, in_channels: int = 1) -> int:
    """The size every spatial dimension must be a multiple of.

    The model's ``divisor`` attribute, else ``2 ** (len(channels) - 1)`` for a config with a list
    of channels per level, else the smallest power of two a forward pass accepts.
    """
    divisor = getattr(model, "divisor", None)
    if divisor:
        return int(divisor)
    channels = cfg.model.get("channels") if cfg is not None else None
    if OmegaConf.is_list(channels) or isinstance(channels, (list, tuple)):
        return 2 ** (len(channels) - 1)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    clone = copy.deepcopy(model).cpu().eval()
    for k in range(8):
        try:
            with torch.no_grad():
                clone(torch.zeros(1, in_channels, *(2**k,) * 3, dtype=dtype))
        except (RuntimeError, ValueError):
            continue
        return 2**k
    raise ConfigError("cannot find an input size the model accepts (tried 1 to 128 per side)")


def trace_model(
    model: nn.Module,
    batch: int,
    in_channels: int,
    divisor: int,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    name: str | None = None,
    planned_voxels: int | None = None,
) -> StepModel:
    """Trace two training steps of a CPU copy of ``model`` and fit the affine memory model.

    Args:
        model: the model (left untouched: a copy is traced, on the CPU).
        batch: the training batch size.
        in_channels: input channels.
        divisor: spatial sizes must be multiples of it (the traces use ``divisor`` and twice it).
        optimizer_factory: ``params -> optimizer`` (the config's ``_partial_`` optimizer); ``None``
            leaves the optimizer step out.
        loss_fn: ``(logits, label) -> loss``, label a random ``{0, 1}`` tensor shaped as logits;
            ``None`` uses the mean square of the logits.
        name: the model's name in reports.
        planned_voxels: the spatial voxels per sample the plan is for: reversible sequences
            with ``chunks="auto"`` are traced with the slabs they take at that size
            (:func:`~revseg.nn.fused_step.auto_chunks_as_if_scaled`); ``None``: at the traced
            sizes (usually whole volumes, so an upper bound for larger inputs).
    """
    notes: list[str] = []
    if loss_fn is None:
        loss_fn = _mean_square
        notes.append("loss: mean square of the logits")
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # tiny ops: threads only cost synchronisation (a lot, on a busy machine)
    try:
        # the smallest inputs first; a model whose ops change at sizes of 1 voxel (a reshape that
        # copies or not) gets larger ones
        for scale in (1, 2, 4):
            side = scale * divisor
            a, b = (
                _trace_step_copy(
                    model,
                    optimizer_factory,
                    loss_fn,
                    (batch, in_channels, *spatial),
                    planned_voxels,
                )
                for spatial in ((side,) * 3, (2 * side, side, side))
            )
            if a.timeline.shape == b.timeline.shape and a.phases == b.phases:
                break
    finally:
        torch.set_num_threads(threads)
    if a.timeline.shape != b.timeline.shape or a.phases != b.phases:
        # the op sequence still changes with the input size: extrapolate the peaks instead
        notes.append(
            "op sequence depends on the input size: peak extrapolated, not resolved in time"
        )
        a_tl = a.timeline[:, [int(np.argmax(a.timeline.sum(0)))]]
        b_tl = b.timeline[:, [int(np.argmax(b.timeline.sum(0)))]]
        phases = (0, 1)
    else:
        a_tl, b_tl, phases = a.timeline, b.timeline, a.phases
    per_voxel = (b_tl - a_tl) / (b.voxels - a.voxels)
    fixed = a_tl - per_voxel * a.voxels
    params = sum(p.numel() for p in model.parameters())
    return StepModel(
        model=name or type(model).__name__,
        batch=batch,
        in_channels=in_channels,
        divisor=divisor,
        params=params,
        fixed=fixed,
        per_voxel=per_voxel,
        phases=phases,
        notes=notes,
    )


def _trace_step_copy(model, optimizer_factory, loss_fn, shape, planned_voxels) -> _Trace:
    """Trace a CPU copy of ``model``. The random input, labels and any random op of the model
    draw from a fixed seed inside a fork of the CPU generator: the caller's random stream is
    the same with or without planning, and so is the plan from one run to the next."""
    scale = 1.0 if planned_voxels is None else planned_voxels / math.prod(shape[2:])
    with torch.random.fork_rng(devices=[]), fused_step.auto_chunks_as_if_scaled(scale):
        torch.manual_seed(0)
        clone = copy.deepcopy(model).cpu().train()
        optimizer = optimizer_factory(clone.parameters()) if optimizer_factory else None
        return _trace_step(clone, optimizer, loss_fn, shape)


def _mean_square(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return logits.square().mean()


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
        return batch, _positive_ints(value, f"data.{key}")
    if data.get("_target_"):
        from revseg.config import build

        try:
            module = build(data, "data")
            shape = module.input_shape
        except Exception as err:  # noqa: BLE001 - any failure means: no size from the data module
            raise ConfigError(
                f"data: cannot get the input size to plan memory ({err})".splitlines()[0]
            ) from err
        return int(getattr(module, "batch_size", batch) or batch), _positive_ints(shape, "data")
    raise ConfigError("data.crop_size (or data.patch_size) is needed to plan memory")


def _positive_ints(value: Any, key: str) -> list[int]:
    try:
        spatial = [int(v) for v in value]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} must be a list of positive ints, got {value!r}") from err
    if not spatial or any(v < 1 for v in spatial):
        raise ConfigError(f"{key} must be a list of positive ints, got {value!r}")
    return spatial


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
    in_channels = int(cfg.model.get("in_channels", 0) or 0) or _first_conv_channels(model)
    loss_fn, optimizer_factory = _loss_and_optimizer(cfg)
    return trace_model(
        model,
        batch,
        in_channels,
        model_divisor(model, cfg, in_channels),
        optimizer_factory=optimizer_factory,
        loss_fn=loss_fn,
        name=_name(cfg),
        planned_voxels=None if spatial is None else math.prod(spatial),
    )


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    raise ConfigError("model.in_channels is needed to plan memory")


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
    plan = step_model.checked_plan(spatial)
    if writer is not None:
        writer.add_text("memory/plan", plan.table(), 0)
    return plan


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
    """The largest field of view, and the deepest encoder, whose predicted peak fits the budget.

    Raises:
        ConfigError: as :func:`plan_from_config`.
    """
    from revseg.config import build

    model = build(cfg.model, "model")
    step_model = step_model_from_config(cfg, model)
    divisor = step_model.divisor
    _, crop = input_shape_from_config(cfg)
    vmax = step_model.max_voxels(budget_bytes)
    plans: dict[str, Plan] = {}
    side = int(round(vmax ** (1 / 3))) // divisor * divisor if vmax > 0 else 0
    while side > 0 and side**3 > vmax:
        side -= divisor
    cube = [side] * 3 if side >= divisor else None
    if cube:
        plans["cube"] = step_model.plan(cube)
    scaled = None
    if math.prod(_scaled(crop, 0.0, divisor)) <= vmax:
        lo, hi = 0.0, 1.0
        while math.prod(_scaled(crop, hi, divisor)) <= vmax and hi < 1e4:
            lo, hi = hi, 2 * hi
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if math.prod(_scaled(crop, mid, divisor)) <= vmax else (lo, mid)
        scaled = _scaled(crop, lo, divisor)
        plans["scaled_crop"] = step_model.plan(scaled)
    best_depth, capped = None, False
    if depth and "encoder_depth" in cfg.model:
        best_depth, capped = _deepest(cfg, crop, budget_bytes, max_depth, plans)
    return BudgetFit(int(budget_bytes), cube, scaled, best_depth, capped, plans)


def _deepest(
    cfg: DictConfig, crop: Sequence[int], budget: float, max_depth: int, plans: dict[str, Plan]
) -> tuple[int | None, bool]:
    """Bisection over ``model.encoder_depth`` (peak memory grows monotonically with depth)."""
    cache: dict[int, Plan] = {}

    def plan_at(d: int) -> Plan:
        if d not in cache:
            c = copy.deepcopy(cfg)
            OmegaConf.update(c, "model.encoder_depth", d, merge=False)
            cache[d] = plan_from_config(c, spatial=crop)
        return cache[d]

    if plan_at(1).peak_bytes > budget:
        return None, False
    lo, hi = 1, 2
    while hi <= max_depth and plan_at(hi).peak_bytes <= budget:
        lo, hi = hi, 2 * hi
    if hi > max_depth:
        if plan_at(max_depth).peak_bytes <= budget:
            plans["encoder_depth"] = plan_at(max_depth)
            return max_depth, True
        hi = max_depth
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan_at(mid).peak_bytes <= budget else (lo, mid)
    plans["encoder_depth"] = plan_at(lo)
    return lo, False


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
