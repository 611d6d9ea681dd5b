"""BraTS brain-tumour data: finding the cases on disk, checks, the train/val split, the data module.

The data module :class:`BratsData` is what ``configs/data/*.yaml`` instantiate. It yields batches
of four MRI modalities and the three overlapping tumour regions of the BraTS challenge (Menze et
al. 2015; Bakas et al. 2018)::

    {"image": (B, 4, D, H, W) float32,   # t1, t1ce, t2, flair; z-scored inside the brain
     "label": (B, 3, D, H, W) float32,   # WT, TC, ET in {0, 1}
     "case": [B case ids]}

Every layout of :data:`revseg.data.layouts.LAYOUTS` (the published BraTS ones, the Decathlon's
Task01) is recognised from its files, with its own label convention; :mod:`revseg.data.checks`
reports bad cases before training.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from functools import partial
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from monai.data import DataLoader, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

from revseg.data.checks import Problem, check_cases, format_problems
from revseg.data.layouts import (
    LAYOUTS,
    MODALITIES,
    Discovery,
    LabelConvention,
    Layout,
    discover,
)
from revseg.data.synthetic import make_synthetic_brats, read_manifest
from revseg.data.transforms import READERS, build_transforms, split_pipeline
from revseg.errors import ConfigError, DataError, RevsegError
from revseg.files import write_text_atomic
from revseg.validation import positive_ints

__all__ = [
    "CACHE_MODES",
    "CHECK_MODES",
    "LAYOUTS",
    "MODALITIES",
    "BratsData",
    "Layout",
    "find_cases",
    "fold_cases",
    "read_split_file",
    "split_cases",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_MODES = ("memory", "disk", "none")
"""``data.cache``: keep the deterministic part of the pipeline in memory, on disk, or not at all."""
CHECK_MODES = ("quick", "full", "none")
"""``data.check``: headers only, headers and voxels, or nothing (see :mod:`revseg.data.checks`)."""

_CACHE_VERSION = 1  # bump when the deterministic pipeline changes: old disk caches are not reused


def find_cases(
    root: str | os.PathLike, require_label: bool = True, layout: str = "auto"
) -> list[dict]:
    """List the cases of a BraTS dataset, detecting its layout.

    Args:
        root: dataset folder.
        require_label: a case without a segmentation is an error; if False its ``label`` is None.
        layout: ``"auto"`` or a name of :data:`revseg.data.layouts.LAYOUTS`.

    Returns:
        ``[{"case": id, "image": [t1, t1ce, t2, flair paths] (or one 4D path), "label": seg
        path}, ...]`` sorted by case id.

    Raises:
        DataError: ``root`` is missing, holds no case, or a case lacks a file (the message names
            the case folder and the file).
    """
    found = discover(root, layout)
    for case in found.cases:
        for what, path in case.missing:
            if what != "seg" or require_label:
                raise DataError(f"data.root: case {case.case} is missing {path}")
    return [case.item() for case in found.cases]


def read_split_file(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read a split file: JSON ``{"train": [case ids], "val": [case ids], ...}``.

    The ``split.json`` a run writes is such a file, so a split can be reused.

    Raises:
        DataError: the file is missing, not JSON, or lacks the lists; naming ``data.split_file``.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except OSError as error:
        raise DataError(f"data.split_file: cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise DataError(f"data.split_file: {path} is not JSON: {error}") from None
    lists = [content.get(key) if isinstance(content, dict) else None for key in ("train", "val")]
    if not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in lists):
        raise DataError(
            f'data.split_file: {path} must hold {{"train": [case ids], "val": [case ids]}}'
        )
    train, val = lists
    both = sorted(set(train) & set(val))
    if both:
        raise DataError(f"data.split_file: {path} lists {both[0]} in both train and val")
    return train, val


def split_cases(
    cases: Sequence[T], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Split cases into train and validation, deterministically for a given ``seed``.

    The validation set has ``round(n * val_fraction)`` cases, at least one and at most ``n - 1``
    when ``n >= 2`` (``n == 1``: all in train). Both lists keep the input order.

    Args:
        cases: the cases (any items, e.g. the dicts of :func:`find_cases`).
        val_fraction: fraction for validation, in (0, 1).
        seed: seed of the random permutation.

    Returns:
        ``(train, val)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    n = len(cases)
    if n < 2:
        return list(cases), []
    num_val = min(max(round(n * val_fraction), 1), n - 1)
    val_index = set(np.random.default_rng(seed).permutation(n)[:num_val].tolist())
    train = [c for i, c in enumerate(cases) if i not in val_index]
    val = [c for i, c in enumerate(cases) if i in val_index]
    return train, val


def fold_cases(
    cases: Sequence[T], fold: int, num_folds: int = 5, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Fold ``fold`` of a seeded k-fold cross-validation: ``(train, val)``.

    The cases are permuted with ``seed`` and cut into ``num_folds`` parts whose sizes differ by at
    most one (as ``numpy.array_split``); part ``fold`` is the validation set and the rest is the
    training set. The validation sets of the folds ``0 .. num_folds - 1`` are disjoint and cover
    every case. Both lists keep the input order.

    Args:
        cases: the cases (any items, e.g. the sorted cases of a dataset).
        fold: the validation part, ``0 <= fold < num_folds``.
        num_folds: number of folds, ``2 <= num_folds <= len(cases)``.
        seed: seed of the random permutation.

    Raises:
        ConfigError: ``fold`` or ``num_folds`` out of range (naming ``data.fold`` /
            ``data.num_folds``).
        DataError: fewer cases than folds.
    """
    for key, value in (("fold", fold), ("num_folds", num_folds)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"data.{key} must be an int, got {value!r}")
    if num_folds < 2:
        raise ConfigError(f"data.num_folds must be >= 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ConfigError(f"data.fold must be in 0..{num_folds - 1} (data.num_folds), got {fold}")
    n = len(cases)
    if n < num_folds:
        raise DataError(f"data.num_folds={num_folds}: only {n} cases to split into folds")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), num_folds)
    val_index = set(parts[fold].tolist())
    train = [c for i, c in enumerate(cases) if i not in val_index]
    val = [c for i, c in enumerate(cases) if i in val_index]
    return train, val


def _shape(value: Any, key: str) -> tuple[int, int, int]:
    return positive_ints(value, f"data.{key}", 3)  # type: ignore[return-value]


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"data.{key} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"data.{key} must be true or false, got {value!r}")
    return value


def _float(value: Any, key: str, low: float, high: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        bounds = f"[{low:g}, {high:g}]" if high != float("inf") else f">= {low:g}"
        raise ConfigError(f"data.{key} must be a number {bounds}, got {value!r}")
    return float(value)


def _choice(value: Any, key: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"data.{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _hash_item(item: dict, signature: str) -> bytes:
    """Cache key of a case: its files (path, size, mtime) and the pipeline's settings."""
    files = item["image"] if isinstance(item["image"], list) else [item["image"]]
    files = [*files, *([item["label"]] if item.get("label") else [])]
    stats = []
    for name in files:
        stat = os.stat(name)
        stats.append((name, stat.st_size, stat.st_mtime_ns))
    return pickle_hashing({"item": item, "files": stats, "pipeline": signature})


def _revseg_error(error: BaseException) -> RevsegError | None:
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, RevsegError):
        cause = cause.__cause__
    return cause


class _WarmUp(torch.utils.data.Dataset):
    """Fills a ``PersistentDataset``'s cache case by case; returns each case's error or None."""

    def __init__(self, dataset: PersistentDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.data)

    def __getitem__(self, index: int) -> str | None:
        try:
            self.dataset._cachecheck(self.dataset.data[index])
        except Exception as error:  # noqa: BLE001 - a revseg error is the case's problem
            found = _revseg_error(error)
            if found is None:
                raise
            return str(found)
        return None


def _no_collate(batch: Any) -> Any:
    return batch


class _Transformed(torch.utils.data.Dataset):
    """``transform(base[i])``: the random part of the pipeline over cached items."""

    def __init__(self, base: Sequence[dict] | torch.utils.data.Dataset, transform: Any) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return self.transform(dict(self.base[index]))


class _Loader(DataLoader):
    """MONAI's ``DataLoader`` whose revseg errors from worker processes stay one line (PyTorch
    re-raises them with the worker's traceback in the message)."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except RevsegError as error:
            lines = str(error).strip().splitlines()
            if len(lines) > 1 and lines[0].startswith("Caught "):
                raise type(error)(lines[-1].split(": ", 1)[-1]) from None
            raise


def train_loader(
    dataset: Any, batch_size: int, num_workers: int, seed: int | None, pin_memory: bool
) -> DataLoader:
    """Shuffled training batches; ``seed`` seeds the order and the random transforms (``None``:
    torch's global RNG)."""
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return _Loader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def val_loader(dataset: Any, num_workers: int, pin_memory: bool) -> DataLoader:
    """Validation batches of one case each, in case order."""
    return _Loader(
        dataset, batch_size=1, shuffle=False, num_workers=num_workers, pin_memory=pin_memory
    )


class BratsData:
    """Data module for BraTS datasets in any public layout (or the generated demo dataset).

    Setup finds the cases (layout auto-detected or ``layout``), checks them (``check``), splits
    them (seeded 80/20, fold ``fold`` of a seeded k-fold cross-validation, or ``split_file``) and
    prepares the deterministic part of the pipeline for every case (``cache``): read the four
    modalities in the order t1, t1ce, t2, flair, label -> WT/TC/ET in the dataset's convention,
    crop to the brain's bounding box, z-score per channel, centre-crop or pad to
    ``crop_size``. Training then takes random ``patch_size`` patches (or the
    whole crop) with the in-plane augmentation of Brügger et al. that is switched on. See
    :func:`revseg.data.transforms.build_transforms`.

    Bad cases (a missing or unreadable file, shapes or affines that differ, 3D/4D mismatch, and
    with ``check="full"`` or a cache also NaN/Inf voxels, empty volumes, labels outside the
    convention) stop setup with one line per problem naming the case and file, or with
    ``skip_bad_cases`` are listed and left out (see :meth:`write_split`).

    Args:
        root: dataset folder.
        generate: if ``root`` is missing, generate the synthetic demo dataset there (demo only).
        num_cases: number of generated cases (``generate`` only; may be None otherwise).
        volume_shape: shape of the generated volumes (``generate`` only; may be None otherwise).
        crop_size: ``(D, H, W)`` fed to the network for validation, and in training when
            ``patch_size`` is None.
        patch_size: random training patch ``(D, H, W)``, each <= ``crop_size``; None: whole crop.
        val_fraction: fraction of the cases for validation, in (0, 1).
        split_seed: seed of the train/val split (and of the folds).
        fold: None: the ``val_fraction`` split; else the validation fold of a seeded
            ``num_folds``-fold cross-validation (:func:`fold_cases`; ``val_fraction`` unused).
        num_folds: number of folds for ``fold``.
        batch_size: training batch size (validation uses 1).
        num_workers: data loader worker processes (also used to fill the caches).
        flip_prob: flip probability per axis in training; 0 disables flips.
        enhancing_label: None: the layout's label convention; an int replaces its enhancing label.
        reader: ``"nibabel"`` or ``"simpleitk"``.
        cache: ``"memory"`` (or True) keeps the prepared cases in memory, about 4 bytes x 4.75
            channels per voxel of ``crop_size`` per case; ``"disk"`` writes them to ``cache_dir``
            (MONAI ``PersistentDataset``, float16 image + uint8 regions, about 2.75 bytes x
            ``crop_size`` voxels per case) so later epochs and runs decode no NIfTI;
            ``"none"`` (or False) reads every case every epoch.
        layout: ``"auto"`` or a name of :data:`revseg.data.layouts.LAYOUTS`.
        cache_dir: folder of the disk cache (``cache="disk"``).
        check: ``"quick"`` (headers), ``"full"`` (also every voxel) or ``"none"``.
        skip_bad_cases: leave bad cases out (listed in the log and ``split.json``) instead of
            stopping.
        split_file: JSON ``{"train": [...], "val": [...]}`` of case ids, e.g. the ``split.json``
            of an earlier run; None: the seeded split.
        rotate_deg: in-plane rotation range in degrees (paper: 20); 0 disables it.
        scale_max: in-plane scaling in ``[1/scale_max, scale_max]`` (paper: 1.1); 1 disables it.
        elastic_magnitude: elastic deformation offsets in voxels; 0 disables it.
        elastic_spacing: elastic control-point spacing in voxels.
        deform_prob: probability of the in-plane rotation / scaling / elastic deformation.
        intensity_shift: per-channel intensity shift range (paper: 0.1); 0 disables it.

    Raises:
        ConfigError: an argument is invalid; the message names the ``data.<key>``.
    """

    in_channels = len(MODALITIES)
    out_channels = 3

    def __init__(
        self,
        root: str | os.PathLike = "data/synthetic_brats",
        generate: bool = False,
        num_cases: int | None = 16,
        volume_shape: Sequence[int] | None = (48, 48, 48),
        crop_size: Sequence[int] = (160, 192, 160),
        patch_size: Sequence[int] | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        flip_prob: float = 0.5,
        enhancing_label: int | None = None,
        reader: str = "nibabel",
        cache: bool | str = True,
        layout: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        check: str = "quick",
        skip_bad_cases: bool = False,
        split_file: str | os.PathLike | None = None,
        rotate_deg: float = 0.0,
        scale_max: float = 1.0,
        elastic_magnitude: float = 0.0,
        elastic_spacing: int = 40,
        deform_prob: float = 1.0,
        intensity_shift: float = 0.0,
        fold: int | None = None,
        num_folds: int = 5,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ConfigError(f"data.root must be a path, got {root!r}")
        self.root = Path(root)
        self.generate = _bool(generate, "generate")
        if self.generate and (num_cases is None or volume_shape is None):
            raise ConfigError("data.num_cases and data.volume_shape must be set when data.generate")
        self.num_cases = None if num_cases is None else _int(num_cases, "num_cases", 2)
        self.volume_shape = None if volume_shape is None else _shape(volume_shape, "volume_shape")
        if self.volume_shape is not None and min(self.volume_shape) < 8:
            raise ConfigError(f"data.volume_shape must be >= 8 per axis, got {list(volume_shape)}")
        self.crop_size = _shape(crop_size, "crop_size")
        self.patch_size = None if patch_size is None else _shape(patch_size, "patch_size")
        if self.patch_size is not None and any(
            p > c for p, c in zip(self.patch_size, self.crop_size)
        ):
            raise ConfigError(
                f"data.patch_size {list(self.patch_size)} must not exceed "
                f"data.crop_size {list(self.crop_size)}"
            )
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise ConfigError(f"data.val_fraction must be a number in (0, 1), got {val_fraction!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction = float(val_fraction)
        self.split_seed = _int(split_seed, "split_seed", 0)
        self.batch_size = _int(batch_size, "batch_size", 1)
        self.num_workers = _int(num_workers, "num_workers", 0)
        self.flip_prob = _float(flip_prob, "flip_prob", 0.0, 1.0)
        self.enhancing_label = (
            None if enhancing_label is None else _int(enhancing_label, "enhancing_label", 3)
        )
        self.reader = _choice(reader, "reader", READERS)
        if isinstance(cache, bool):
            cache = "memory" if cache else "none"
        self.cache = _choice(cache, "cache", CACHE_MODES)
        self.layout = _choice(layout, "layout", ("auto", *LAYOUTS))
        if self.cache == "disk" and not cache_dir:
            raise ConfigError("data.cache_dir must be set when data.cache=disk")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.check = _choice(check, "check", CHECK_MODES)
        self.skip_bad_cases = _bool(skip_bad_cases, "skip_bad_cases")
        self.split_file = Path(split_file) if split_file else None
        self.num_folds = _int(num_folds, "num_folds", 2)
        self.fold = None if fold is None else _int(fold, "fold", 0)
        if self.fold is not None and self.fold >= self.num_folds:
            raise ConfigError(
                f"data.fold must be in 0..{self.num_folds - 1} (data.num_folds), got {self.fold}"
            )
        if self.fold is not None and self.split_file is not None:
            raise ConfigError("data.fold and data.split_file both set: give one of them")
        self.augment = {
            "rotate_deg": _float(rotate_deg, "rotate_deg", 0.0, 180.0),
            "scale_max": _float(scale_max, "scale_max", 1.0),
            "elastic_magnitude": _float(elastic_magnitude, "elastic_magnitude", 0.0),
            "elastic_spacing": _int(elastic_spacing, "elastic_spacing", 2),
            "deform_prob": _float(deform_prob, "deform_prob", 0.0, 1.0),
            "intensity_shift": _float(intensity_shift, "intensity_shift", 0.0),
        }

        self._discovery: Discovery | None = None
        self._split: tuple[list, list] | None = None
        self.skipped: dict[str, list[str]] = {}
        self._train_ds: Any = None
        self._val_ds: Any = None

    # -- discovery, checks, split ------------------------------------------------------------

    def _generate_if_needed(self) -> None:
        if not self.generate:
            return
        if not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir())):
            make_synthetic_brats(self.root, self.num_cases, self.volume_shape)
            return
        # an existing generated dataset must match the config: never train on other data silently
        manifest = read_manifest(self.root)
        if manifest is not None and (manifest.get("num_cases"), manifest.get("shape")) != (
            self.num_cases,
            list(self.volume_shape),
        ):
            raise DataError(
                f"data.root: {self.root} holds a generated dataset of {manifest.get('num_cases')} "
                f"cases of {manifest.get('shape')}, not data.num_cases={self.num_cases}, "
                f"data.volume_shape={list(self.volume_shape)}; delete it or choose another "
                "data.root"
            )

    @property
    def convention(self) -> LabelConvention:
        """The label values of the dataset (its layout's, unless ``enhancing_label`` is set)."""
        convention = self.discovery.layout.convention
        if self.enhancing_label is not None and self.enhancing_label != convention.enhancing:
            convention = LabelConvention(
                f"{convention.name} with enhancing_label={self.enhancing_label}",
                convention.necrotic,
                convention.oedema,
                self.enhancing_label,
            )
        return convention

    @property
    def discovery(self) -> Discovery:
        """The layout and cases found under ``root`` (generating the demo data if needed)."""
        if self._discovery is None:
            self._generate_if_needed()
            self._discovery = discover(self.root, self.layout)
        return self._discovery

    def check_data(self, full: bool | None = None) -> list[Problem]:
        """Check every case's files; see :mod:`revseg.data.checks`.

        Args:
            full: read the voxels too; None: as ``data.check`` says.

        Returns:
            The problems, one per line when printed.
        """
        full = self.check == "full" if full is None else full
        found = self.discovery
        return check_cases(
            found.cases,
            self.convention,
            four_d=found.layout.four_d,
            voxels=full,
            workers=self.num_workers,
        )

    def describe(self) -> str:
        """One line for reports: the layout, the label convention and the number of cases."""
        found = self.discovery
        text = (
            f"layout {found.layout.name}, label convention {self.convention.describe()}, "
            f"{len(found.cases)} cases"
        )
        if found.left_out:
            names = ", ".join(f.name for f in found.left_out)
            count = len(found.left_out)
            text += f", {count} folder(s) holding no file of the layout left out ({names})"
        return text

    def _handle_problems(self, problems: list[Problem]) -> set[str]:
        """Stop on ``problems`` (one line each) or, with ``skip_bad_cases``, record and skip them.

        Returns:
            The ids of the cases to leave out.
        """
        if not problems:
            return set()
        if not self.skip_bad_cases:
            raise DataError(
                format_problems(
                    problems,
                    self.root,
                    "fix these files, or set data.skip_bad_cases=true to leave the cases out",
                )
            )
        for problem in problems:
            log.warning("skipping case %s", problem)
            self.skipped.setdefault(problem.case, []).append(str(problem))
        return {problem.case for problem in problems}

    def _split_cases(self, cases: list) -> tuple[list, list]:
        if self.fold is not None:
            return fold_cases(cases, self.fold, self.num_folds, self.split_seed)
        if self.split_file is None:
            return split_cases(cases, self.val_fraction, self.split_seed)
        train_ids, val_ids = read_split_file(self.split_file)
        by_id = {case.case: case for case in cases}
        unknown = [i for i in train_ids + val_ids if i not in by_id]
        if unknown:
            raise DataError(
                f"data.split_file: {self.split_file} names case {unknown[0]}, not found in "
                f"{self.root} ({len(unknown)} unknown)"
            )
        unused = len(cases) - len(train_ids) - len(val_ids)
        if unused:
            log.info("data.split_file leaves %d of %d cases unused", unused, len(cases))
        return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]

    def _cases(self) -> tuple[list, list]:
        if self._split is None:
            found = self.discovery
            if len(found.cases) < 2 and self.split_file is None:
                raise DataError(
                    f"data.root: {self.root} has {len(found.cases)} case; need at least 2 to "
                    "split into train and validation"
                )
            problems = [
                Problem(c.case, path, f"missing {'segmentation' if w == 'seg' else w} file")
                for c in found.cases
                for w, path in c.missing
            ]
            if self.check != "none":
                problems = self.check_data()
            train, val = self._split_cases(found.cases)
            bad = self._handle_problems(problems)
            self._split = self._without(train, val, bad)
        return self._split

    def _without(self, train: list, val: list, bad: set[str]) -> tuple[list, list]:
        train = [c for c in train if c.case not in bad]
        val = [c for c in val if c.case not in bad]
        if not train or not val:
            raise DataError(
                f"data.root: {len(train)} training and {len(val)} validation cases left in "
                f"{self.root} after skipping {len(self.skipped)} bad case(s); need at least one "
                "each"
            )
        return train, val

    @property
    def train_cases(self) -> list[str]:
        """Ids of the training cases (discovers the cases on first use)."""
        return [c.case for c in self._cases()[0]]

    @property
    def val_cases(self) -> list[str]:
        """Ids of the validation cases (discovers the cases on first use)."""
        return [c.case for c in self._cases()[1]]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(D, H, W)`` of a training sample: ``patch_size`` or ``crop_size``."""
        return self.patch_size or self.crop_size

    def write_split(self, output_dir: str | os.PathLike) -> Path:
        """Write ``split.json``: the train and val case ids (a valid ``data.split_file``), the
        layout, and the skipped cases with their problems."""
        train, val = self._cases()
        content = {
            "root": os.fspath(self.root.resolve()),
            "layout": self.discovery.layout.name,
            "label_convention": self.convention.name,
            "split_seed": self.split_seed,
            "val_fraction": None if self.fold is not None else self.val_fraction,
            "fold": self.fold,
            "num_folds": None if self.fold is None else self.num_folds,
            "split_file": None if self.split_file is None else os.fspath(self.split_file),
            "train": [c.case for c in train],
            "val": [c.case for c in val],
            "skipped": self.skipped,
        }
        # a temporary file of its own per writer: processes writing the split at once do not
        # replace each other's half-written file
        return write_text_atomic(
            json.dumps(content, indent=2) + "\n", Path(output_dir) / "split.json"
        )

    # -- datasets and loaders ----------------------------------------------------------------

    def transform_kwargs(self) -> dict[str, Any]:
        """The deterministic pipeline's settings for this dataset (for prediction too)."""
        convention = self.convention
        return {
            "crop_size": self.crop_size,
            "reader": self.reader,
            "enhancing_label": convention.enhancing,
            "necrotic_label": convention.necrotic,
            "oedema_label": convention.oedema,
            "channel_order": self.discovery.channel_order,
        }

    def _transform(self, train: bool) -> Any:
        return build_transforms(
            train=train,
            patch_size=self.patch_size,
            flip_prob=self.flip_prob,
            cache_dtype=torch.float16 if self.cache == "disk" else None,
            **self.transform_kwargs(),
            **self.augment,
        )

    def _prepare(self, cases: list, train: bool) -> tuple[Any, dict[str, str]]:
        """The dataset of ``cases`` and the errors met while caching them (case id -> message)."""
        items = [case.item() for case in cases]
        transform = self._transform(train)
        if self.cache == "none":
            return Dataset(items, transform), {}
        cached, random_part = split_pipeline(transform)
        errors: dict[str, str] = {}
        if self.cache == "memory":

            def run(item: dict) -> dict | str:
                try:
                    return cached(item)
                except RevsegError as error:
                    return str(error)

            with ThreadPool(max(self.num_workers, 1)) as pool:
                results = pool.map(run, items)
            base: Any = []
            for item, result in zip(items, results):
                if isinstance(result, str):
                    errors[item["case"]] = result
                else:
                    base.append(result)
            return _Transformed(base, random_part), errors
        signature = json.dumps(
            [_CACHE_VERSION, {k: str(v) for k, v in self.transform_kwargs().items()}, "float16"]
        )
        persistent = PersistentDataset(
            items,
            cached,
            cache_dir=self.cache_dir,
            hash_func=partial(_hash_item, signature=signature),
        )
        loader = torch.utils.data.DataLoader(
            _WarmUp(persistent),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_no_collate,
        )
        for item, error in zip(items, loader):
            if error is not None:
                errors[item["case"]] = error
        if errors:
            good = [item for item in items if item["case"] not in errors]
            persistent = PersistentDataset(
                good, cached, cache_dir=self.cache_dir, hash_func=persistent.hash_func
            )
        return _Transformed(persistent, random_part), errors

    def setup(self) -> None:
        """Find (or generate) the cases, check, split and prepare them. Idempotent.

        With a cache, the deterministic part of the pipeline runs here for every case, in
        ``num_workers`` workers; cases it fails on are reported (or skipped) with the others.

        Raises:
            DataError: the dataset is missing or has bad cases (one line per problem).
        """
        if self._train_ds is not None:
            return
        train, val = self._cases()
        if self.cache_dir is not None and self.cache == "disk":
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        train_ds, train_errors = self._prepare(train, train=True)
        val_ds, val_errors = self._prepare(val, train=False)
        errors = {**train_errors, **val_errors}
        if errors:
            problems = [Problem(case, "", message) for case, message in errors.items()]
            bad = self._handle_problems(problems)
            self._split = self._without(train, val, bad)
            if train_errors:
                train_ds, _ = self._prepare(self._split[0], train=True)
            if val_errors:
                val_ds, _ = self._prepare(self._split[1], train=False)
        self._train_ds, self._val_ds = train_ds, val_ds

    def train_dataloader(self, seed: int | None = None, pin_memory: bool = False) -> DataLoader:
        """Shuffled training batches ``{"image": (B, 4, *input_shape), "label": (B, 3, ...),
        "case"}``.

        Args:
            seed: seeds the shuffling and the random transforms (patches, flips) for a
                reproducible epoch order; None uses torch's global RNG.
            pin_memory: batches in page-locked memory (for faster copies to a GPU that trains).
        """
        self.setup()
        return train_loader(self._train_ds, self.batch_size, self.num_workers, seed, pin_memory)

    def val_dataloader(self, pin_memory: bool = False) -> DataLoader:
        """Validation batches of one whole crop: ``(1, 4, *crop_size)``, in case order."""
        self.setup()
        return val_loader(self._val_ds, self.num_workers, pin_memory)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={os.fspath(self.root)!r}, layout={self.layout!r}, "
            f"crop_size={list(self.crop_size)}, "
            f"patch_size={None if self.patch_size is None else list(self.patch_size)}, "
            f"batch_size={self.batch_size}, reader={self.reader!r}, cache={self.cache!r})"
        )
