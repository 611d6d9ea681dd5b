"""Autocast as the device a run will use applies it, on the CPU the planner traces on.

``trainer.precision`` (fp32, bf16, fp16) runs the forward under :func:`torch.autocast`, whose
op policies differ by device (PyTorch's autocast op reference, ``aten/src/ATen/autocast_mode.cpp``):

* both devices run convolutions and matrix products in the low-precision dtype, and cache the
  low-precision copy of every parameter for the duration of the autocast region;
* **CUDA** runs ``group_norm``, ``layer_norm``, ``softmax``, ``log_softmax``, ``sum``, ``exp``,
  ``log``, ``pow`` and the losses in float32 (a low-precision input is cast up; for ``sum`` and
  ``softmax`` only the output dtype is set), and pooling in the input's dtype;
* **CPU** runs ``group_norm``, ``softmax``, ``sum`` ... in the input's dtype (low precision after a
  convolution) and ``max_pool3d``, ``avg_pool3d`` in float32.

A GroupNorm net therefore keeps float32 activations around every normalisation on a GPU, and a
CPU trace under CPU autocast understates them. :func:`trace_precision` gives the planner either
device's rules on the CPU: CPU autocast itself, plus, for the CUDA rules, a
:class:`~torch.overrides.TorchFunctionMode` that applies CUDA's policy to the ops whose policy
differs (:data:`CUDA_FP32`, :data:`CUDA_FP32_OUTPUT`, :data:`CUDA_INPUT_DTYPE`). Ops a model calls
through ``torch.ops`` bypass both autocast and the mode: revseg's fused reversible step chooses its
dtypes itself, the same on both devices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from revseg.device import autocast_context, autocast_dtype
from revseg.errors import ConfigError

__all__ = [
    "CUDA_FP32",
    "CUDA_FP32_OUTPUT",
    "CUDA_INPUT_DTYPE",
    "CUDA_LOW_PRECISION",
    "RULES",
    "CudaAutocastRules",
    "check_precision",
    "forward_autocast",
    "rules_for_device",
    "trace_precision",
]

RULES = ("cpu", "cuda")

# CUDA's ``fp32`` policy: low-precision floating inputs are cast to float32
CUDA_FP32 = frozenset(
    {
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
        "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus",
        "layer_norm", "group_norm", "norm", "nuclear_norm", "cosine_similarity",
        "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
        "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
        "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
        "binary_cross_entropy_with_logits", "cross_entropy", "dist", "pdist", "cdist", "renorm",
        "logsumexp",
    }
)  # fmt: skip
# CUDA's ``fp32_set_opt_dtype`` policy: the op runs on its input with a float32 output dtype
CUDA_FP32_OUTPUT = frozenset(
    {"prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum", "softmin"}
)
# CUDA's ``lower_precision_fp`` ops that CPU autocast leaves alone
CUDA_LOW_PRECISION = frozenset({"einsum", "mv", "addmv", "addr", "chain_matmul", "multi_dot"})
# CPU casts these to float32; CUDA has no policy for them (they run in the input's dtype)
CUDA_INPUT_DTYPE = frozenset(
    {
        "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d",
        "fractional_max_pool3d", "max_unpool3d", "max_unpool2d", "grid_sample", "pad",
    }
)  # fmt: skip


def check_precision(precision: str, rules: str) -> None:
    """Check a ``trainer.precision`` (:data:`~revseg.device.PRECISIONS`) and a rules name
    (:data:`RULES`).

    Raises:
        ConfigError: naming the value and the choices.
    """
    autocast_dtype(precision)
    if rules not in RULES:
        raise ConfigError(f"autocast rules {rules!r}: expected one of {', '.join(RULES)}")


def rules_for_device(device: str, key: str = "trainer.device") -> str:
    """Whose autocast rules a run on ``device`` follows: ``cuda`` for ``cuda[:N]``, ``cpu`` for
    ``cpu``, and for ``auto`` the device this machine would pick. Nothing is checked against the
    GPUs present: a CPU machine plans a GPU run with CUDA's rules.

    Raises:
        ConfigError: a device name that is neither auto, cpu nor cuda[:N].
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"{key}={device!r}: expected auto, cpu or cuda[:N]") from None
    if kind not in RULES:
        raise ConfigError(f"{key}={device!r}: the planner knows the autocast rules of cpu, cuda")
    return kind


def _name(func: Any) -> str:
    return getattr(func, "__name__", "").lstrip("_") or getattr(func, "__name__", "")


def _cast(obj: Any, dtype: torch.dtype, low: tuple[torch.dtype, ...]) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.dtype in low else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype, low) for o in obj)
    return obj


def _has_low(obj: Any, low: tuple[torch.dtype, ...]) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dtype in low
    if isinstance(obj, (list, tuple)):
        return any(_has_low(o, low) for o in obj)
    return False


class CudaAutocastRules(TorchFunctionMode):
    """CUDA's autocast policy for the ops where it differs from CPU's, under CPU autocast.

    Active only while CPU autocast is enabled; casts go through ordinary (differentiable)
    ``Tensor.to`` calls, so autograd keeps what it would keep on a GPU: a float32 copy saved by
    a float32 op, a low-precision copy saved by a low-precision one.
    """

    _LOW = (torch.float16, torch.bfloat16)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        name = _name(func)
        if name in CUDA_FP32 and _has_low((args, kwargs), self._LOW):
            args = _cast(args, torch.float32, self._LOW)
            kwargs = {k: _cast(v, torch.float32, self._LOW) for k, v in kwargs.items()}
        elif (
            name in CUDA_FP32_OUTPUT
            and kwargs.get("dtype") is None
            and _has_low(args[:1], self._LOW)
        ):
            kwargs = {**kwargs, "dtype": torch.float32}
        elif name in CUDA_LOW_PRECISION:
            dtype = torch.get_autocast_dtype("cpu")
            args = _cast(args, dtype, (torch.float32,))
        elif name in CUDA_INPUT_DTYPE:
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def trace_precision(precision: str, rules: str = "cpu") -> Iterator[None]:
    """Tracing on the CPU a run at ``precision`` on a ``rules`` device: inside it,
    :func:`forward_autocast` turns autocast on for the forward; with ``rules="cuda"``,
    CUDA's policy (:class:`CudaAutocastRules`) applies wherever CPU autocast is on, the
    recomputations of the backward (checkpointing, reversible blocks) included.

    Raises:
        ConfigError: an unknown precision or rules name.
    """
    check_precision(precision, rules)
    cuda = rules == "cuda" and precision != "fp32"
    with CudaAutocastRules() if cuda else contextlib.nullcontext():
        yield


def forward_autocast(precision: str) -> contextlib.AbstractContextManager:
    """CPU autocast in ``precision``'s dtype for the traced forward (nothing for fp32)."""
    return autocast_context(torch.device("cpu"), precision)
