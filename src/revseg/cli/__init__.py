"""The command-line entry points (``revseg-train``, ``revseg-predict``,
``revseg-check-submission``, ``revseg-evaluate``, ``revseg-plan``, ``revseg-doctor``,
``revseg-gpu-validate`` from :mod:`revseg.bench.gpu_validate`; ``train.py`` and ``scripts/*.py``
call the same ``run``) and their shared behaviour: errors as one line with exit status 2, checks
before Hydra starts."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from revseg.errors import ConfigError, RevsegError

__all__ = [
    "check_run_dir",
    "exit_on_error",
    "exit_with_help_if_asked",
    "removing_unused_run_dir",
    "run_main",
    "search_dirs",
]


@contextlib.contextmanager
def exit_on_error(status: int = 2) -> Iterator[None]:
    """Turn a :class:`RevsegError` into one ``error: ...`` line on stderr and exit ``status``."""
    try:
        yield
    except RevsegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(status)


HELP_FOOTER = (
    "Options are key=value overrides of the command's config; every key with its default and "
    "meaning: docs/reference/config-keys.md (the documentation site: make docs)."
)


def exit_with_help_if_asked(args: Sequence[str], doc: str | None) -> None:
    """``-h`` / ``--help`` among ``args``: print ``doc`` (the command's usage) and exit 0; Hydra
    would read them as a malformed override."""
    if any(a in ("-h", "--help") for a in args):
        print(f"{(doc or '').strip()}\n\n{HELP_FOOTER}")
        sys.exit(0)


def run_main(main: Callable[[list[str]], int | None], own_help: bool = False) -> None:
    """A console entry: ``main(sys.argv[1:])``; a :class:`RevsegError` or a Hydra error (an
    unknown key, a malformed override) is one ``error:`` line and exit status 2; ``--help``
    prints the command module's docstring (unless ``own_help``: ``main`` parses it itself)."""
    if not own_help:
        exit_with_help_if_asked(sys.argv[1:], sys.modules[main.__module__].__doc__)
    with exit_on_error():
        from hydra.errors import HydraException

        try:
            status = main(sys.argv[1:])
        except HydraException as error:
            raise ConfigError(str(error).strip().splitlines()[0]) from None
    sys.exit(status or 0)


def _override(args: Sequence[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    return values[-1] if values else None


def search_dirs(args: Sequence[str]) -> list[str]:
    """The config folders given with ``--config-dir DIR`` / ``--config-dir=DIR`` / ``-cd DIR``
    (Hydra adds them to the config search path), as absolute paths."""
    found = []
    for i, arg in enumerate(args):
        if arg.startswith("--config-dir="):
            found.append(arg.split("=", 1)[1])
        elif arg in ("--config-dir", "-cd") and i + 1 < len(args):
            found.append(args[i + 1])
    return [os.path.abspath(d) for d in found]


def check_run_dir(args: Sequence[str]) -> None:
    """Check that the run directory Hydra will make can be made, before Hydra tries (it would
    fail with a traceback): ``hydra.run.dir`` (``hydra.sweep.dir`` with ``-m``), else
    ``paths.log_dir`` (``$REVSEG_LOG_DIR``, default ``outputs``).

    Raises:
        ConfigError: naming the key and the folder in the way.
    """
    multirun = "-m" in args or "--multirun" in args
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = _override(args, key)
    if value is None:
        key = "paths.log_dir"
        value = _override(args, key) or os.environ.get("REVSEG_LOG_DIR", "outputs")
    static = value.split("${", 1)[0] or "."  # the part before any interpolation
    folder = Path(static)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}={value}: cannot make the run directory: {folder} is a file")
    try:  # a real try: access() says yes to root, also in /proc or /sys
        os.rmdir(tempfile.mkdtemp(prefix=".revseg-probe-", dir=folder))
    except OSError as err:
        raise ConfigError(
            f"{key}={value}: cannot make the run directory in {folder} ({err.strerror})"
        ) from None


# what a run writes before training starts: removed again when it fails on its config or data
_BEFORE_TRAINING = (".hydra", "split.json", "checkpoints", ".lock")


@contextlib.contextmanager
def removing_unused_run_dir(run_dir: str | os.PathLike) -> Iterator[None]:
    """When the run fails (on its config or data, or with a traceback), remove what it wrote before
    training (``.hydra/``, the log, ``split.json``, empty TensorBoard files, an empty
    ``checkpoints/``), and the run directory if nothing else is left. A directory holding
    anything else (a checkpoint, ``summary.json``, files of the user) is kept as it is."""
    from revseg.training.run_dir import RunDirInUse

    try:
        yield
    except RunDirInUse:
        raise  # the directory is another run's: leave everything in it
    except Exception:
        _remove_if_unused(Path(run_dir))
        raise


def _remove_if_unused(run_dir: Path) -> None:
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return
    ours = [
        e
        for e in entries
        if e.name in _BEFORE_TRAINING or e.suffix == ".log" or e.name.startswith("events.out.")
    ]
    if len(ours) != len(entries):
        return
    for entry in ours:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
