"""The storage tracker: one ledger of tensor storages, shared by the meter and the planner.

A ``TorchDispatchMode`` sees every aten op run on the thread that entered it (the forward, the
backward run by the autograd engine, custom ``autograd.Function`` bodies, the optimizer). For each
op, :class:`StorageTracker` looks at the storages of its inputs and outputs:

* a storage met for the first time as an op's *output* is **born** there, counted once by
  ``nbytes()`` (views and in-place ops return known storages: they add nothing);
* a storage met for the first time as an *input* (or given to :meth:`StorageTracker.add`) existed
  before the tracker began: it is **found**, alive since the start;
* a known storage whose ``nbytes()`` changed was **resized** (``resize_``);
* a storage is **freed** when its ``UntypedStorage`` Python object dies, which a weak reference
  reports at once: PyTorch keeps one Python object per storage alive for as long as the C++ storage
  lives. Weakref callbacks only append to a deque (they may fire on any thread, or inside the
  bookkeeping itself); the deque is drained under a lock before each op is accounted.

The tracker only keeps the ledger; what the events mean is its subclasses': the peak meter
(:class:`~revseg.memory.measure.PeakMemoryMeter`) keeps a running total and its high-water mark,
the planner (:mod:`revseg.memory.trace`) a timeline of births and deaths by category.

What it cannot see: scratch buffers a kernel allocates and frees internally, memory that is not a
tensor, ops run on other threads, and frees done outside the dispatcher (``storage().resize_(0)``).
The input of ``lift_fresh`` (``torch.tensor([...])``) is a tensor just built outside the
dispatcher: it is born, not found.

Under any dispatch mode, this one or one that keeps nothing, autograd allocates more where
gradients accumulate (a tensor or parameter used twice) than without a mode: measured by the peak
resident size, the same with the weak references, with storage addresses only or with no
bookkeeping at all, so the storage handles are not the cause. CPU figures can exceed those of a
run without the tracker by about one gradient at such points.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["StorageTracker", "storage_of", "tensors_in", "unique_storages"]

# Ops whose *input* is a tensor just built outside the dispatcher (``torch.tensor([...])``).
_LIFT_OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


def tensors_in(obj: Any, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The tensors in ``obj`` (appended to ``out`` when given): a tensor, a list or tuple, a
    mapping (its values) or any other iterable (``model.parameters()``), nested; other leaves
    (numbers, strings) are skipped.

    Lists and tuples, what aten ops take and return, are tested first: this walker runs on every
    op the tracker sees (much cheaper than ``torch.utils._pytree.tree_flatten``).
    """
    if out is None:
        out = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            tensors_in(item, out)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            tensors_in(value, out)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for item in obj:
            tensors_in(item, out)
    return out


def storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    """The storage of ``t``, or ``None`` for tensors without one (sparse, some subclasses)."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def unique_storages(tensors: Any) -> dict[int, torch.UntypedStorage]:
    """The storages behind ``tensors`` (see :func:`tensors_in`) by ``id``, each once."""
    storages = (storage_of(t) for t in tensors_in(tensors))
    return {id(s): s for s in storages if s is not None}


class _Ref(weakref.ref):
    """Weak reference to a storage that remembers its uid and counted size."""

    __slots__ = ("key", "uid", "nbytes")


class StorageTracker(TorchDispatchMode):
    """Dispatch mode keeping the ledger of the storages on one device type.

    Each storage gets a uid (0, 1, ... in the order they are met). Subclasses receive the events
    through :meth:`born`, :meth:`resized`, :meth:`freed` and :meth:`op_done`; the base class
    ignores them.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``: storages on other devices are not tracked.
    """

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self._refs: dict[int, _Ref] = {}  # id(storage) -> its weak reference
        self._dead: deque[_Ref] = deque()
        self._lock = threading.Lock()
        self._next_uid = 0

    # the events, for subclasses

    def born(self, uid: int, nbytes: int, found: bool) -> None:
        """A storage met for the first time: an op's output, or ``found`` alive since entry."""

    def resized(self, uid: int, delta: int) -> None:
        """A known storage changed size by ``delta`` bytes (``resize_``)."""

    def freed(self, uid: int, nbytes: int) -> None:
        """A known storage of ``nbytes`` was freed."""

    def op_done(self) -> None:
        """An op and the storages it made are accounted."""

    # the ledger

    def _drain(self) -> None:
        while self._dead:
            ref = self._dead.popleft()
            self.freed(ref.uid, ref.nbytes)
            if self._refs.get(ref.key) is ref:
                del self._refs[ref.key]

    def _see(self, t: torch.Tensor, found: bool) -> int | None:
        if t.device.type != self.device_type or (s := storage_of(t)) is None:
            return None
        key, nbytes = id(s), s.nbytes()
        ref = self._refs.get(key)
        if ref is not None and ref() is s:  # known storage: only a resize_ changes it
            if nbytes != ref.nbytes:
                delta, ref.nbytes = nbytes - ref.nbytes, nbytes
                self.resized(ref.uid, delta)
            return ref.uid
        ref = _Ref(s, self._dead.append)  # a dead entry under `key` is in the deque
        ref.key, ref.uid, ref.nbytes = key, self._next_uid, nbytes
        self._next_uid += 1
        self._refs[key] = ref
        self.born(ref.uid, nbytes, found)
        return ref.uid

    def see(self, t: torch.Tensor, found: bool = False) -> int | None:
        """Account ``t``'s storage now (born, or ``found`` alive since entry, when it is new);
        its uid, ``None`` on another device or without a storage."""
        with self._lock:
            self._drain()
            return self._see(t, found)

    def add(self, tensors: Any) -> None:
        """Count the storages of ``tensors`` (see :func:`tensors_in`) as alive since entry."""
        with self._lock:
            self._drain()
            for t in tensors_in(tensors):
                self._see(t, found=True)

    def uid_of(self, t: torch.Tensor) -> int | None:
        """The uid of ``t``'s storage, ``None`` when it is not in the ledger."""
        s = storage_of(t)
        ref = self._refs.get(id(s)) if s is not None else None
        return ref.uid if ref is not None and ref() is s else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with self._lock:
            self._drain()
            found = func not in _LIFT_OPS
            for t in tensors_in((args, tuple(kwargs.values()))):
                self._see(t, found)
        out = func(*args, **kwargs)
        with self._lock:
            self._drain()
            for t in tensors_in(out):
                self._see(t, found=False)
            self.op_done()
        return out

    def close(self) -> None:
        """Account the last frees and drop every weak reference (no event after this)."""
        with self._lock:
            self._drain()
            self._refs.clear()
            self._dead.clear()
