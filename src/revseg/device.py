"""The device a run trains on, its autocast context, and the backend switches the ``trainer``
config sets for it.

``trainer.device`` names the device (checked against the GPUs this machine has);
``trainer.deterministic`` asks for repeatable results (see README, "On a GPU cluster", for what is
and is not bit-exact on CUDA); ``trainer.cudnn_benchmark`` lets cuDNN time its algorithms for
each new input shape and keep the fastest; ``trainer.channels_last`` stores the model and the
batches channels-last (``torch.channels_last_3d``); ``trainer.compile`` runs the training forward
through :func:`torch.compile`; ``trainer.tf32`` lets float32 convolutions and matrix products
run in TF32 on GPUs that have it (Ampere and later).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from revseg.errors import ConfigError

__all__ = [
    "CHANNELS_LAST",
    "NON_DETERMINISTIC_CUDA",
    "PRECISIONS",
    "autocast_context",
    "autocast_dtype",
    "compile_backend",
    "resolve_device",
    "set_cudnn_benchmark",
    "set_deterministic",
    "set_tf32",
    "tf32_flags",
]

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


CHANNELS_LAST = torch.channels_last_3d


def set_cudnn_benchmark(enabled: bool) -> None:
    """``torch.backends.cudnn.benchmark``: cuDNN tries its convolution algorithms on the first
    batch of each shape and keeps the fastest (faster steps for fixed shapes; the choice, and so
    the last bits of the results, may differ from run to run)."""
    torch.backends.cudnn.benchmark = enabled


def _tf32_new_api() -> bool:
    # torch >= 2.9: per-backend ``fp32_precision`` ("tf32" or "ieee"); the allow_tf32 flags
    # before (reading a legacy flag after setting the new one warns)
    return hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def set_tf32(enabled: bool) -> None:
    """``trainer.tf32``: float32 cuDNN convolutions and cuBLAS matrix products in TF32 (a
    10-bit mantissa on tensor cores; Ampere and later) or in float32 (IEEE).

    PyTorch's default runs cuDNN convolutions in TF32, so an "fp32" run on a recent GPU is not
    float32: a reversible level's largest reconstruction error grows from 5e-5 at depth 1 to 9e-4
    at depth 8 (TF32 emulated on the CPU; float32: 5e-7 to 2e-6; docs/benchmarks/gpu). revseg's
    default is false."""
    if _tf32_new_api():
        precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    else:
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


def tf32_flags() -> dict[str, bool]:
    """Whether float32 convolutions (cuDNN) and matrix products (cuBLAS) may use TF32 now, as
    ``summary.json`` and the GPU validation report record them."""
    if _tf32_new_api():
        return {
            "cudnn_conv": torch.backends.cudnn.conv.fp32_precision == "tf32",
            "cuda_matmul": torch.backends.cuda.matmul.fp32_precision == "tf32",
        }
    return {
        "cudnn_conv": bool(torch.backends.cudnn.allow_tf32),
        "cuda_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def compile_backend(value: bool | str | None) -> str | None:
    """The :func:`torch.compile` backend ``trainer.compile`` asks for: ``None`` for false,
    ``inductor`` for true, else the backend named (e.g. ``aot_eager``, which traces without
    generating code).

    Raises:
        ConfigError: a value that is neither a boolean nor a torch.compile backend.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value:
        from torch._dynamo import list_backends

        known = list_backends(exclude_tags=())
        if value in known:
            return value
        raise ConfigError(
            f"trainer.compile={value}: no such torch.compile backend; use true (inductor), "
            f"false, or one of {', '.join(b for b in list_backends())}"
        )
    raise ConfigError(f"trainer.compile must be true, false or a backend name, got {value!r}")


PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str, key: str = "trainer.precision") -> torch.dtype | None:
    """The autocast dtype of ``trainer.precision``: ``None`` for fp32.

    Raises:
        ConfigError: for a precision other than fp32, bf16, fp16 (naming ``key``).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r}: expected one of {', '.join(PRECISIONS)}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward's context for ``trainer.precision``: nothing for fp32, else ``torch.autocast``
    in bf16 or fp16 on ``device``."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
