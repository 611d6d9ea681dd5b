"""The one training step: every optimisation step in revseg goes through :class:`TrainStep`.

A layer of its own between ``data`` and ``memory``: the memory planner traces it and the
trainer, the benchmark and the doctor run it.

The trainer, the memory planner's trace, the benchmark and ``revseg-doctor`` all call it, so a
step is the same everywhere: the forward and the loss under the precision's autocast; the
backward through the gradient scaler (fp16) for each micro-batch, with DistributedDataParallel's
gradient all-reduce only on the last one (gradient accumulation); then the gradients unscaled,
their global norm taken (and clipped), one finiteness check, and the optimizer and scaler
stepped. What the step returns is small (:class:`StepResult`); what a caller measures, logs or
decides around it (the NaN policy) stays with the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from revseg.device import autocast_context

__all__ = ["MicroBatch", "StepResult", "TrainStep", "make_optimizer_state"]

# (image, label, loss mask or None)
MicroBatch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]
NON_FINITE = "non-finite"
OVERFLOW = "overflow"


@dataclass
class StepResult:
    """What one optimisation step did.

    Attributes:
        loss: the micro-batches' mean loss, detached (a 0-dim tensor on the training device:
            reading it synchronises).
        grad_norm: the global gradient norm before clipping (0-dim tensor), or ``None`` where no
            parameter had a gradient.
        skipped: ``None`` when the optimizer stepped; ``"non-finite"`` for a NaN/Inf loss or
            gradient norm (the gradients are dropped; the caller's NaN policy decides what
            follows); ``"overflow"`` for an fp16 step the gradient scaler skipped (it lowered
            its scale).
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    skipped: str | None = None


def make_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state as a first step does, leaving the parameters as they are
    (zero gradients, then ``zero_grad``): what the memory planner traces every later step with."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with torch.no_grad():
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)  # weight decay moves a parameter even with a zero gradient
    optimizer.zero_grad(set_to_none=True)


class TrainStep:
    """One optimisation step over one or more micro-batches.

    Args:
        model: what the forward calls (the DDP- or compile-wrapped model in training).
        optimizer: the optimizer of ``model``'s parameters (``None``: forward and backward only,
            as the memory planner traces a step without one).
        loss_fn: ``loss_fn(output, label, mask)``; ``mask`` is ``None`` without a loss mask.
        device: the training device (autocast's device type).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; ``scaler`` for fp16).
        scaler: the gradient scaler (``None``: a disabled one).
        grad_clip: clip the global gradient norm to this (``None``: no clipping).
        all_finite: ``all_finite(flag_tensor) -> bool``, where several processes must agree
            (DDP); default: the flag's own value. The step's one host synchronisation.
        no_sync: a context manager factory that defers DDP's gradient all-reduce
            (``DistributedDataParallel.no_sync``), entered for all micro-batches but the last.
        guard: a context manager factory around forward and backward (e.g. turning a
            ``torch.compile`` failure into one line).
        on_phase: called with ``"forward"`` after the first micro-batch's forward and
            ``"backward"`` after the last backward (the memory planner marks its phases).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        scaler: torch.amp.GradScaler | None = None,
        grad_clip: float | None = None,
        all_finite: Callable[[torch.Tensor], bool] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        guard: Callable[[], contextlib.AbstractContextManager] | None = None,
        on_phase: Callable[[str], None] | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self.precision = precision
        self.scaler = scaler or torch.amp.GradScaler(self.device.type, enabled=False)
        self.grad_clip = grad_clip
        self.all_finite = all_finite or (lambda flag: bool(flag))
        self.no_sync = no_sync
        self.guard = guard or contextlib.nullcontext
        self.on_phase = on_phase or (lambda phase: None)
        self.autocast = autocast or (lambda: autocast_context(self.device, self.precision))
        # the scaler's scale after the last step (fp16): a lower one means it skipped a step
        self.scale = self.scaler.get_scale() if self.scaler.is_enabled() else None

    def __call__(
        self,
        micro_batches: Sequence[MicroBatch] | Iterable[MicroBatch],
        count: int | None = None,
    ) -> StepResult:
        """Zero the gradients, accumulate them over ``micro_batches`` (each loss weighted by
        ``1 / count``, ``count`` = their number, so that the update is the mean's), then finish
        the step. ``micro_batches`` may be a generator (moved to the device one at a time)."""
        batches = list(micro_batches) if count is None else micro_batches
        n = len(batches) if count is None else count
        if n < 1:
            raise ValueError("a training step needs at least one micro-batch")
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for i, (image, label, mask) in enumerate(batches):
            last = i == n - 1
            defer = self.no_sync() if self.no_sync is not None and not last else None
            with defer or contextlib.nullcontext():
                loss = self.forward(image, label, mask) / n
                if i == 0:
                    self.on_phase("forward")
                self.backward(loss)
            loss = loss.detach()
            total = loss if total is None else total + loss
            del loss
        self.on_phase("backward")
        return self.finish(total)

    def forward(
        self, image: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of one micro-batch, under the precision's autocast."""
        with self.autocast(), self.guard(), record_function("step: forward and loss"):
            return self.loss_fn(self.model(image), label, mask)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a (weighted) loss through the gradient scaler."""
        with self.guard(), record_function("step: backward"):
            self.scaler.scale(loss).backward()

    def finish(self, loss: torch.Tensor) -> StepResult:
        """Unscale, take the global norm (clip it), check finiteness once, step."""
        with record_function("step: optimizer"):
            return self._finish(loss)

    def _finish(self, loss: torch.Tensor) -> StepResult:
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
        finite = torch.isfinite(loss)
        if norm is not None and not self.scaler.is_enabled():
            # with fp16 the gradient scaler skips overflowing steps itself
            finite = finite & torch.isfinite(norm).to(finite.device)
        if not self.all_finite(finite):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():  # close the unscaled step (it backs off the scale)
                self.scaler.update()
                self.scale = self.scaler.get_scale()
            return StepResult(loss, norm, NON_FINITE)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss, norm, OVERFLOW if self._scaler_skipped() else None)

    def _scaler_skipped(self) -> bool:
        """Whether the gradient scaler skipped the optimizer step just taken: it lowers its
        scale only then (reads the scale: a synchronisation at the end of the step)."""
        if not self.scaler.is_enabled():
            return False
        before, self.scale = self.scale, self.scaler.get_scale()
        return self.scale < before
