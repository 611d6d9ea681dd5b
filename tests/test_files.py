"""Atomic writes on a full disk: one line naming the file and the bytes needed, the previous
file intact, no temporary file left (a checkpoint write on a full disk printed 36 lines: issue
22, item 7)."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import pytest
import torch

from revseg.errors import DataError
from revseg.files import write_atomic, write_text_atomic
from revseg.training.checkpoint import save_atomic

Usage = namedtuple("Usage", "total used free")


def test_too_little_free_space_is_one_line_before_writing(tmp_path, monkeypatch):
    path = write_text_atomic("old\n", tmp_path / "summary.json")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(100, 90, 10))
    with pytest.raises(DataError) as info:
        save_atomic({"w": torch.zeros(1000)}, tmp_path / "summary.json")
    message = str(info.value)
    assert message.startswith(f"no space left to write {path}: it needs ")
    assert message.endswith(" bytes (10 bytes free); the previous file is intact")
    assert "\n" not in message
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_disk_that_fills_during_the_write(tmp_path, monkeypatch):
    path = write_text_atomic("old\n", tmp_path / "last.pt")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(DataError, match=rf"^no space left to write {path}: it needs 3 bytes"):
        write_atomic(path, lambda f: f.write(b"new"))
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
