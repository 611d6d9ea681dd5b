"""The data module of nnU-Net-format datasets: ``data=nnunet data.root=.../DatasetXXX_Name``.

Batches (:class:`NnUNetData`)::

    {"image": (B, C_in, D, H, W) float32,   # one channel per dataset.json channel, normalised
     "label": (B, C_out, D, H, W) float32,  # one-hot labels (background first), or regions
     "case": [B case ids]}

``C_in`` and ``C_out`` come from ``dataset.json`` (:mod:`revseg.data.nnunet`); the model's
``in_channels`` / ``out_channels`` must match (the trainer says which values when they do not).
Label-based datasets train a softmax (``loss=dice_ce``), region-based ones a sigmoid per region
(``loss=dice_bce``), as nnU-Net does.

With ``data.spacing`` (a spacing in mm, or ``median``: the training cases' median, nnU-Net's
default target) every case is resampled to that spacing after normalisation
(:class:`ResampleToSpacingd`: images trilinear, label maps each label's mask linearly and the
largest wins, as nnU-Net resamples segmentations) and the full field of view is taken on the
resampled shapes; validation metrics are then on the resampled grid (HD95 with the target
spacing), and ``revseg-predict`` resamples its probabilities back to each case's own grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from multiprocessing.pool import ThreadPool
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import DataLoader, Dataset
from monai.transforms import (
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandFlipd,
    RandSpatialCropd,
    Resize,
    ResizeWithPadOrCropd,
)

from revseg.data.brats import (
    _Transformed,
    fold_cases,
    read_split_file,
    split_cases,
    train_loader,
    val_loader,
)
from revseg.data.figures import slice_figure
from revseg.data.nnunet import (
    DatasetSpec,
    LabelsToChannelsd,
    NnUNetCase,
    NormalizeChannelsd,
    check_headers,
    ct_statistics,
    find_cases,
    median_spacing,
    read_spec,
    resampled_shape,
)
from revseg.data.synthetic_nnunet import TASKS, make_task
from revseg.data.transforms import SimpleITKReader, _Pipeline, split_pipeline
from revseg.errors import ConfigError, DataError, RevsegError
from revseg.files import write_text_atomic
from revseg.metrics.labels import LabelMetrics
from revseg.validation import positive_ints

__all__ = [
    "NnUNetData",
    "ResampleToSpacingd",
    "build_nnunet_transforms",
    "full_fov_size",
    "resample_label",
    "spacing_option",
]

log = logging.getLogger(__name__)


def spacing_option(value: Any, key: str = "data.spacing") -> tuple[float, ...] | str | None:
    """``data.spacing``: None, ``"median"``, or 3 positive spacings in mm as floats.

    Raises:
        ConfigError: anything else, naming ``key``.
    """
    if value is None or value == "median":
        return value
    shown = repr(value) if isinstance(value, (str, bytes, Real)) else repr(list(value))
    wrong = ConfigError(
        f"{key} must be null, median or 3 positive spacings in mm (x, y, z), got {shown}"
    )
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise wrong
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        raise wrong
    if not all(math.isfinite(v) and v > 0 for v in value):
        raise wrong
    return tuple(float(v) for v in value)


def resample_label(label: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A label map ``(1, X, Y, Z)`` resampled to ``shape``: each value's mask linearly
    (trilinear), the value of the largest weight kept (ties: the smaller value), as nnU-Net
    resamples segmentations; an integer upsampling and back gives the map itself."""
    resize = Resize(tuple(shape), mode="trilinear")
    source = torch.as_tensor(label)
    values = torch.unique(source).tolist()
    out = torch.full((1, *shape), values[0], dtype=source.dtype)
    if len(values) == 1:
        return out
    best = torch.as_tensor(resize((source == values[0]).float()))
    for value in values[1:]:
        weight = torch.as_tensor(resize((source == value).float()))
        wins = weight > best
        out[wins] = value
        best = torch.where(wins, weight, best)
    return out


class ResampleToSpacingd(MapTransform):
    """Resample images and label maps from their own voxel spacing to ``spacing`` mm.

    The new size is :func:`~revseg.data.nnunet.resampled_shape` (the field of view kept);
    images ``(C, X, Y, Z)`` are resampled trilinearly (MONAI's :class:`~monai.transforms.Resize`,
    no anti-aliasing, as nnU-Net), label maps by :func:`resample_label`. The source spacing is
    the ``spacing`` of each array's metadata (the reader's header).

    Args:
        keys: keys of images.
        spacing: the target ``(x, y, z)`` spacing in mm (the arrays' axis order).
        label_keys: keys of label maps ``(1, X, Y, Z)``.
    """

    def __init__(
        self, keys: KeysCollection, spacing: Sequence[float], label_keys: KeysCollection = ()
    ) -> None:
        labels = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        super().__init__([*([keys] if isinstance(keys, str) else keys), *labels])
        self.spacing = tuple(float(v) for v in spacing)
        self.label_keys = set(labels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", {})
            if "spacing" not in meta:
                raise DataError(f"{key}: no voxel spacing in its metadata to resample from")
            spacing = [float(v) for v in np.asarray(meta["spacing"]).ravel()[:3]]
            shape = resampled_shape(d[key].shape[1:], spacing, self.spacing)
            if tuple(shape) == tuple(d[key].shape[1:]):
                continue
            if key in self.label_keys:
                d[key] = resample_label(d[key], shape)
            else:
                d[key] = Resize(shape, mode="trilinear")(d[key])
        return d


def build_nnunet_transforms(
    spec: DatasetSpec,
    ct_stats: dict,
    crop_size: Sequence[int] | None,
    train: bool,
    patch_size: Sequence[int] | None = None,
    flip_prob: float = 0.0,
    with_label: bool = True,
    spacing: Sequence[float] | None = None,
) -> _Pipeline:
    """The pipeline for ``{"image": [paths], "label": path}``: read (SimpleITK: NIfTI, MHA,
    NRRD; a 4D file's volumes are channels), normalise by channel type
    (:class:`~revseg.data.nnunet.NormalizeChannelsd`), resample to ``spacing`` mm when given
    (:class:`ResampleToSpacingd`), centre-crop or pad to ``crop_size``
    (images with 0, labels with background), label -> target channels; for training, a random
    ``patch_size`` patch and flips along each axis with ``flip_prob``; float32."""
    keys = ["image", "label"] if with_label else ["image"]
    steps: list = [
        LoadImaged(keys, reader=SimpleITKReader(), ensure_channel_first=True, image_only=True),
        NormalizeChannelsd("image", ct_stats),
    ]
    if spacing is not None:
        steps.append(ResampleToSpacingd("image", spacing, keys[1:]))
    if crop_size is not None:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=tuple(crop_size)))
    if with_label:
        steps.append(LabelsToChannelsd("label", spec))
    if train:
        if patch_size is not None and tuple(patch_size) != tuple(crop_size or ()):
            steps.append(RandSpatialCropd(keys, roi_size=tuple(patch_size), random_size=False))
        if flip_prob > 0:
            steps += [RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return _Pipeline(steps)


def full_fov_size(shapes: Sequence[Sequence[int]], divisor: int) -> tuple[int, int, int]:
    """The smallest size that holds every shape, each axis a multiple of ``divisor``."""
    largest = np.max(np.asarray(shapes), axis=0)
    return tuple(int(-(-n // divisor) * divisor) for n in largest)  # type: ignore[return-value]


def _optional_shape(value: Any, key: str) -> tuple[int, int, int] | None:
    return None if value is None else positive_ints(value, f"data.{key}", 3)  # type: ignore


class NnUNetData:
    """Data module for a dataset in nnU-Net's raw format (v2) or the Decathlon's (v1).

    Setup reads ``dataset.json`` and checks every case from its headers (channels and label on
    one grid, ``numTraining``, files present) before anything is trained; the label values are
    checked as each case is prepared (all cases at setup with ``cache=memory``). CT channels
    need the dataset's foreground statistics: computed once from the training cases and kept in
    ``cache_dir`` (keyed by the files' sizes and times). With ``spacing``, cases are resampled
    after normalisation and every size (the full FOV, validation metrics) is on that grid.

    Args:
        root: the dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        generate: null, or a generated task of :data:`revseg.data.synthetic_nnunet.TASKS` to
            write at ``root`` when it is missing.
        num_cases: training cases of the generated task.
        crop_size: ``(D, H, W)`` every case is centre-cropped or padded to; null: the full field
            of view, the largest case padded to multiples of ``divisor``.
        divisor: the model's downsampling factor (for ``crop_size: null``).
        patch_size: random training patches; null: the whole crop.
        val_fraction, split_seed, fold, num_folds, split_file: the train/val split, as
            :class:`~revseg.data.brats.BratsData`.
        batch_size: training batch size (validation uses 1).
        num_workers: loader worker processes (and threads preparing the cache).
        flip_prob: flip probability per axis in training.
        cache: ``memory`` (prepared cases kept in memory) or ``none``.
        cache_dir: where the CT statistics are kept; null: computed in every run.
        spacing: null (each case on its own grid), ``(x, y, z)`` in mm (the files' axis order,
            which is the arrays' ``(D, H, W)``), or ``"median"``: the median spacing of every
            training case in ``imagesTr`` (:func:`~revseg.data.nnunet.median_spacing`).

    Raises:
        ConfigError: an invalid argument, naming ``data.<key>``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        generate: str | None = None,
        num_cases: int = 8,
        crop_size: Sequence[int] | None = None,
        divisor: int = 16,
        patch_size: Sequence[int] | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        fold: int | None = None,
        num_folds: int = 5,
        split_file: str | os.PathLike | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        flip_prob: float = 0.5,
        cache: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        spacing: Sequence[float] | str | None = None,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ConfigError(f"data.root must be a path, got {root!r}")
        self.root = Path(root)
        if generate is not None and generate not in TASKS:
            raise ConfigError(f"data.generate must be null or one of {', '.join(TASKS)}")
        self.generate = generate
        self.num_cases = num_cases
        self.crop_size = _optional_shape(crop_size, "crop_size")
        self.spacing = spacing_option(spacing)
        self.divisor = positive_ints([divisor], "data.divisor", 1)[0]
        self.patch_size = _optional_shape(patch_size, "patch_size")
        if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.fold, self.num_folds = fold, num_folds
        self.split_file = Path(split_file) if split_file else None
        self.batch_size = positive_ints([batch_size], "data.batch_size", 1)[0]
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers must be an int >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        if isinstance(flip_prob, bool) or not 0.0 <= float(flip_prob) <= 1.0:
            raise ConfigError(f"data.flip_prob must be in [0, 1], got {flip_prob!r}")
        self.flip_prob = float(flip_prob)
        if cache not in ("memory", "none"):
            raise ConfigError(f"data.cache must be memory or none, got {cache!r}")
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._spec: DatasetSpec | None = None
        self._cases: list[NnUNetCase] | None = None
        self._headers: dict = {}
        self._split: tuple[list[NnUNetCase], list[NnUNetCase]] | None = None
        self._ct_stats: dict | None = None
        self._train_ds: Any = None
        self._val_ds: Any = None

    # -- the dataset ---------------------------------------------------------------------------

    @property
    def spec(self) -> DatasetSpec:
        """``dataset.json``, read and checked (the generated task written first if asked)."""
        if self._spec is None:
            if self.generate is not None and not (self.root / "dataset.json").exists():
                make_task(self.root, self.generate, self.num_cases)
            self._spec = read_spec(self.root)
        return self._spec

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    @property
    def channel_names(self) -> tuple[str, ...]:
        return self.spec.label_names

    def cases(self) -> list[NnUNetCase]:
        """Every training case, its files and geometry checked (headers only)."""
        if self._cases is None:
            cases = find_cases(self.spec)
            self._headers = check_headers(cases, self.spec)
            self._cases = cases
        return self._cases

    def _split_cases(self) -> tuple[list[NnUNetCase], list[NnUNetCase]]:
        if self._split is None:
            cases = self.cases()
            if self.split_file is not None:
                train_ids, val_ids = read_split_file(self.split_file)
                by_id = {c.case: c for c in cases}
                unknown = [i for i in train_ids + val_ids if i not in by_id]
                if unknown:
                    raise DataError(f"data.split_file: case {unknown[0]} is not in {self.root}")
                self._split = [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
            elif self.fold is not None:
                self._split = fold_cases(cases, self.fold, self.num_folds, self.split_seed)
            else:
                if len(cases) < 2:
                    raise DataError(f"data.root: {self.root} has {len(cases)} case; need 2")
                self._split = split_cases(cases, self.val_fraction, self.split_seed)
        return self._split

    @property
    def train_cases(self) -> list[str]:
        return [c.case for c in self._split_cases()[0]]

    @property
    def val_cases(self) -> list[str]:
        return [c.case for c in self._split_cases()[1]]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """A training sample's ``(D, H, W)``: ``patch_size``, ``crop_size`` or the full FOV."""
        return self.patch_size or self.sample_size

    @property
    def sample_size(self) -> tuple[int, int, int]:
        """The size every case is cropped or padded to (``crop_size`` or the full FOV)."""
        if self.crop_size is not None:
            return self.crop_size
        return full_fov_size(self.trained_shapes(), self.divisor)

    @property
    def target_spacing(self) -> tuple[float, float, float] | None:
        """The spacing cases are resampled to (``median`` resolved over every training case),
        or None."""
        if self.spacing == "median":
            self.cases()
            return median_spacing(self._headers.values())
        return self.spacing  # type: ignore[return-value]

    @property
    def headers(self) -> dict[str, Any]:
        """Every training case's :class:`~revseg.data.nnunet.Header` (of its first image), by
        case id: the files' geometry, read and checked once."""
        self.cases()
        return self._headers

    def trained_shapes(self) -> list[tuple[int, int, int]]:
        """Every training case's shape on the grid it is trained on (resampled to
        :attr:`target_spacing` when set)."""
        self.cases()
        target = self.target_spacing
        if target is None:
            return [h.shape for h in self._headers.values()]
        return [resampled_shape(h.shape, h.spacing, target) for h in self._headers.values()]

    # -- intensity statistics ------------------------------------------------------------------

    def _stats_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        stats = [(os.fspath(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns)
                 for c in self._split_cases()[0] for f in (*c.image, c.label)]  # fmt: skip
        key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
        return self.cache_dir / f"nnunet_ct_{self.root.name}_{key}.json"

    @property
    def ct_stats(self) -> dict:
        """The CT channels' statistics over the training cases (empty without a CT channel)."""
        if self._ct_stats is None:
            if not self.spec.ct_channels:
                self._ct_stats = {}
                return self._ct_stats
            path = self._stats_path()
            if path is not None and path.is_file():
                self._ct_stats = json.loads(path.read_text())
            else:
                self._ct_stats = ct_statistics(self._split_cases()[0], self.spec)
                if path is not None:
                    write_text_atomic(json.dumps(self._ct_stats, indent=2) + "\n", path)
            log.info("CT intensity statistics: %s", self._ct_stats)
        return self._ct_stats

    # -- datasets and loaders ------------------------------------------------------------------

    def _transform(self, train: bool) -> _Pipeline:
        return build_nnunet_transforms(
            self.spec,
            self.ct_stats,
            self.sample_size,
            train,
            self.patch_size,
            self.flip_prob,
            spacing=self.target_spacing,
        )

    def _prepare(self, cases: list[NnUNetCase], train: bool) -> Any:
        items = [case.item() for case in cases]
        transform = self._transform(train)
        if self.cache == "none":
            return Dataset(items, transform)
        cached, random_part = split_pipeline(transform)

        def run(item: dict) -> dict | RevsegError:
            try:
                return cached(item)
            except RevsegError as error:
                return error

        with ThreadPool(max(self.num_workers, 1)) as pool:
            results = pool.map(run, items)
        for result in results:
            if isinstance(result, RevsegError):
                raise result
        return _Transformed(results, random_part)

    def setup(self) -> None:
        """Read and check the dataset, split it and prepare every case. Idempotent.

        Raises:
            DataError: a bad ``dataset.json`` or case (one line naming the file or key).
        """
        if self._train_ds is not None:
            return
        train, val = self._split_cases()
        if not train or not val:
            raise DataError(f"data.root: need training and validation cases in {self.root}")
        self._train_ds = self._prepare(train, train=True)
        self._val_ds = self._prepare(val, train=False)

    def train_dataloader(self, seed: int | None = None, pin_memory: bool = False) -> DataLoader:
        self.setup()
        return train_loader(self._train_ds, self.batch_size, self.num_workers, seed, pin_memory)

    def val_dataloader(self, pin_memory: bool = False) -> DataLoader:
        self.setup()
        return val_loader(self._val_ds, self.num_workers, pin_memory)

    # -- what the trainer asks of a data module beyond batches ---------------------------------

    def build_metrics(self, hd95: bool = False) -> LabelMetrics:
        """Dice, IoU (and HD95, in mm: each case's spacing, or the target spacing when cases
        are resampled) per label named as in ``dataset.json``."""
        self.cases()
        target = self.target_spacing
        spacings = [target or self._headers[c.case].spacing for c in self._split_cases()[1]]
        return LabelMetrics(self.spec.foreground_names, self.spec.region_based, hd95, spacings)

    def preview(self, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The labelled figure of the middle slice along the last axis (:func:`slice_figure`):
        the first input channel, the labels and the prediction, one colour per label named as
        in ``dataset.json`` (regions: the innermost)."""
        spec = self.spec
        names, shown = spec.foreground_names, spec.channel_names[0]
        return slice_figure(image, label, pred, names, 0, shown, background=not spec.region_based)

    def write_split(self, output_dir: str | os.PathLike) -> Path:
        """Write ``split.json``: the cases, and what prediction needs of the dataset (its
        ``dataset.json`` reading, the size fed to the network, the CT statistics, the spacing
        cases were resampled to: ``data.spacing`` resolved, or null)."""
        train, val = self._split_cases()
        content = {
            "root": os.fspath(self.root.resolve()),
            "layout": f"nnunet_v{self.spec.version}",
            "split_seed": self.split_seed,
            "fold": self.fold,
            "train": [c.case for c in train],
            "val": [c.case for c in val],
            "skipped": {},
            "dataset": self.spec.to_dict(),
            "sample_size": list(self.sample_size),
            "spacing": None if self.target_spacing is None else list(self.target_spacing),
            "ct_stats": self.ct_stats,
        }
        return write_text_atomic(
            json.dumps(content, indent=2) + "\n", Path(output_dir) / "split.json"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={os.fspath(self.root)!r}, crop_size={self.crop_size}, "
            f"spacing={self.spacing!r})"
        )
