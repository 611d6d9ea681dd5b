"""A run directory belongs to one run at a time, and a new run never replaces another's
checkpoints without being told to.

:func:`claim_run_dir` takes an exclusive lock on ``<run dir>/.lock`` for the life of the run (an
``fcntl.flock``: the operating system drops it when the process ends, however it ends, so a
killed run leaves no stale lock) and records its holder (process, host, start) in the file,
which a run that ends removes; a second run in the same directory fails at once with one line
naming the holder. A fresh run
(``trainer.resume=false``) in a directory that already holds checkpoints is refused unless
``trainer.overwrite=true``.

:func:`write_run_record` writes the run's record (``.hydra/config.yaml``, ``hydra.yaml``,
``overrides.yaml``, what Hydra itself would write as the job starts) only once the run has passed
its checks, so that a refused resume leaves the record of the run it tried to resume as it was
(``configs/hydra/default.yaml`` turns Hydra's own writing off).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from revseg.errors import ConfigError

__all__ = [
    "LOCK_NAME",
    "RECORD_DIR",
    "RunDirInUse",
    "check_fresh_run",
    "claim_run_dir",
    "write_run_record",
]

LOCK_NAME = ".lock"
RECORD_DIR = ".hydra"
CHECKPOINTS = ("checkpoints/last.pt", "checkpoints/best.pt")


class RunDirInUse(ConfigError):
    """Another run holds the directory: nothing in it may be cleaned up by this one."""


try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def claim_run_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the run directory's lock while the block runs.

    Raises:
        RunDirInUse: another process holds it (the message names that process).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _locked(path, folder)
    try:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        holder = f"process {os.getpid()} on {socket.gethostname()} since {started}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield folder
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: see _locked
        os.close(fd)  # releases the lock


def _locked(path: Path, folder: Path) -> int:
    """An open descriptor of ``path`` holding its lock. A lock won on a file its holder removed
    on the way out (between our open and our lock) is given up and taken again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another run"
            os.close(fd)
            raise RunDirInUse(
                f"{folder} is in use by {holder}: wait for that run to end, or give this one "
                "another directory (hydra.run.dir=...)"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def check_fresh_run(folder: str | os.PathLike, resume: object, overwrite: bool) -> None:
    """A run that does not resume may not start in a directory holding another run's
    checkpoints, unless ``overwrite``.

    Raises:
        ConfigError: naming the checkpoint found and the two ways on.
    """
    if resume not in (False, None) or overwrite:
        return
    folder = Path(folder)
    found = [name for name in CHECKPOINTS if (folder / name).is_file()]
    if found:
        raise ConfigError(
            f"{folder} already holds a run ({found[0]}): resume it with trainer.resume=true, "
            "start this one in another directory (hydra.run.dir=...), or replace it with "
            "trainer.overwrite=true"
        )


def write_run_record(folder: str | os.PathLike, cfg: Any) -> Path | None:
    """Write ``<folder>/.hydra/{config,hydra,overrides}.yaml`` (each atomically) for the Hydra job
    running now, as Hydra writes them; nothing outside a Hydra job (a test calling ``train``).

    Returns:
        The record's folder, or None when no Hydra job runs.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from revseg.files import write_text_atomic

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    record = Path(folder) / RECORD_DIR
    record.mkdir(parents=True, exist_ok=True)
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", OmegaConf.create({"hydra": hydra})),
        ("overrides.yaml", hydra.overrides.task),
    ):
        write_text_atomic(OmegaConf.to_yaml(node), record / name)
    return record
