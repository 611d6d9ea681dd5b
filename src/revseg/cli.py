"""Shared behaviour of the command-line entry points."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from revseg.errors import RevsegError

__all__ = ["exit_on_error"]


@contextlib.contextmanager
def exit_on_error(status: int = 2) -> Iterator[None]:
    """Turn a :class:`RevsegError` into one ``error: ...`` line on stderr and exit ``status``."""
    try:
        yield
    except RevsegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(status)
