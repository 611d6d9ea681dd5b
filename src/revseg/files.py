"""Files written atomically: a temporary file in the same folder, fsync, rename, so that a crash
at any moment leaves the old file or the new one, never a half-written one (checkpoints,
``summary.json``, a dataset's ``split.json``, evaluation reports). Used by every layer."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from revseg.errors import DataError

__all__ = ["write_atomic", "write_bytes_atomic", "write_text_atomic"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_space(path: Path, needed: int) -> DataError:
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    return DataError(
        f"no space left to write {path}: it needs {needed:,} bytes ({free}); the previous file "
        "is intact"
    )


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write what ``write`` writes, atomically: the bytes are made in memory first, then written
    into a temporary file in the same folder, fsynced and renamed over ``path``.

    A crash at any moment leaves either the old file or the new one, never a truncated file.

    Raises:
        DataError: the device is full (one line naming the file and the bytes needed; the old
            file is left as it was).
    """
    buffer = io.BytesIO()
    write(buffer)
    return write_bytes_atomic(buffer.getbuffer(), path)


def write_bytes_atomic(data: bytes | memoryview, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if shutil.disk_usage(path.parent).free < len(data):
            raise _no_space(path, len(data))
    except OSError:
        pass  # no statistics for this file system: the write itself will tell
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(path, len(data)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a UTF-8 text file atomically (temporary file, fsync, rename)."""
    return write_bytes_atomic(text.encode("utf-8"), path)
