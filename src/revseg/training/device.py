"""The device a run trains on, and the backend switches the ``trainer`` config sets for it.

``trainer.device`` names the device (checked against the GPUs this machine has);
``trainer.deterministic`` asks for repeatable results (see README, "On a GPU cluster", for what is
and is not bit-exact on CUDA).
"""

from __future__ import annotations

import logging
import os

import torch

from revseg.errors import ConfigError

__all__ = ["resolve_device", "set_deterministic", "NON_DETERMINISTIC_CUDA"]

log = logging.getLogger(__name__)

# cuBLAS needs a fixed workspace for repeatable matrix products (CUDA >= 10.2); it must be set
# before the first cuBLAS call of the process
CUBLAS_WORKSPACE = ":4096:8"

# CUDA kernels revseg's models run that PyTorch has no deterministic version of: their backward
# accumulates with atomic adds, so gradients vary in the last bits from run to run
NON_DETERMINISTIC_CUDA = (
    "trilinear upsampling backward (upsample_trilinear3d_backward)",
    "3D max-pooling backward (max_pool3d_with_indices_backward)",
)


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU, or ``cuda:N`` beyond the GPUs
    this machine has, is a config error naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r}: expected auto, cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available (use auto or cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{key}={name} but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}"
            )
    return device


def set_deterministic(device: torch.device) -> None:
    """Make the run repeatable where PyTorch can: deterministic algorithms (a warning names any
    op without one), cuDNN without autotuning, and cuBLAS's fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG``, unless the environment already sets it)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        log.warning(
            "trainer.deterministic=true on CUDA: repeatable except %s, which PyTorch warns "
            "about when they run (README: On a GPU cluster)",
            " and ".join(NON_DETERMINISTIC_CUDA),
        )
