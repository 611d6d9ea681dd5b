"""BraTS brain-tumour data: finding the cases on disk, the train/val split, the data module.

The data module :class:`BratsData` is what ``configs/data/*.yaml`` instantiate. It yields batches
of four MRI modalities and the three overlapping tumour regions of the BraTS challenge (Menze et
al. 2015; Bakas et al. 2018)::

    {"image": (B, 4, D, H, W) float32,   # t1, t1ce, t2, flair; z-scored inside the brain
     "label": (B, 3, D, H, W) float32,   # WT, TC, ET in {0, 1}
     "case": [B case ids]}

Layouts: a layout is a small pair of functions (does ``root`` look like it? list its cases) in
:data:`LAYOUTS`, tried in order. Only the BraTS 2021 layout (also used by BraTS 2020) is
implemented::

    root/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz     (or .nii)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset

from revseg.data.synthetic import make_synthetic_brats, read_manifest
from revseg.data.transforms import READERS, build_transforms
from revseg.errors import ConfigError, DataError

__all__ = ["LAYOUTS", "MODALITIES", "BratsData", "Layout", "find_cases", "split_cases"]

MODALITIES = ("t1", "t1ce", "t2", "flair")
"""Channel order of the image, by modality name (never by file order)."""

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """A dataset layout, e.g. BraTS 2021.

    ``detect(root)`` says whether ``root`` looks like this layout; ``find(root, require_label)``
    lists its cases as ``{"case", "image", "label"}`` dicts, raising :class:`DataError` for a
    malformed case. A new layout is one more entry in :data:`LAYOUTS`.
    """

    name: str
    detect: Callable[[Path], bool]
    find: Callable[[Path, bool], list[dict]]


def _nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists (an error if both)."""
    found = [folder / f"{stem}{suffix}" for suffix in _NIFTI_SUFFIXES]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise DataError(
            f"data.root: case folder {folder} has both {found[0].name} and {found[1].name}"
        )
    return found[0] if found else None


def _is_case_2021(folder: Path) -> bool:
    if not folder.is_dir() or folder.name.startswith("."):
        return False
    return any(
        _nifti(folder, f"{folder.name}_{modality}") is not None for modality in (*MODALITIES, "seg")
    )


def _detect_2021(root: Path) -> bool:
    return any(_is_case_2021(folder) for folder in root.iterdir())


def _find_2021(root: Path, require_label: bool) -> list[dict]:
    cases = []
    for folder in sorted(f for f in root.iterdir() if _is_case_2021(f)):
        case = folder.name
        paths = {}
        for modality in (*MODALITIES, "seg"):
            path = _nifti(folder, f"{case}_{modality}")
            if path is None and (modality != "seg" or require_label):
                raise DataError(
                    f"data.root: case folder {folder} is missing {case}_{modality}.nii.gz"
                )
            paths[modality] = path
        cases.append(
            {
                "case": case,
                "image": [os.fspath(paths[m]) for m in MODALITIES],
                "label": None if paths["seg"] is None else os.fspath(paths["seg"]),
            }
        )
    return cases


LAYOUTS: tuple[Layout, ...] = (Layout("brats2021", _detect_2021, _find_2021),)
"""Known layouts, tried in order by :func:`find_cases`."""


def find_cases(root: str | os.PathLike, require_label: bool = True) -> list[dict]:
    """List the cases of a BraTS dataset, detecting its layout.

    Args:
        root: dataset folder.
        require_label: a case without a segmentation is an error; if False its ``label`` is None.

    Returns:
        ``[{"case": id, "image": [t1, t1ce, t2, flair paths], "label": seg path}, ...]`` sorted by
        case id.

    Raises:
        DataError: ``root`` is missing, holds no case folder, or a case lacks a file (the message
            names the folder and the file).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data.root: directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"data.root: not a directory: {root}")
    for layout in LAYOUTS:
        if layout.detect(root):
            cases = layout.find(root, require_label)
            return sorted(cases, key=lambda c: c["case"])
    raise DataError(
        f"data.root: no case folders found in {root} (expected "
        f"<case>/<case>_{{{','.join(MODALITIES)},seg}}.nii.gz as in BraTS 2021)"
    )


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


def _shape(value: Any, key: str) -> tuple[int, int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ConfigError(f"data.{key} must be 3 positive ints, got {value!r}")
    if not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ConfigError(f"data.{key} must be 3 positive ints, got {list(value)!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"data.{key} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"data.{key} must be true or false, got {value!r}")
    return value


class BratsData:
    """Data module for BraTS-layout datasets (or the generated demo dataset).

    Volumes are cropped to the brain's bounding box, then centre-cropped or padded to
    ``crop_size``; training takes random ``patch_size`` patches (or the whole crop) with random
    flips. See :func:`revseg.data.transforms.build_transforms`.

    Args:
        root: dataset folder, BraTS 2021 layout.
        generate: if ``root`` is missing, generate the synthetic demo dataset there (demo only).
        num_cases: number of generated cases (``generate`` only; may be None otherwise).
        volume_shape: shape of the generated volumes (``generate`` only; may be None otherwise).
        crop_size: ``(D, H, W)`` fed to the network for validation, and in training when
            ``patch_size`` is None.
        patch_size: random training patch ``(D, H, W)``, each <= ``crop_size``; None: whole crop.
        val_fraction: fraction of the cases for validation, in (0, 1).
        split_seed: seed of the train/val split.
        batch_size: training batch size (validation uses 1).
        num_workers: data loader worker processes.
        flip_prob: flip probability per axis in training; 0 disables flips.
        enhancing_label: label of the enhancing tumour: 4 for BraTS 2018-2021, 3 from 2023.
        reader: ``"nibabel"`` or ``"simpleitk"``.
        cache: cache the deterministic part of the pipeline in memory (MONAI ``CacheDataset``);
            about 4 bytes x 4.75 channels per voxel of ``crop_size`` per case.

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
        enhancing_label: int = 4,
        reader: str = "nibabel",
        cache: bool = True,
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
        if (
            isinstance(flip_prob, bool)
            or not isinstance(flip_prob, (int, float))
            or not 0.0 <= flip_prob <= 1.0
        ):
            raise ConfigError(f"data.flip_prob must be in [0, 1], got {flip_prob!r}")
        self.flip_prob = float(flip_prob)
        self.enhancing_label = _int(enhancing_label, "enhancing_label", 3)
        if reader not in READERS:
            raise ConfigError(f"data.reader must be one of {', '.join(READERS)}, got {reader!r}")
        self.reader = reader
        self.cache = _bool(cache, "cache")

        self._split: tuple[list[dict], list[dict]] | None = None
        self._train_ds: Dataset | None = None
        self._val_ds: Dataset | None = None

    # -- discovery -------------------------------------------------------------------------

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
                f"data.volume_shape={list(self.volume_shape)}; delete it or choose another data.root"
            )

    def _cases(self) -> tuple[list[dict], list[dict]]:
        if self._split is None:
            self._generate_if_needed()
            cases = find_cases(self.root)
            if len(cases) < 2:
                raise DataError(
                    f"data.root: {self.root} has {len(cases)} case; need at least 2 to split "
                    "into train and validation"
                )
            self._split = split_cases(cases, self.val_fraction, self.split_seed)
        return self._split

    @property
    def train_cases(self) -> list[str]:
        """Ids of the training cases (discovers the cases on first use)."""
        return [c["case"] for c in self._cases()[0]]

    @property
    def val_cases(self) -> list[str]:
        """Ids of the validation cases (discovers the cases on first use)."""
        return [c["case"] for c in self._cases()[1]]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(D, H, W)`` of a training sample: ``patch_size`` or ``crop_size``."""
        return self.patch_size or self.crop_size

    # -- datasets and loaders --------------------------------------------------------------

    def _dataset(self, cases: list[dict], train: bool) -> Dataset:
        transform = build_transforms(
            train=train,
            crop_size=self.crop_size,
            patch_size=self.patch_size,
            flip_prob=self.flip_prob,
            enhancing_label=self.enhancing_label,
            reader=self.reader,
        )
        if self.cache:
            return CacheDataset(
                cases, transform, num_workers=max(self.num_workers, 1), progress=False
            )
        return Dataset(cases, transform)

    def setup(self) -> None:
        """Find (or generate) the cases, split them and build the datasets. Idempotent.

        With ``cache`` the deterministic part of the pipeline runs here for every case.

        Raises:
            DataError: the dataset is missing or malformed.
        """
        if self._train_ds is not None:
            return
        train, val = self._cases()
        self._train_ds = self._dataset(train, train=True)
        self._val_ds = self._dataset(val, train=False)

    def train_dataloader(self, seed: int | None = None) -> DataLoader:
        """Shuffled training batches ``{"image": (B, 4, *input_shape), "label": (B, 3, ...), "case"}``.

        Args:
            seed: seeds the shuffling and the random transforms (patches, flips) for a
                reproducible epoch order; None uses torch's global RNG.
        """
        self.setup()
        generator = None
        if seed is not None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        return DataLoader(
            self._train_ds,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=generator,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches of one whole crop: ``(1, 4, *crop_size)``, in case order."""
        self.setup()
        return DataLoader(
            self._val_ds,
            batch_size=1,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={os.fspath(self.root)!r}, crop_size={list(self.crop_size)}, "
            f"patch_size={None if self.patch_size is None else list(self.patch_size)}, "
            f"batch_size={self.batch_size}, reader={self.reader!r}, cache={self.cache})"
        )
