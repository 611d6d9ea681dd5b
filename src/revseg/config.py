"""Config helpers: group options from the command line, early validation, names for reports.

The config groups under ``configs/`` are the registry (``configs/model/<name>.yaml``); nothing
here keeps a second list.
"""

from __future__ import annotations

import itertools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from revseg.device import PRECISIONS
from revseg.errors import ConfigError, RevsegError
from revseg.validation import check_divisible, positive_ints

__all__ = [
    "CONFIG_DIR",
    "MOVED_KEYS",
    "MetricsConfig",
    "TrainerConfig",
    "check_schema",
    "metrics_config",
    "trainer_config",
    "build",
    "group_options",
    "check_group_overrides",
    "check_key_overrides",
    "check_input_sizes",
    "validate_config",
    "model_name",
    "model_option",
]


def _config_dir() -> Path:
    """``configs/``: inside the installed package (a wheel ships it as ``revseg/configs``), else
    the checkout's top-level folder (``src/revseg/config.py`` -> ``configs/``)."""
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    if (packaged / "train.yaml").is_file():
        return packaged
    return here.parents[1] / "configs"


CONFIG_DIR = _config_dir()


def group_options(
    group: str, config_dir: Path = CONFIG_DIR, search: Sequence[str] = ()
) -> list[str]:
    """The options of a config group: the ``.yaml`` files in ``configs/<group>/`` (and in the
    ``search`` folders, e.g. the user's ``--config-dir``)."""
    folders = [config_dir, *map(Path, search)]
    return sorted({p.stem for folder in folders for p in (folder / group).glob("*.yaml")})


def check_group_overrides(
    args: Sequence[str], config_dir: Path = CONFIG_DIR, search: Sequence[str] = ()
) -> None:
    """Check ``group=option`` command-line overrides against the config groups.

    Hydra would report an unknown option over several lines; this gives one line naming the key
    and the allowed values. Sweeps (``model=a,b``) check each value.

    Raises:
        ConfigError: an option that has no ``configs/<group>/<option>.yaml``.
    """
    groups = set(_group_dirs(config_dir, search))
    for override in _parse(args):
        group = override.key_or_group
        if override.is_delete() or override.package or group not in groups:
            continue
        if group.startswith("hydra"):
            continue
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
        options = group_options(group, config_dir, search)
        for value in values:
            if value == "null":
                continue
            if value not in options:
                raise ConfigError(
                    f"{group}={value}: no such option; choose one of: {', '.join(options)}"
                )


def _parse(args: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001 - hydra's parser raises its own error types
        raise ConfigError(f"cannot parse command-line overrides: {err}".splitlines()[0]) from err


def _keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (list items not included)."""
    if not isinstance(node, DictConfig):
        return []
    out = []
    for key in node.keys():
        name = f"{prefix}{key}"
        out.append(name)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            out += _keys(child, f"{name}.")
    return out


def _has_key(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node.keys():
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.lstrip("-").isdigit():
            if not -len(node) <= int(part) < len(node):
                return False
            node = node._get_node(int(part))
        else:
            return False
    return True


_MAX_COMPOSED = 64  # combinations of group sweeps checked by check_key_overrides


def check_key_overrides(
    name: str, args: Sequence[str], config_dir: Path = CONFIG_DIR, search: Sequence[str] = ()
) -> None:
    """Check that every ``key=value`` override names a key of the composed config ``name``.

    Hydra reports a typo'd key (``trainer.max_epoch=3``) over five lines and exits 1; this is
    one line with the nearest existing key. The config is composed with the group choices,
    additions and deletions of ``args`` (so the keys are those of the chosen options).

    Args:
        search: extra config directories (``hydra.searchpath`` entries, e.g. the user's
            ``--config-dir``).

    Raises:
        ConfigError: naming the unknown key and the nearest existing one.
    """
    import difflib

    from hydra.core.override_parser.types import OverrideType

    parsed = _parse(args)
    groups = set(_group_dirs(config_dir, search))
    changes = [
        o
        for o in parsed
        if o.type == OverrideType.CHANGE
        and not o.key_or_group.startswith("hydra")
        and o.key_or_group.split("/")[0] not in groups
        and not o.package
    ]
    if not changes:
        return
    for override in changes:
        if override.key_or_group in MOVED_KEYS:
            raise _moved(override.key_or_group)
    fixed = [o.input_line for o in parsed if o not in changes and not o.is_sweep_override()]
    # every combination of the sweeps over group options: a key one option lacks fails its job
    sweeps = [
        [f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()]
        for o in parsed
        if o not in changes and o.is_sweep_override()
    ]
    lacking: dict[str, list[tuple[str, ...]]] = {}
    composed = 0
    for choice in itertools.islice(itertools.product(*sweeps), _MAX_COMPOSED):
        composed += 1
        cfg = compose_config(
            name, [*fixed, *choice], False, config_dir=config_dir, search=search, check_keys=False
        )
        for override in changes:
            if not _has_key(cfg, override.key_or_group):
                lacking.setdefault(override.input_line, []).append(choice)
    for override in changes:
        choices = lacking.get(override.input_line, ())
        key = override.key_or_group
        if not choices:
            continue
        if len(choices) < composed:  # some swept options have the key: name one that lacks it
            raise ConfigError(
                f"{key}: no such config key with {' '.join(choices[0])} in this sweep; sweep the "
                "options that have it in a -m command of their own"
            )
        near = difflib.get_close_matches(key, _keys(cfg), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(
            f"{key}: no such config key; {hint}(a new key is given as +{override.input_line})"
        )


def _group_dirs(config_dir: Path, search: Sequence[str] = ()) -> list[str]:
    """The config groups: the folders of ``config_dir`` and of the ``search`` folders."""
    names = set()
    for folder in (config_dir, *map(Path, search)):
        if folder.is_dir():
            names |= {p.name for p in folder.iterdir() if p.is_dir()}
    return sorted(names)


def require_keys(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first mandatory key (``???``) left unset."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{missing[0]} is required: give it on the command line ({missing[0]}=...)"
        )


def compose_config(
    name: str,
    overrides: Sequence[str],
    require: bool = True,
    return_hydra_config: bool = False,
    config_dir: Path = CONFIG_DIR,
    search: Sequence[str] = (),
    check_keys: bool = True,
) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with command-line ``overrides``, as the scripts do.

    Raises:
        ConfigError: an unknown group option, an unknown key (naming the nearest one), a
            composition error (its first line), or, with ``require``, a mandatory key left
            unset.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_group_overrides(overrides, config_dir, search)
    composed = list(overrides)
    if search:
        composed.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in search) + "]")
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            cfg = compose(name, overrides=composed, return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        if check_keys:  # an unknown key: name the nearest one
            check_key_overrides(name, overrides, config_dir, search)
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    if require:
        require_keys(cfg)
    return cfg


_CHOICES = "choices"


def _key(**meta: Any) -> Any:
    """A required schema field: its type is the annotation, ``meta`` its bounds (``min``,
    ``positive``) or ``choices``."""
    return field(metadata=meta)


@dataclass(frozen=True)
class TrainerConfig:
    """The ``trainer`` group, typed: what :class:`~revseg.training.trainer.Trainer` reads.

    The values and their meaning are in ``configs/trainer/default.yaml`` (the one place of the
    defaults); this schema holds the types and bounds, checked by :func:`trainer_config` with
    one line naming the key. Every key is required: a trainer config of one's own starts from
    ``defaults: [default]`` as ``configs/trainer/ddp.yaml`` does.
    """

    device: str
    max_epochs: int = _key(min=1)
    val_every: int = _key(min=1)
    val_before_training: bool = _key()
    monitor: str = _key()
    monitor_mode: str = _key(choices=("max", "min"))
    resume: bool | str = _key()
    overwrite: bool = _key()
    resume_changes: list = _key()
    log_every_n_steps: int = _key(min=1)
    log_images: bool = _key()
    progress_bar: bool = _key()
    deterministic: bool = _key()
    cudnn_benchmark: bool = _key()
    tf32: bool = _key()
    channels_last: bool = _key()
    compile: bool | str = _key()
    limit_train_batches: int | None = _key(min=1)
    limit_val_batches: int | None = _key(min=1)
    precision: str = _key(choices=PRECISIONS)
    accumulate_grad_batches: int = _key(min=1)
    grad_clip: float | None = _key(positive=True)
    nan_policy: str = _key(choices=("stop", "skip"))
    checkpoint_every_n_steps: int | None = _key(min=1)
    strategy: str = _key(choices=("single", "ddp"))
    ddp_backend: str = _key()
    find_unused_parameters: bool = _key()
    plan_memory: bool = _key()


@dataclass(frozen=True)
class MetricsConfig:
    """The ``metrics`` group (``configs/metrics/default.yaml``): options of the validation
    metrics, passed to the data module's ``build_metrics`` (those it takes) or to
    :class:`~revseg.metrics.brats.RegionMetrics`."""

    hd95: bool = _key()
    lesion_wise: bool = _key()


MOVED_KEYS = {"trainer.hd95": "metrics.hd95", "trainer.lesion_wise": "metrics.lesion_wise"}
"""Keys that moved to another group: the old name is one line naming the new one."""


def _moved(key: str) -> ConfigError:
    new = MOVED_KEYS[key]
    return ConfigError(f"{key} is now {new} (configs/{new.split('.')[0]}/): use {new}=...")


def _allowed(kind: Any) -> tuple[tuple[type, ...], bool]:
    """The Python types a field's annotation allows, and whether it allows null."""
    args = (
        typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else ()
    )
    members = args or (kind,)
    return tuple(m for m in members if m is not type(None)), type(None) in members


def _describe(kinds: tuple[type, ...], nullable: bool, meta: Mapping[str, Any]) -> str:
    if _CHOICES in meta:
        text = "one of " + ", ".join(meta[_CHOICES])
    elif kinds == (bool,):
        text = "true or false"
    elif kinds == (bool, str):
        text = "true, false or a name"
    elif kinds == (int,):
        text = {1: "a positive int", 0: "a non-negative int"}.get(meta.get("min"), "an int")
    elif kinds == (float,):
        text = "a positive number" if meta.get("positive") else "a number"
    elif kinds == (list,):
        text = "a list of config keys, e.g. [optimizer.lr]"
    else:
        text = "a string"
    return text + (" or null" if nullable else "")


def _fits(value: Any, kinds: tuple[type, ...], meta: Mapping[str, Any]) -> bool:
    if isinstance(value, list):  # a list of config keys
        return list in kinds and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):  # a bool is an int to Python, never to a config
        return bool in kinds
    if isinstance(value, int) and (int in kinds or float in kinds):
        number: float = value
    elif isinstance(value, float) and float in kinds:
        number = value
    elif isinstance(value, str) and str in kinds:
        return value in meta.get(_CHOICES, (value,))
    else:
        return False
    if "min" in meta and number < meta["min"]:
        return False
    return not (meta.get("positive") and number <= 0)


def check_schema(node: Any, schema: type, key: str) -> Any:
    """The config group ``node`` as an instance of the dataclass ``schema``.

    Raises:
        ConfigError: one line naming ``<key>.<field>``: an unknown key (a moved one names its new
            key), a missing one, or a value of the wrong type or out of its bounds.
    """
    from omegaconf import OmegaConf

    if not isinstance(node, DictConfig):
        raise ConfigError(f"config section '{key}' must be a mapping, got {node!r}")
    values = OmegaConf.to_container(node, resolve=True)
    hints = typing.get_type_hints(schema)
    for name in values:
        if f"{key}.{name}" in MOVED_KEYS:
            raise _moved(f"{key}.{name}")
        if name not in hints:
            raise ConfigError(f"{key}.{name}: no such key (configs/{key}/ lists them)")
    for spec in fields(schema):
        if spec.name not in values:
            raise ConfigError(f"{key}.{spec.name} is required (configs/{key}/default.yaml)")
        kinds, nullable = _allowed(hints[spec.name])
        value = values[spec.name]
        if (value is None and not nullable) or (
            value is not None and not _fits(value, kinds, spec.metadata)
        ):
            wanted = _describe(kinds, nullable, spec.metadata)
            raise ConfigError(f"{key}.{spec.name} must be {wanted}, got {value!r}")
    return schema(**values)


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    """``cfg.trainer`` checked against :class:`TrainerConfig` (and the keys that depend on each
    other), typed.

    Raises:
        ConfigError: naming the key and what it must be.
    """
    t = check_schema(cfg.get("trainer"), TrainerConfig, "trainer")
    if t.cudnn_benchmark and t.deterministic:
        raise ConfigError(
            "trainer.cudnn_benchmark=true contradicts trainer.deterministic=true (autotuning may "
            "pick other kernels in each run); set one of them to false"
        )
    if t.compile is not False:
        from revseg.device import compile_backend

        compile_backend(t.compile)
    return t


def metrics_config(cfg: DictConfig) -> MetricsConfig:
    """``cfg.metrics`` checked against :class:`MetricsConfig`."""
    return check_schema(cfg.get("metrics"), MetricsConfig, "metrics")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(cfg: DictConfig) -> None:
    """Fail early, before any data is read, on values that cannot work.

    Raises:
        ConfigError: naming the key and what it must be.
    """
    for section in ("model", "data", "trainer", "metrics", "optimizer", "loss", "paths"):
        if cfg.get(section) is None:
            raise ConfigError(f"config section '{section}' is missing")
    require_keys(cfg)
    trainer_config(cfg)
    metrics_config(cfg)
    lr = cfg.optimizer.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"optimizer.lr must be a positive number, got {lr!r}")
    decay = cfg.optimizer.get("weight_decay")
    if decay is not None and (not _number(decay) or decay < 0):
        raise ConfigError(f"optimizer.weight_decay must be a number >= 0, got {decay!r}")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    for key in ("memory_saving", "checkpointing"):
        value = cfg.model.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"model.{key} must be true or false, got {value!r}")
    for key in ("crop_size", "patch_size"):
        if cfg.data.get(key) is not None:
            positive_ints(cfg.data[key], f"data.{key}", 3)


def check_input_sizes(cfg: DictConfig, divisor: int) -> None:
    """``data.crop_size`` / ``data.patch_size`` (a video: ``[data.frames, *data.size]``) must be
    multiples of the model's ``divisor`` (its downsampling factor, an attribute of every model),
    checked once the model is built and before any data is read.

    Raises:
        ConfigError: naming the key, the sizes and the divisor.
    """
    sizes = {f"data.{k}": cfg.data[k] for k in ("crop_size", "patch_size") if cfg.data.get(k)}
    if cfg.data.get("frames") is not None and cfg.data.get("size") is not None:  # a video
        sizes["data.frames+size"] = [cfg.data.frames, *positive_ints(cfg.data.size, "data.size", 2)]
    for key, value in sizes.items():
        size = positive_ints(value, key, 3)
        check_divisible(size, divisor, key, "the model's downsampling factor")


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with errors a user can act on.

    Hydra wraps whatever the target raises; a :class:`RevsegError` is unwrapped, and an unknown
    or ill-typed argument becomes a :class:`ConfigError` naming the config key.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, RevsegError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)):
            raise ConfigError(f"{key}: {cause}".splitlines()[0]) from None
        raise


def model_name(cfg: DictConfig) -> str:
    """The model's config-group option (``prev_unet``) when run through Hydra, else its class."""
    return _choice("model") or str(cfg.model._target_).rsplit(".", 1)[-1]


def data_name(cfg: DictConfig) -> str:
    """The data config-group option (``synthetic_brats``) when run through Hydra, else its class."""
    return _choice("data") or str(cfg.data._target_).rsplit(".", 1)[-1]


def model_option(target: str, config_dir: Path = CONFIG_DIR) -> str | None:
    """The ``configs/model/<option>.yaml`` whose ``_target_`` is ``target``, if one is."""
    from omegaconf import OmegaConf

    for option in group_options("model", config_dir):
        node = OmegaConf.load(config_dir / "model" / f"{option}.yaml")
        if str(node.get("_target_")) == target:
            return option
    return None


def _choice(group: str) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)
