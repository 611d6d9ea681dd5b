"""Peak memory of a training step, measured on CUDA and on CPU in comparable terms.

On CUDA the figure is ``torch.cuda.max_memory_allocated``: the high-water mark of the bytes held
by live tensors (the caching allocator's reserve not included). On CPU there is no such counter,
so :class:`PeakMemoryMeter` runs the block under the storage tracker
(:class:`~revseg.memory.tracker.StorageTracker`, a ``TorchDispatchMode`` that sees every aten op:
forward, backward run by the autograd engine, custom ``autograd.Function`` bodies, the optimizer):
a storage is counted once, by ``nbytes()``, when an op first returns it (views and in-place ops
add nothing, ``resize_`` is followed) and subtracted when it is freed. The high-water mark of
that ledger is the CPU analogue of ``max_memory_allocated``; both count everything live at the
peak: parameters, gradients, optimizer state, the batch.

What the CPU tracker cannot see: scratch buffers a kernel allocates and frees internally (the
im2col buffer of ``slow_conv3d``, ``C_in * k^3 * D * H * W`` floats, can exceed all activations;
the CUDA figure does include cuDNN workspaces), allocator overhead, memory that is not a tensor,
and ops run on threads other than the one that entered the block (on CPU the autograd engine runs
backward on that thread). A storage created outside the dispatcher inside the block (e.g.
``torch.from_numpy``) is taken for a pre-existing one and counted from entry.
:attr:`MemoryMeasurement.rss_peak_bytes` (Linux) is a coarser whole-process figure that sees it all.

:class:`SavedTensorsCounter` answers a narrower, deterministic question: how many bytes autograd
keeps for backward (the quantity reversible networks remove; Gomez et al., 2017).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from revseg.memory.tracker import StorageTracker, storage_of, unique_storages

__all__ = [
    "MemoryMeasurement",
    "PeakMemoryMeter",
    "SavedTensorsCounter",
    "format_bytes",
    "live_tensor_bytes",
    "rss_peak_bytes",
]

_active_lock = threading.Lock()
_active = False  # one measurement at a time per process: nesting would corrupt the peak


def live_tensor_bytes(tensors: Any) -> int:
    """Bytes held by the unique storages behind ``tensors`` (views of one storage count once).

    Args:
        tensors: a tensor, an iterable of tensors (``model.parameters()``), a mapping
            (``optimizer.state``) or any nesting of these; non-tensor leaves are ignored.
    """
    return sum(s.nbytes() for s in unique_storages(tensors).values())


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``format_bytes(12_897_484) == "12.3 MiB"``."""
    sign, value = ("-" if n < 0 else ""), float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{sign}{value:.1f} {unit}"


def _reset_rss_peak() -> None:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); silently a no-op elsewhere."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def rss_peak_bytes() -> int | None:
    """The process's peak resident set size (``VmHWM``) in bytes; ``None`` off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class MemoryMeasurement:
    """Result of one :meth:`PeakMemoryMeter.measure` block; filled in when the block exits.

    Attributes:
        method: ``"cuda_max_memory_allocated"`` or ``"cpu_tensor_tracker"``.
        peak_bytes: peak bytes of live tensor memory during the block, all tensors included.
        baseline_bytes: tensor bytes live at entry (CUDA: allocated; CPU: the ``static`` storages).
        end_bytes: tensor bytes still live at exit (on CPU: baseline plus what the block kept).
        rss_peak_bytes: peak resident set size of the whole process (Linux), else ``None``.
        reserved_bytes: CUDA only (else ``None``): ``torch.cuda.max_memory_reserved``, the peak
            of what the caching allocator held from the driver during the block. This, not the
            allocated peak, decides an out-of-memory error; the CUDA context (a few hundred MiB
            per process, outside PyTorch's allocator) comes on top of it.
    """

    method: str
    peak_bytes: int = 0
    baseline_bytes: int = 0
    end_bytes: int = 0
    rss_peak_bytes: int | None = None
    reserved_bytes: int | None = None


class _PeakTracker(StorageTracker):
    """The storage ledger as a running total of live bytes and its high-water mark.

    A storage found alive (an op's input not yet in the ledger, or a ``static`` one) existed
    before the block began, so it was live all along: it is added to the live bytes and,
    retroactively, to the peak.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__(device_type)
        self.live = 0
        self.peak = 0

    def born(self, uid: int, nbytes: int, found: bool) -> None:
        self.live += nbytes
        self.peak = self.peak + nbytes if found else max(self.peak, self.live)

    def resized(self, uid: int, delta: int) -> None:
        self.live += delta
        self.peak = max(self.peak, self.live)

    def freed(self, uid: int, nbytes: int) -> None:
        self.live -= nbytes


class PeakMemoryMeter:
    """Measures the peak tensor memory of a block of code, typically one training step.

    Example::

        meter = PeakMemoryMeter(torch.device("cpu"))
        with meter.measure(static=[model.parameters(), optimizer.state, batch]) as m:
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
        print(meter.method, format_bytes(m.peak_bytes))

    Args:
        device: the device the step runs on. ``cuda`` uses the allocator's statistics; ``cpu``
            uses a dispatch-mode storage tracker (Python work per aten op, none per element).

    Raises:
        ValueError: for a device type other than ``cpu`` or ``cuda``.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
        elif self.device.type == "cpu":
            self.method = "cpu_tensor_tracker"
        else:
            raise ValueError(f"PeakMemoryMeter: unsupported device {str(self.device)!r}")

    @contextlib.contextmanager
    def measure(self, static: Iterable[Any] = ()) -> Iterator[MemoryMeasurement]:
        """Context manager measuring the block; the yielded result is filled in on exit.

        Args:
            static: tensors live at entry that the step may not touch (parameters, existing
                gradients, optimizer state, the batch): tensors, iterables or mappings of
                tensors. Counted once per storage as the CPU baseline; ignored on CUDA, whose
                allocator already counts them. Pre-existing storages an op does touch are found
                and counted (since entry) on CPU even when not listed.

        Raises:
            RuntimeError: if a measurement is already active in this process (no nesting).
        """
        global _active
        with _active_lock:
            if _active:
                raise RuntimeError("PeakMemoryMeter.measure() cannot be nested or run concurrently")
            _active = True
        result = MemoryMeasurement(self.method)
        try:
            if self.method == "cuda_max_memory_allocated":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                result.baseline_bytes = torch.cuda.memory_allocated(self.device)
                _reset_rss_peak()
                yield result
                torch.cuda.synchronize(self.device)
                result.peak_bytes = torch.cuda.max_memory_allocated(self.device)
                result.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
                result.end_bytes = torch.cuda.memory_allocated(self.device)
            else:
                tracker = _PeakTracker(self.device.type)
                tracker.add(static)
                result.baseline_bytes = tracker.live
                _reset_rss_peak()
                try:
                    with tracker:
                        yield result
                finally:
                    tracker.close()
                    result.peak_bytes, result.end_bytes = tracker.peak, tracker.live
            result.rss_peak_bytes = rss_peak_bytes()
        finally:
            with _active_lock:
                _active = False


class SavedTensorsCounter:
    """Counts the bytes autograd saves for backward while the context is active.

    Every tensor packed through ``torch.autograd.graph.saved_tensors_hooks`` is counted once per
    storage, which includes ``ctx.save_for_backward`` in custom ``autograd.Function``s. Not seen:
    tensors kept as plain ``ctx`` attributes, and whatever is saved under inner
    ``saved_tensors_hooks`` (they take precedence), e.g. in a non-reentrant
    ``torch.utils.checkpoint`` region, which keeps its inputs alive by reference instead.

    Example::

        with SavedTensorsCounter(exclude=model.parameters()) as c:
            loss = model(x).sum()
        print(c.count, format_bytes(c.bytes))

    Args:
        exclude: tensors whose storages are not counted, typically the model's parameters.

    Attributes:
        bytes: total ``nbytes()`` of the unique saved storages.
        count: number of unique saved storages.
    """

    def __init__(self, exclude: Any = ()) -> None:
        self._exclude = unique_storages(exclude)  # strong refs: ids stay valid
        self.bytes = 0
        self.count = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = storage_of(t)
        if s is None or id(s) in self._exclude:
            return t
        ref = self._seen.get(id(s))
        if ref is None or ref() is not s:
            self._seen[id(s)] = weakref.ref(s)
            self.bytes += s.nbytes()
            self.count += 1
        return t

    def __enter__(self) -> SavedTensorsCounter:
        self.bytes, self.count = 0, 0
        self._seen: dict[int, weakref.ref] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._seen.clear()
