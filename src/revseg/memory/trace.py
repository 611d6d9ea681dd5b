"""The planner's tracer: the peak memory of a training step, predicted from two tiny traces.

Counting bytes module by module breaks whenever a model changes. The planner instead *traces*
one real training step (forward, loss, backward, optimizer step) of the model on two tiny inputs
on the CPU, under the storage tracker that the CPU peak meter also uses
(:class:`~revseg.memory.tracker.StorageTracker`): every tensor storage is recorded when an op
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
architecture, so any model is planned the same way.

The prediction is of tensor bytes, what ``torch.cuda.max_memory_allocated`` and the CPU tracker
report; scratch buffers inside kernels (CPU ``slow_conv3d`` columns, cuDNN workspaces) and the CUDA
allocator's rounding are not in it.

This module knows nothing of configs: it takes a model, an optimizer factory and a loss.
:mod:`revseg.memory.plan` plans a composed ``train`` config, or the objects ``train()`` built.

Example::

    step = trace_model(model, batch=1, in_channels=4, divisor=16,
                       optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-4), loss_fn=loss_fn)
    print(step.plan([160, 192, 160]).table())
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from revseg.memory.autocast_rules import check_precision, forward_autocast, trace_precision
from revseg.memory.measure import format_bytes
from revseg.memory.tracker import StorageTracker
from revseg.nn import fused_step
from revseg.nn.blocks import sizes_as_if_scaled
from revseg.nn.reversible import is_reversible_part
from revseg.validation import check_divisible

__all__ = ["CATEGORIES", "Plan", "StepModel", "trace_model"]

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


class _StepLedger(StorageTracker):
    """The storage tracker as a timeline: births and deaths (``deltas``) with a sample point
    after every op, and a category per storage."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.deltas: list[tuple[int, int]] = []  # (uid, +/- bytes) in time order
        self.points: list[int] = []  # len(deltas) right after each op's outputs
        self.initial: dict[int, int] = {}  # uid -> bytes alive from the start
        self.kind: dict[int, int] = {}  # uid -> category index or _FWD_*
        self.born_at: dict[int, int] = {}  # uid -> index in deltas
        self.dead_at: dict[int, int] = {}
        self.phase_kind = _CAT["workspace"]  # kind of storages born now
        self.found_kind = _CAT["workspace"]  # kind of storages found alive now

    def born(self, uid: int, nbytes: int, found: bool) -> None:
        self.kind[uid] = self.found_kind if found else self.phase_kind
        if found:  # alive since the start of the step
            self.initial[uid] = nbytes
        else:
            self.born_at[uid] = len(self.deltas)
            self.deltas.append((uid, nbytes))

    def resized(self, uid: int, delta: int) -> None:
        self.deltas.append((uid, delta))

    def freed(self, uid: int, nbytes: int) -> None:
        self.dead_at[uid] = len(self.deltas)
        self.deltas.append((uid, -nbytes))

    def op_done(self) -> None:
        self.points.append(len(self.deltas))

    def add_as(self, tensors: Any, kind: int) -> None:
        """Count the storages of ``tensors`` as alive since the start, in category ``kind``."""
        self.found_kind = kind
        try:
            self.add(tensors)
        finally:
            self.found_kind = _CAT["workspace"]

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
    precision: str = "fp32",
    rules: str = "cpu",
) -> _Trace:
    """Trace a training step on a random ``shape`` input, with the optimizer state in place (as
    in every step after the first); the forward and the loss under ``precision``'s autocast with
    ``rules``' op policy (:func:`~revseg.memory.autocast_rules.trace_precision`), fp16 with a
    gradient scaler, as the trainer runs them."""
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
    ledger = _StepLedger()
    ledger.add_as([*model.parameters(), *model.buffers()], _CAT["parameters"])
    if optimizer is not None:
        ledger.add_as(list(optimizer.state.values()), _CAT["optimizer state"])
    ledger.add_as([image, label], _CAT["batch"])

    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
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
        with ledger, trace_precision(precision, rules):
            with forward_autocast(precision):
                loss = loss_fn(model(image), label)
            forward_end = len(ledger.points)
            ledger.phase_kind = _CAT["workspace"]
            scaler.scale(loss).backward()
            if scaler.is_enabled() and optimizer is not None:
                scaler.unscale_(optimizer)
            backward_end = len(ledger.points)
            for p in model.parameters():
                if p.grad is not None:
                    ledger.kind[ledger.see(p.grad)] = _CAT["gradients"]
            if optimizer is not None:
                scaler.step(optimizer)
                scaler.update()
            del loss
    finally:
        ledger.close()
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
        precision: ``trainer.precision`` the step was traced at (fp32, bf16, fp16).
        rules: whose autocast op policy the trace applied (``cpu`` or ``cuda``).
    """

    model: str
    input_shape: tuple[int, ...]
    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    kept_after_forward: dict[str, int]
    params: int
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"
    rules: str = "cpu"

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
            f" x {self.input_shape[1]} x {shape}, {self.precision}"
            + ("" if self.precision == "fp32" else f" with {self.rules.upper()} autocast rules"),
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
            "precision": self.precision,
            "rules": self.rules,
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
    precision: str = "fp32"
    rules: str = "cpu"

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
            precision=self.precision,
            rules=self.rules,
        )

    def checked_plan(self, spatial: Sequence[int]) -> Plan:
        """:meth:`plan`, after checking that every size is a multiple of :attr:`divisor`.

        Raises:
            ConfigError: a size the model's downsamplings cannot take.
        """
        check_divisible(spatial, self.divisor, "input size", "the model's downsamplings")
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


def trace_model(
    model: nn.Module,
    batch: int,
    in_channels: int,
    divisor: int,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    name: str | None = None,
    planned_voxels: int | None = None,
    precision: str = "fp32",
    rules: str = "cpu",
    planned_shape: Sequence[int] | None = None,
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
        precision: ``trainer.precision``: fp32, or bf16 / fp16 autocast (fp16 with a gradient
            scaler), as the trainer runs the step.
        rules: the autocast op policy of the device the run will use, ``cpu`` or ``cuda``
            (:mod:`revseg.memory.autocast_rules`); the trace runs on the CPU either way.
        planned_shape: the ``(D, H, W)`` the plan is for: choices that depend on the sizes of
            every axis (:func:`~revseg.nn.blocks.conv_in_float32`) are taken as at that shape.

    Raises:
        ConfigError: an unknown precision or rules name.
    """
    check_precision(precision, rules)
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
                    precision,
                    rules,
                    planned_shape,
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
        precision=precision,
        rules=rules,
    )


def _trace_step_copy(
    model, optimizer_factory, loss_fn, shape, planned_voxels, precision, rules, planned_shape=None
) -> _Trace:
    """Trace a CPU copy of ``model``. The random input, labels and any random op of the model
    draw from a fixed seed inside a fork of the CPU generator: the caller's random stream is
    the same with or without planning, and so is the plan from one run to the next."""
    scale = 1.0 if planned_voxels is None else planned_voxels / math.prod(shape[2:])
    factors = (
        [1.0] * 3 if planned_shape is None else [p / s for p, s in zip(planned_shape, shape[2:])]
    )
    with (
        torch.random.fork_rng(devices=[]),
        fused_step.auto_chunks_as_if_scaled(scale),
        sizes_as_if_scaled(factors),
    ):
        torch.manual_seed(0)
        clone = copy.deepcopy(model).cpu().train()
        optimizer = optimizer_factory(clone.parameters()) if optimizer_factory else None
        return _trace_step(clone, optimizer, loss_fn, shape, precision, rules)


def _mean_square(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return logits.square().mean()
