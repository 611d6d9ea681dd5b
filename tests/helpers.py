"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on the path for
tests/conftest.py)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the Frobenius norm (``b`` = the reference; 0 vs 0 gives 0)."""
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))
