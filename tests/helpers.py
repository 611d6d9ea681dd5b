"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on the path for
tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from revseg.memory import PeakMemoryMeter

REPO = Path(__file__).resolve().parents[1]


def run_python(
    script: str, *args: str, cwd: Path = REPO, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python <REPO>/<script> args...`` in ``cwd`` as a user runs it: output captured as text."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the Frobenius norm (``b`` = the reference; 0 vs 0 gives 0)."""
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def activation_peak(module: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of forward + backward of ``module`` on ``x`` (``square().mean()`` loss), less
    the input, the parameters and gradients of their size (set to zeros first, so that the
    gradients a memory-saving backward returns at once count like accumulated ones): the
    activation memory (CPU tensor tracker)."""
    params = list(module.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    with PeakMemoryMeter("cpu").measure(static=[params, [p.grad for p in params], x]) as m:
        module(x).square().mean().backward()
    return m.peak_bytes - m.baseline_bytes - sum(p.nbytes for p in params)


class Writer:
    """Keeps ``add_scalar``'s values as ``scalars[tag][step]``; every other call does nothing."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.setdefault(tag, {})[step] = value

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
