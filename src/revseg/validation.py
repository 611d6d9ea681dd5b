"""Rules a value must follow, each stated once, with the one-line error that names the key.

Used by the config check, the data modules, the planner and the composition in
:func:`revseg.training.trainer.train`: a list of positive ints (:func:`positive_ints`) and input
sizes a model can take (:func:`check_divisible`, against :func:`model_divisor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

from revseg.errors import ConfigError

__all__ = ["check_divisible", "model_divisor", "positive_ints"]


def positive_ints(value: Any, key: str, length: int | None = None) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints (``length`` of them, if given).

    Raises:
        ConfigError: ``"<key> must be <length> positive ints, got <value>"``.
    """
    count = f"{length} " if length is not None else "a list of "
    wrong = ConfigError(f"{key} must be {count}positive ints, got {_shown(value)}")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        try:  # an OmegaConf ListConfig is a Sequence; anything else iterable is turned into one
            value = list(value)
        except TypeError:
            raise wrong from None
    if length is not None and len(value) != length or not value:
        raise wrong
    if not all(isinstance(v, Integral) and not isinstance(v, bool) and v > 0 for v in value):
        raise wrong
    return tuple(int(v) for v in value)


def check_divisible(sizes: Sequence[int], divisor: int, key: str, why: str = "") -> None:
    """Every size a multiple of ``divisor`` (a model's downsampling factor).

    Raises:
        ConfigError: ``"<key>=<sizes>: every size must be divisible by <divisor> (<why>)"``.
    """
    if any(int(s) % divisor for s in sizes):
        reason = f" ({why})" if why else ""
        raise ConfigError(f"{key}={list(sizes)}: every size must be divisible by {divisor}{reason}")


def model_divisor(model: Any, key: str = "model") -> int:
    """The factor a model's ``D, H, W`` must be multiples of: its ``divisor`` attribute (every
    revseg model has one; docs/architecture.md, contract 2).

    Raises:
        ConfigError: naming ``key`` and the model's class, for a model without one.
    """
    divisor = getattr(model, "divisor", None)
    if not isinstance(divisor, Integral) or divisor < 1:
        raise ConfigError(
            f"{key}: {type(model).__name__} has no positive int `divisor` (the factor its input "
            "sizes must be multiples of; see docs/architecture.md, contract 2)"
        )
    return int(divisor)


def _shown(value: Any) -> str:
    try:
        return repr(list(value)) if not isinstance(value, (str, bytes)) else repr(value)
    except TypeError:
        return repr(value)
