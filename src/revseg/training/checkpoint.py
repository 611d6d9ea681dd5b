"""Checkpoint files: written atomically, read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values, plus the resolved run config as YAML
text, so a model can be rebuilt from the file alone and loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revseg.errors import ConfigError, DataError
from revseg.files import write_atomic, write_text_atomic

__all__ = [
    "check_writable",
    "save_atomic",
    "load_checkpoint",
    "payload_digest",
    "with_checksum",
    "rng_state",
    "set_rng_state",
    "restore_rng",
    "write_text_atomic",
]


def check_writable(folder: str | os.PathLike, key: str) -> Path:
    """Create ``folder`` if needed and write (then remove) a temporary file in it, so that an
    unwritable run or checkpoint directory fails before training, not at the first save.

    Raises:
        ConfigError: naming ``key``, the folder and the reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"{key}: cannot write to {folder} ({reason})") from None
    return folder


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file, fsync, rename)."""
    return write_atomic(path, lambda f: torch.save(obj, f))


CHECKSUM = "sha256"


def _feed(h: Any, obj: Any) -> None:
    """Hash ``obj`` (tensors by dtype, shape and bytes; containers in order, dict keys sorted)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for value in obj:
            _feed(h, value)
        h.update(b"]")
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"B%d:" % len(obj))
        h.update(obj)
    else:
        h.update(repr(obj).encode())


def payload_digest(state: dict[str, Any]) -> str:
    """The SHA-256 of a checkpoint's contents (every entry but the checksum itself)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != CHECKSUM})
    return h.hexdigest()


def with_checksum(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the SHA-256 of its contents, which :func:`load_checkpoint` verifies."""
    return {**state, CHECKSUM: payload_digest(state)}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by revseg (``weights_only=True``) and verify its checksum.

    Raises:
        DataError: the file is missing, is not a readable revseg checkpoint (no model, config or
            checksum entry), or its contents do not match its checksum (damaged on disk or in
            transfer).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"cannot read checkpoint {path}: {type(err).__name__}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise DataError(f"not a revseg checkpoint (no model/config entries): {path}")
    if CHECKSUM not in ckpt:
        raise DataError(f"not a revseg checkpoint (no {CHECKSUM} checksum entry): {path}")
    holds_data = torch.device(map_location).type != "meta"  # meta tensors have no bytes
    if holds_data and payload_digest(ckpt) != ckpt[CHECKSUM]:
        raise DataError(
            f"checkpoint {path} is damaged: its contents do not match the SHA-256 written with "
            "it; resume from another checkpoint (checkpoints/best.pt, or a copy)"
        )
    return ckpt


def _bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _byte_tensor(value: bytes) -> torch.Tensor:
    """A CPU uint8 tensor from saved bytes."""
    return torch.frombuffer(bytearray(value), dtype=torch.uint8)


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and (for a CUDA ``device``) that GPU's RNG states.

    States are stored as ``bytes``, not tensors, so that ``map_location`` (which moves tensors to
    a GPU, or to ``meta``) cannot change them. Only the training device's CUDA state is saved:
    a run resumed on another GPU, or on a machine with fewer GPUs, restores it on its own device.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - global state
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": np.asarray(keys, dtype=np.uint32).tobytes(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": _bytes(torch.get_rng_state()),
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        state["cuda"] = _bytes(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what :func:`rng_state` returned; the CUDA state goes to ``device`` (if CUDA)."""
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    n = state["numpy"]
    keys = np.frombuffer(n["keys"], dtype=np.uint32).copy()
    np.random.set_state(  # noqa: NPY002 - the global state libraries draw from
        (n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(_byte_tensor(state["torch"]))
    device = torch.device(device) if device is not None else None
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    torch.cuda.set_rng_state(_byte_tensor(cuda), device)


def restore_rng(
    ckpt: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> bool:
    """Restore this rank's RNG states from a checkpoint's ``rng`` (rank 0) and ``rng_ranks``.

    Returns:
        ``True`` when the checkpoint held this rank's own states; ``False`` when it was saved
        by another number of processes and rank 0's states were restored instead.
    """
    ranks = ckpt.get("rng_ranks")
    if world_size > 1 and ranks and len(ranks) == world_size:
        set_rng_state(ranks[rank], device)
        return True
    set_rng_state(ckpt["rng"], device)
    return world_size == 1 and not ranks
