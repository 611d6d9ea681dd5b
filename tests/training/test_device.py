"""The training device and its backend switches, on CPU (CUDA through what does not need a GPU)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from revseg.errors import ConfigError
from revseg.training.device import resolve_device, set_deterministic


@pytest.fixture
def restore_backends():
    """Put the global switches back: they outlive the test in this process."""
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2:]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deterministic_sets_cublas_workspace_and_cudnn(
    monkeypatch, restore_backends, caplog, device
):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    with caplog.at_level(logging.WARNING):
        set_deterministic(torch.device(device))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    # on CUDA the kernels without a deterministic version are named once
    named = [r for r in caplog.records if "trilinear upsampling backward" in r.getMessage()]
    assert len(named) == (device == "cuda")


def test_deterministic_keeps_the_users_cublas_setting(monkeypatch, restore_backends):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_deterministic(torch.device("cpu"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_gpu_beyond_the_machines_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^trainer.device=cuda:2 but this machine has 2 GPU"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match=r"^trainer.device='tpu'"):
        resolve_device("tpu")
