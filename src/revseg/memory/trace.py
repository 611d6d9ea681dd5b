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

The traced prediction is of tensor bytes, what the CPU tracker reports; scratch buffers inside
kernels (CPU ``slow_conv3d`` columns, cuDNN workspaces) are not in it. A plan for a CUDA run
(``rules="cuda"``) is taken further towards what the GPU holds (:class:`Plan`): the optimizer
step is traced with ``foreach=True`` (torch's default for CUDA parameters, whose temporaries
hold a whole parameter-size at once), autocast's weight cache is in the trace already (CPU
autocast caches the same low-precision weight copies), and it *computes* the caching
allocator's rounding of every traced allocation (:func:`cuda_block_bytes`) and, under DDP, the
gradient buckets (:func:`ddp_bucket_bytes`); what it cannot trace is a separate, labelled
*allowance* (:data:`CUDA_CONTEXT_BYTES`, a cuDNN workspace, the allocator's block slack).

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
from dataclasses import dataclass, field, replace
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
from revseg.step import TrainStep, make_optimizer_state
from revseg.validation import check_divisible

__all__ = [
    "CATEGORIES",
    "CUDA_CONTEXT_BYTES",
    "Plan",
    "StepModel",
    "cpu_copy",
    "cuda_block_bytes",
    "ddp_bucket_bytes",
    "trace_model",
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
# the CUDA device: what the trace cannot see

# PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, unchanged since 1.x):
# ``round_size`` rounds every request up to a multiple of ``kMinBlockSize`` = 512 B (without
# PYTORCH_CUDA_ALLOC_CONF=roundup_power2_divisions), and ``max_memory_allocated`` counts these
# block sizes. Requests up to ``kSmallSize`` = 1 MiB share 2 MiB segments, larger ones come from
# 20 MiB segments (up to 10 MiB) or segments rounded up to 2 MiB (``get_allocation_size``); a
# cached block of the large pool is split only when more than 1 MiB would remain
# (``should_split``), so a block over 1 MiB may be handed out up to 1 MiB larger than asked.
CUDA_MIN_BLOCK = 512
CUDA_SMALL_SIZE = 2**20
# The CUDA context, the kernels it loads and the cuBLAS/cuDNN handles live outside PyTorch's
# allocator: counted neither by ``max_memory_allocated`` nor by ``memory_reserved``, but in the
# card's memory (``nvidia-smi``). About 0.3-0.6 GiB per process with CUDA 12's lazy module
# loading; the planner takes 512 MiB.
CUDA_CONTEXT_BYTES = 512 * 2**20
# DistributedDataParallel's default ``bucket_cap_mb`` (the first bucket is
# ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``, 1 MiB)
DDP_BUCKET_CAP_MB = 25


def cuda_block_bytes(nbytes: Any) -> Any:
    """The block the CUDA caching allocator gives a request of ``nbytes`` (an int or an array):
    rounded up to a multiple of 512 B, at least 512 B; ``0`` for an empty tensor (no block)."""
    n = np.asarray(nbytes, dtype=np.int64)
    blocks = np.where(n > 0, -(-n // CUDA_MIN_BLOCK) * CUDA_MIN_BLOCK, 0)
    return int(blocks) if blocks.ndim == 0 else blocks


def ddp_bucket_bytes(
    params: Sequence[torch.Tensor], bucket_cap_mb: float = DDP_BUCKET_CAP_MB
) -> list[int]:
    """Bytes of each gradient bucket DistributedDataParallel allocates for ``params``.

    The reducer keeps one flat tensor per bucket for the whole run, one element per element of
    every trainable parameter; with ``gradient_as_bucket_view=False`` (the default, and the
    trainer's) the ``.grad`` tensors are separate, so the buckets are one more parameter-size of
    gradients. Buckets are assigned as DDP's reducer rebuilds them after the first step (first
    bucket 1 MiB, then ``bucket_cap_mb``); torch 2.13 starts with one bucket of all. The sizes
    differ by version and by step, the total does not.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return []
    sizes = [p.numel() * p.element_size() for p in params]
    import torch.distributed as dist

    if not dist.is_available():  # one bucket per cap (the total is what matters)
        return sizes
    limits = [dist._DEFAULT_FIRST_BUCKET_BYTES, int(bucket_cap_mb * 2**20)]
    buckets, _ = dist._compute_bucket_assignment_by_size(params, limits, [False] * len(params))
    return [sum(sizes[i] for i in bucket) for bucket in buckets]


def cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU, its parameters and buffers copied straight to the CPU: a
    model on a GPU is not first deep-copied there (its parameters twice on the GPU)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


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
        self.event: list[int] = []  # per delta: +1 birth, -1 death, 0 resize
        self.size: dict[int, int] = {}  # uid -> bytes when born or found

    def born(self, uid: int, nbytes: int, found: bool) -> None:
        self.kind[uid] = self.found_kind if found else self.phase_kind
        self.size[uid] = nbytes
        if found:  # alive since the start of the step
            self.initial[uid] = nbytes
        else:
            self.born_at[uid] = len(self.deltas)
            self.deltas.append((uid, nbytes))
            self.event.append(1)

    def resized(self, uid: int, delta: int) -> None:
        self.deltas.append((uid, delta))
        self.event.append(0)

    def freed(self, uid: int, nbytes: int) -> None:
        self.dead_at[uid] = len(self.deltas)
        self.deltas.append((uid, -nbytes))
        self.event.append(-1)

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

    def allocations(self) -> _Allocations:
        """The step's allocations one by one: what the allocator rounding is computed from."""
        n = max(self.size, default=-1) + 1
        sizes = np.zeros(n, dtype=np.float64)
        for uid, nbytes in self.size.items():
            sizes[uid] = nbytes
        return _Allocations(
            uids=np.fromiter((u for u, _ in self.deltas), dtype=np.int64, count=len(self.deltas)),
            events=np.asarray(self.event, dtype=np.int64),
            points=np.asarray(self.points, dtype=np.int64),
            initial=np.fromiter(self.initial, dtype=np.int64, count=len(self.initial)),
            fixed=sizes,
            per_voxel=np.zeros(n),
        )


@dataclass
class _Allocations:
    """Each allocation's bytes as ``fixed + per_voxel * voxels`` (by uid) and its births and
    deaths in time order, sampled at the step's points."""

    uids: np.ndarray  # per event: the storage
    events: np.ndarray  # per event: +1 born, -1 freed, 0 resized (not rounded)
    points: np.ndarray  # per point: number of events before it
    initial: np.ndarray  # uids alive from the start
    fixed: np.ndarray  # by uid
    per_voxel: np.ndarray  # by uid

    def same_sequence(self, other: _Allocations) -> bool:
        return (
            self.fixed.shape == other.fixed.shape
            and np.array_equal(self.uids, other.uids)
            and np.array_equal(self.events, other.events)
            and np.array_equal(self.points, other.points)
            and np.array_equal(self.initial, other.initial)
        )

    def at(self, voxels: int) -> tuple[np.ndarray, np.ndarray, int]:
        """At ``voxels``: per point, the bytes the 512 B block rounding adds and the number of
        live blocks over 1 MiB; and the largest single allocation."""
        sizes = np.maximum(np.rint(self.fixed + self.per_voxel * voxels), 0).astype(np.int64)
        blocks = cuda_block_bytes(sizes)
        extra, large = blocks - sizes, (blocks > CUDA_SMALL_SIZE).astype(np.int64)
        signs = np.where(self.events == 0, 0, self.events)
        out = []
        for per_uid in (extra, large):
            steps = np.concatenate([[0], np.cumsum(signs * per_uid[self.uids])])
            out.append(per_uid[self.initial].sum() + steps[self.points])
        return out[0], out[1], int(sizes.max(initial=0))


def _is_reversible(module: nn.Module) -> bool:
    return is_reversible_part(module) and bool(module.memory_saving)


# --------------------------------------------------------------------------------------------
# tracing one training step


@dataclass
class _Trace:
    voxels: int  # spatial voxels of one sample
    timeline: np.ndarray  # (categories, points)
    phases: tuple[int, int]  # first point of backward, first point of the optimizer step
    allocations: _Allocations
    foreach: bool = False  # the optimizer step was switched to foreach (as on CUDA)


def _region_label(logits: torch.Tensor) -> torch.Tensor:
    return (torch.rand_like(logits) > 0.5).to(logits.dtype)


def _trace_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    precision: str = "fp32",
    rules: str = "cpu",
    accumulate: int = 1,
) -> _Trace:
    """Trace a training step (:class:`~revseg.step.TrainStep`, the trainer's) on a random
    ``shape`` input, with the optimizer state in place (as in every step after the first); the
    forward and the loss under ``precision``'s autocast with ``rules``' op policy
    (:func:`~revseg.memory.autocast_rules.trace_precision`), fp16 with a gradient scaler. With
    gradient accumulation (``accumulate > 1``) the last micro-batch of a step is traced: the
    gradients of the others are held through its forward and backward."""
    dtype = next(model.parameters()).dtype
    image = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        label = _region_label(model(image))

    if optimizer is not None:  # the optimizer state, as after a first training step
        make_optimizer_state(optimizer)
    model.zero_grad(set_to_none=True)
    ledger = _StepLedger()
    ledger.add_as([*model.parameters(), *model.buffers()], _CAT["parameters"])
    if optimizer is not None:
        ledger.add_as(list(optimizer.state.values()), _CAT["optimizer state"])
    ledger.add_as([image, label], _CAT["batch"])
    if accumulate > 1:  # a later micro-batch: the gradients so far are held through it
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:
            p.grad = torch.zeros_like(p)
        ledger.add_as([p.grad for p in trained], _CAT["gradients"])

    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    step = TrainStep(
        model,
        optimizer,
        lambda logits, target, _mask: loss_fn(logits, target),
        precision=precision,
        scaler=scaler,
        autocast=lambda: forward_autocast(precision),
    )
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
            loss = step.forward(image, label)  # the trainer's step, its parts marked
            forward_end = len(ledger.points)
            ledger.phase_kind = _CAT["workspace"]
            step.backward(loss)
            backward_end = len(ledger.points)
            for p in model.parameters():
                if p.grad is not None:
                    ledger.kind[ledger.see(p.grad)] = _CAT["gradients"]
            if optimizer is not None:
                step.finish(loss.detach())
            del loss
    finally:
        ledger.close()
        for h in handles:
            h.remove()
    timeline = ledger.timeline(forward_end)
    model.zero_grad(set_to_none=True)
    return _Trace(math.prod(shape[2:]), timeline, (forward_end, backward_end), ledger.allocations())


# --------------------------------------------------------------------------------------------
# the affine model and the plan


@dataclass
class Plan:
    """Predicted peak memory of one training step and what it is made of.

    Three figures, each compared with its own measurement:

    * :attr:`peak_bytes`, **traced**: the tensor bytes of the step (on the CPU, what the tracker
      measures, to the byte);
    * :attr:`allocated_bytes` = traced + :attr:`added`, **computed** from the trace: a CUDA
      run's ``torch.cuda.max_memory_allocated`` (the allocator's 512 B blocks, DDP's gradient
      buckets), a cuDNN workspace aside;
    * :attr:`total_bytes` = allocated + :attr:`allowance`, **estimated**: what the card's memory
      must hold (``nvidia-smi``): a cuDNN workspace, the allocator's block slack (part of
      ``memory_reserved``) and the CUDA context (outside PyTorch's allocator). A budget is
      compared with this figure.

    A CPU plan adds nothing (no caching allocator, no context): the three are equal.

    Attributes:
        model: the model's name.
        input_shape: ``(B, C_in, D, H, W)`` of the training input.
        peak_bytes: predicted (traced) peak tensor bytes of a training step.
        breakdown: bytes per category (:data:`CATEGORIES`) live at the predicted peak.
        peak_phase: ``forward``, ``backward`` or ``optimizer``: where the peak falls.
        kept_after_forward: bytes kept for backward when the forward ends, by reversible parts
            and by non-reversible parts.
        params: number of parameters.
        notes: caveats of this plan (e.g. a surrogate loss).
        precision: ``trainer.precision`` the step was traced at (fp32, bf16, fp16).
        rules: whose autocast op policy the trace applied (``cpu`` or ``cuda``): a ``cuda``
            plan is one for a CUDA run.
        added: bytes computed from the trace at the peak, by name (DDP gradient buckets,
            allocator rounding).
        allowance: estimated bytes of what cannot be traced, by name.
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
    added: dict[str, int] = field(default_factory=dict)
    allowance: dict[str, int] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        """Voxels of the training batch (``B * D * H * W``)."""
        return self.input_shape[0] * math.prod(self.input_shape[2:])

    @property
    def bytes_per_voxel(self) -> float:
        return self.peak_bytes / self.voxels

    @property
    def allocated_bytes(self) -> int:
        """Traced plus computed: a CUDA run's ``max_memory_allocated`` (cuDNN workspace aside)."""
        return self.peak_bytes + sum(self.added.values())

    @property
    def total_bytes(self) -> int:
        """Allocated plus the estimated allowance: what must fit the device's memory."""
        return self.allocated_bytes + sum(self.allowance.values())

    def table(self) -> str:
        """The breakdown as a Markdown table (also readable as plain text and in TensorBoard);
        the last column says how each figure is known."""
        shape = "x".join(map(str, self.input_shape[2:]))
        on = " on CUDA" if self.rules == "cuda" else ""
        lines = [
            f"memory plan: {self.model}, {self.params:,} parameters, batch {self.input_shape[0]}"
            f" x {self.input_shape[1]} x {shape}, {self.precision}"
            + (on if self.precision == "fp32" else f" with {self.rules.upper()} autocast rules"),
            "",
            "| part | bytes | size | share | how |",
            "|---|---:|---:|---:|---|",
        ]
        whole = self.total_bytes

        def row(name: str, value: int, how: str, bold: bool = False) -> str:
            share = 100 * value / whole if whole else 0.0
            size = f"**{format_bytes(value)}**" if bold else format_bytes(value)
            return f"| {name} | {value:,} | {size} | {share:.1f}% | {how} |"

        for name in CATEGORIES:
            lines.append(row(name, self.breakdown[name], "traced"))
        device = bool(self.added or self.allowance)
        peak = "traced peak" if device else "predicted peak"
        lines.append(row(f"**{peak}** ({self.peak_phase})", self.peak_bytes, "traced", True))
        for name, value in self.added.items():
            lines.append(row(name, value, f"computed: {_HOW.get(name, '')}".rstrip(": ")))
        if self.added:
            lines.append(row("**predicted max_memory_allocated**", self.allocated_bytes, "", True))
        for name, value in self.allowance.items():
            lines.append(row(f"allowance: {name}", value, f"estimated: {_HOW.get(name, '')}"))
        if self.allowance:
            lines.append(row("**predicted total (device memory)**", whole, "", True))
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
            "added": dict(self.added),
            "allocated_bytes": self.allocated_bytes,
            "allowance": dict(self.allowance),
            "total_bytes": self.total_bytes,
        }


# how the added and allowed figures are known (the plan table's last column)
DDP_BUCKETS = "DDP gradient buckets"
ROUNDING = "allocator rounding"
CUDNN = "cuDNN workspace"
SLACK = "allocator block slack"
CONTEXT = "CUDA context"
_HOW = {
    DDP_BUCKETS: "one flat copy of the trainable gradients (gradient_as_bucket_view=False)",
    ROUNDING: "every traced allocation rounded up to the caching allocator's 512 B blocks",
    CUDNN: "the step's largest tensor (an algorithm that transforms its input, e.g. FFT, "
    "holds about one; counted by max_memory_allocated)",
    SLACK: "up to 1 MiB per live block over 1 MiB (not split when <= 1 MiB would remain; "
    "counted by max_memory_allocated and memory_reserved)",
    CONTEXT: "512 MiB, context, kernels and library handles (not counted by "
    "max_memory_allocated or memory_reserved; counted by nvidia-smi)",
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
    allocations: _Allocations | None = None  # for the allocator rounding of a CUDA plan
    ddp_buckets: list[int] = field(default_factory=list)  # bytes per DDP gradient bucket

    def live(self, voxels: int) -> np.ndarray:
        return self.fixed + self.per_voxel * voxels

    def fixed_bytes(self) -> int:
        """What a plan adds at any size on top of the traced bytes: the DDP buckets, the CUDA
        context (a lower bound of :meth:`Plan.total_bytes` minus the traced figure)."""
        return sum(self.ddp_buckets) + (CUDA_CONTEXT_BYTES if self.rules == "cuda" else 0)

    def plan(self, spatial: Sequence[int]) -> Plan:
        """The plan for an input of spatial size ``spatial`` (D, H, W)."""
        voxels = math.prod(spatial)
        live = self.live(voxels)
        total = live.sum(axis=0)
        added: dict[str, int] = {}
        allowance: dict[str, int] = {}
        if self.ddp_buckets:
            added[DDP_BUCKETS] = sum(self.ddp_buckets)
        rounding = large = np.zeros_like(total)
        biggest = 0
        if self.rules == "cuda" and self.allocations is not None:
            rounding, large, biggest = self.allocations.at(voxels)
        k = int(np.argmax(total + rounding))
        if self.rules == "cuda":
            buckets = np.asarray(self.ddp_buckets, dtype=np.int64)
            blocks = cuda_block_bytes(buckets)
            added[ROUNDING] = int(rounding[k] + (blocks - buckets).sum())
            allowance[CUDNN] = max(biggest, int(buckets.max(initial=0)))
            allowance[SLACK] = int(large[k] + (blocks > CUDA_SMALL_SIZE).sum()) * CUDA_SMALL_SIZE
            allowance[CONTEXT] = CUDA_CONTEXT_BYTES
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
            added=added,
            allowance=allowance,
        )

    def checked_plan(self, spatial: Sequence[int]) -> Plan:
        """:meth:`plan`, after checking that every size is a multiple of :attr:`divisor`.

        Raises:
            ConfigError: a size the model's downsamplings cannot take.
        """
        check_divisible(spatial, self.divisor, "input size", "the model's downsamplings")
        return self.plan(spatial)

    def max_voxels(self, budget_bytes: float) -> int:
        """The most spatial voxels per sample whose traced peak plus :meth:`fixed_bytes` fits
        ``budget_bytes`` (an upper bound where the plan's total adds more)."""
        budget_bytes = budget_bytes - self.fixed_bytes()
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
    ddp: bool = False,
    accumulate: int = 1,
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
            ``cuda`` also plans what a CUDA run adds (see :class:`Plan`).
        planned_shape: the ``(D, H, W)`` the plan is for: choices that depend on the sizes of
            every axis (:func:`~revseg.nn.blocks.conv_in_float32`) are taken as at that shape.
        ddp: the run wraps the model in DistributedDataParallel: its gradient buckets are added
            (:func:`ddp_bucket_bytes`).
        accumulate: ``trainer.accumulate_grad_batches``: above 1, a later micro-batch is traced,
            with the gradients accumulated so far held through it.

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
                    accumulate,
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
    allocations = None
    if rules == "cuda":
        allocations = _fit_allocations(a, b, notes)
        if a.foreach:
            notes.append("optimizer step traced with foreach=True, as torch runs it on CUDA")
    buckets = ddp_bucket_bytes(list(model.parameters())) if ddp else []
    if ddp:
        notes.append(
            "DDP: gradient buckets of bucket_cap_mb=25 (rebuilt once after the first step)"
        )
    if accumulate > 1:
        notes.append(
            f"gradient accumulation over {accumulate} micro-batches: a later one traced, the "
            "gradients so far held through it"
        )
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
        allocations=allocations,
        ddp_buckets=buckets,
    )


def _fit_allocations(a: _Trace, b: _Trace, notes: list[str]) -> _Allocations | None:
    """Each allocation's bytes as ``fixed + per_voxel * voxels`` from the two traces, over the
    smaller trace's sequence. Allocations are matched in the order they are born, op by op (the
    order of deaths inside an op may differ); those of an op that allocates a different number
    of tensors at the two sizes keep their traced size."""
    x, y = a.allocations, b.allocations
    if x.same_sequence(y):
        per_voxel = (y.fixed - x.fixed) / (b.voxels - a.voxels)
        return replace(x, fixed=x.fixed - per_voxel * a.voxels, per_voxel=per_voxel)
    if a.timeline.shape != b.timeline.shape or a.phases != b.phases:
        notes.append("allocator rounding not computed: the op sequence depends on the input size")
        return None
    at_b = x.fixed.copy()  # sizes of x's allocations in the larger trace
    matched = np.zeros(len(at_b), dtype=bool)
    if len(x.initial) == len(y.initial):
        at_b[x.initial], matched[x.initial] = y.fixed[y.initial], True
    starts = (np.concatenate([[0], x.points[:-1]]), np.concatenate([[0], y.points[:-1]]))
    for k in range(len(x.points)):
        seg_x = slice(starts[0][k], x.points[k])
        seg_y = slice(starts[1][k], y.points[k])
        born_x = x.uids[seg_x][x.events[seg_x] == 1]
        born_y = y.uids[seg_y][y.events[seg_y] == 1]
        if len(born_x) == len(born_y):
            at_b[born_x], matched[born_x] = y.fixed[born_y], True
    per_voxel = (at_b - x.fixed) / (b.voxels - a.voxels)
    if not matched.all():
        notes.append(
            f"allocator rounding: {int((~matched).sum())} of {len(matched)} allocations differ "
            "in number between the traced sizes and are taken at their traced size"
        )
    return replace(x, fixed=x.fixed - per_voxel * a.voxels, per_voxel=per_voxel)


def _trace_step_copy(
    model,
    optimizer_factory,
    loss_fn,
    shape,
    planned_voxels,
    precision,
    rules,
    planned_shape=None,
    accumulate=1,
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
        clone = cpu_copy(model).train()
        optimizer = optimizer_factory(clone.parameters()) if optimizer_factory else None
        switched = optimizer is not None and rules == "cuda" and _foreach_as_on_cuda(optimizer)
        trace = _trace_step(clone, optimizer, loss_fn, shape, precision, rules, accumulate)
        trace.foreach = switched
        return trace


def _foreach_as_on_cuda(optimizer: torch.optim.Optimizer) -> bool:
    """Make ``optimizer`` step as it would on CUDA parameters: torch's optimizers left at
    ``foreach=None`` (and not ``fused``) run the ``foreach`` implementation there, whose
    temporaries (Adam: the square root of every second moment at once) hold a whole
    parameter-size; on the CPU they default to one tensor at a time. Returns whether a group was
    switched."""
    switched = False
    for group in optimizer.param_groups:
        if (
            "foreach" in group
            and group["foreach"] is None
            and not group.get("fused")
            and not group.get("differentiable")
            and not isinstance(group.get("lr"), torch.Tensor)
        ):
            group["foreach"] = switched = True
    return switched


def _mean_square(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return logits.square().mean()
