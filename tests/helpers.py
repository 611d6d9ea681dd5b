"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on the path for
tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, imported in-process (its ``main(argv)``): faster than
    a subprocess."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def untrained_run(
    path: Path, *overrides: str, seed: int | None = None, split: dict | None = None
) -> Path:
    """A run directory at ``path`` holding ``checkpoints/best.pt`` of an untrained tiny model
    (``TINY``, crops of 32³, ``overrides``; weights drawn after ``torch.manual_seed(seed)`` when
    given) and, with ``split``, its ``split.json``: what prediction reads of a run."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from revseg.training.checkpoint import save_atomic, with_checksum

    from conftest import TINY, compose_train

    cfg = compose_train(*TINY, "data.crop_size=[32,32,32]", f"paths.output_dir={path}", *overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = instantiate(cfg.model, _convert_="all")
    state = {"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True)}
    save_atomic(with_checksum(state), path / "checkpoints" / "best.pt")
    if split is not None:
        (path / "split.json").write_text(json.dumps(split))
    return path


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
