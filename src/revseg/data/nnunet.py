"""Datasets in the nnU-Net raw format (v2) and the Decathlon's (nnU-Net v1) form.

Isensee et al. 2021, "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation" (Nature Methods 18). A dataset folder ``DatasetXXX_Name/`` holds:

* v2: ``dataset.json`` with ``channel_names`` (``{"0": "CT"}``), ``labels`` (``{"background": 0,
  "organ": 1}``, consecutive integers; region-based training gives lists, ``"whole tumor": [1, 2,
  3]``, plus ``regions_class_order``), ``numTraining`` and ``file_ending``; images
  ``imagesTr/{case}_{XXXX}{file_ending}`` (one file per channel), labels
  ``labelsTr/{case}{file_ending}``, optional ``imagesTs/``.
* v1 (the Medical Segmentation Decathlon): ``dataset.json`` with ``modality`` (``{"0": "T2"}``),
  ``labels`` (``{"0": "background", "1": "PZ"}``), ``numTraining`` and ``training`` (``[{"image":
  "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]``); a multi-channel image is one 4D file.

:func:`read_spec` reads and checks ``dataset.json``, :func:`find_cases` the files, and
:func:`check_headers` the geometry of every case from its headers alone; every problem is one
:class:`~revseg.errors.DataError` naming the file or key. Intensities are normalised as nnU-Net
does by channel type (:class:`NormalizeChannelsd`): a ``CT`` channel is clipped to the 0.5 / 99.5
percentiles of the dataset's foreground voxels and z-scored with their mean and std
(:func:`ct_statistics`); any other channel is z-scored per case over its non-zero voxels.
:func:`median_spacing` and :func:`median_shape` give the dataset's planning figures from the
headers (nnU-Net's default target spacing is the median), :func:`resampled_shape` a case's size
at another spacing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from revseg.errors import DataError

__all__ = [
    "CT_SAMPLES_PER_CASE",
    "DatasetSpec",
    "NnUNetCase",
    "NormalizeChannelsd",
    "LabelsToChannelsd",
    "check_headers",
    "ct_statistics",
    "find_cases",
    "find_images",
    "format_values",
    "header",
    "median_shape",
    "median_spacing",
    "read_spec",
    "resampled_shape",
]

CT_SAMPLES_PER_CASE = 10_000
"""Foreground voxels sampled per case and channel for the CT statistics (nnU-Net's number)."""
_TOLERANCE = 1e-3  # spacing (mm), origin (mm) and direction cosines that count as equal


@dataclass(frozen=True)
class DatasetSpec:
    """What ``dataset.json`` says.

    Attributes:
        root: the dataset folder.
        version: 2 (nnU-Net v2) or 1 (Decathlon / nnU-Net v1).
        channel_names: one name per input channel, in file order (``_0000``, ``_0001``, ...).
        label_names: names of the output channels: every label (background first) for
            label-based training, the regions for region-based training.
        label_values: the label value of each of ``label_names`` (label-based), or the values
            each region is made of (region-based).
        region_based: sigmoid channels per region instead of a softmax over the labels.
        regions_class_order: region-based: the label value painted for each region, in order
            (later regions overwrite earlier ones).
        file_ending: e.g. ``.nii.gz``.
        num_training: ``numTraining``.
        training: v1: the ``(image, label)`` paths of the ``training`` list.
    """

    root: Path
    version: int
    channel_names: tuple[str, ...]
    label_names: tuple[str, ...]
    label_values: tuple[Any, ...]
    region_based: bool
    regions_class_order: tuple[int, ...] | None
    file_ending: str
    num_training: int
    training: tuple[tuple[str, str], ...] = ()

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def out_channels(self) -> int:
        return len(self.label_names)

    @property
    def values(self) -> tuple[int, ...]:
        """Every label value a segmentation may hold (0 included), sorted."""
        if not self.region_based:
            return tuple(sorted(self.label_values))
        return tuple(sorted({0, *(v for vs in self.label_values for v in vs)}))

    @property
    def foreground_names(self) -> tuple[str, ...]:
        """The names that are scored: the labels but background, or every region."""
        return self.label_names if self.region_based else self.label_names[1:]

    @property
    def ct_channels(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.channel_names) if n.strip().upper() == "CT")

    def to_dict(self) -> dict[str, Any]:
        """What a run keeps of the dataset (in ``split.json``) to predict in its convention."""
        return {
            "version": self.version,
            "channel_names": list(self.channel_names),
            "label_names": list(self.label_names),
            "label_values": [list(v) if isinstance(v, tuple) else v for v in self.label_values],
            "region_based": self.region_based,
            "regions_class_order": None
            if self.regions_class_order is None
            else list(self.regions_class_order),
            "file_ending": self.file_ending,
        }


def _fail(path: Path, message: str) -> DataError:
    return DataError(f"{path}: {message}")


def _int_key(value: Any, path: Path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return int(str(value))
        except ValueError:
            raise _fail(path, f"{key}: {value!r} is not an integer") from None
    return value


def _contiguous(values: Sequence[int], path: Path, key: str) -> None:
    wanted = list(range(len(set(values))))
    if sorted(set(values)) != wanted or len(set(values)) != len(values):
        shown = ", ".join(str(v) for v in sorted(values))
        raise _fail(
            path,
            f"{key} must be consecutive integers from 0 (background) without repeats, got {shown}",
        )


def _channels(content: dict, key: str, path: Path) -> tuple[str, ...]:
    channels = content[key]
    if not isinstance(channels, dict) or not channels:
        raise _fail(path, f'{key} must be a non-empty object {{"0": "CT", ...}}')
    index = {_int_key(k, path, key): str(v) for k, v in channels.items()}
    if sorted(index) != list(range(len(index))):
        raise _fail(path, f"{key} must be numbered 0, 1, 2, ..., got {', '.join(channels)}")
    return tuple(index[i] for i in range(len(index)))


def _labels_v2(content: dict, path: Path) -> tuple[tuple, tuple, bool, tuple | None]:
    labels = content["labels"]
    if not isinstance(labels, dict) or not labels:
        raise _fail(path, 'labels must be a non-empty object {"background": 0, ...}')
    if "ignore" in labels:
        raise _fail(path, "labels: an 'ignore' label (partial annotation) is not supported")
    region_based = any(isinstance(v, list) for v in labels.values())
    if not region_based:
        values = [_int_key(v, path, f"labels.{k}") for k, v in labels.items()]
        _contiguous(values, path, "labels")
        pairs = sorted(zip(values, labels))
        if pairs[0][0] != 0:
            raise _fail(path, "labels must give background the value 0")
        return tuple(n for _, n in pairs), tuple(v for v, _ in pairs), False, None
    names, regions = [], []
    for name, value in labels.items():
        members = value if isinstance(value, list) else [value]
        members = [_int_key(v, path, f"labels.{name}") for v in members]
        if members == [0]:
            continue  # background
        names.append(name)
        regions.append(tuple(members))
    _contiguous(sorted({0, *(v for r in regions for v in r)}), path, "the labels' values")
    order = content.get("regions_class_order")
    if not isinstance(order, list) or len(order) != len(regions):
        raise _fail(
            path,
            f"regions_class_order must list one label value per region ({len(regions)}: "
            f"{', '.join(names)}) for region-based labels",
        )
    order = tuple(_int_key(v, path, "regions_class_order") for v in order)
    return tuple(names), tuple(regions), True, order


def _labels_v1(content: dict, path: Path) -> tuple[tuple, tuple, bool, None]:
    labels = content["labels"]
    if not isinstance(labels, dict) or not labels:
        raise _fail(path, 'labels must be a non-empty object {"0": "background", ...}')
    index = {_int_key(k, path, "labels"): str(v) for k, v in labels.items()}
    _contiguous(list(index), path, "labels")
    return tuple(index[i] for i in range(len(index))), tuple(range(len(index))), False, None


def _require(content: dict, keys: Sequence[str], path: Path, form: str) -> None:
    for key in keys:
        if key not in content:
            raise _fail(path, f"missing key '{key}' ({form} dataset.json needs {', '.join(keys)})")


def read_spec(root: str | os.PathLike) -> DatasetSpec:
    """Read and check ``<root>/dataset.json`` (v2, or the Decathlon's v1 form).

    Raises:
        DataError: no such file, not JSON, a missing key, labels that are not consecutive from
            0, or a malformed value; the message names the file and the key.
    """
    root = Path(root)
    path = root / "dataset.json"
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder")
    try:
        content = json.loads(path.read_text())
    except OSError:
        raise DataError(f"data.root: {path} not found (an nnU-Net dataset needs one)") from None
    except ValueError as error:
        raise _fail(path, f"not JSON: {error}") from None
    if not isinstance(content, dict):
        raise _fail(path, "must hold a JSON object")
    if "channel_names" in content or "modality" not in content:
        _require(content, ("channel_names", "labels", "numTraining", "file_ending"), path, "a v2")
        channels = _channels(content, "channel_names", path)
        names, values, region_based, order = _labels_v2(content, path)
        ending = content["file_ending"]
        if not isinstance(ending, str) or not ending.startswith("."):
            raise _fail(path, f"file_ending must be like '.nii.gz', got {ending!r}")
        training: tuple = ()
        version = 2
    else:
        _require(content, ("modality", "labels", "numTraining", "training"), path, "a Decathlon")
        channels = _channels(content, "modality", path)
        names, values, region_based, order = _labels_v1(content, path)
        entries = content["training"]
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"image", "label"} <= e.keys() for e in entries
        ):
            raise _fail(path, 'training must be a list of {"image": ..., "label": ...}')
        training = tuple((str(e["image"]), str(e["label"])) for e in entries)
        ending = ".nii.gz"
        version = 1
    num = _int_key(content["numTraining"], path, "numTraining")
    return DatasetSpec(root, version, channels, names, values, region_based, order, ending, num,
                       training)  # fmt: skip


@dataclass(frozen=True)
class NnUNetCase:
    """One case: its id, its image files (one per channel, or one 4D file) and its label file."""

    case: str
    image: tuple[str, ...]
    label: str | None = None

    def item(self) -> dict[str, Any]:
        """The dict the transforms read: ``{"case", "image": [paths], "label": path}``."""
        item: dict[str, Any] = {"case": self.case, "image": list(self.image)}
        if self.label is not None:
            item["label"] = self.label
        return item


_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def find_images(folder: str | os.PathLike, spec: DatasetSpec) -> list[NnUNetCase]:
    """The cases of an images folder (``imagesTr`` / ``imagesTs``), sorted by id.

    v2: ``{case}_{XXXX}{file_ending}``, one file per channel; v1: one (4D) ``{case}.nii.gz``.

    Raises:
        DataError: no file with ``file_ending``, or a case missing a channel (naming the file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    ending = spec.file_ending
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    matching = [n[: -len(ending)] for n in names if n.endswith(ending)]
    if not matching:
        endings = sorted({"." + n.split(".", 1)[1] for n in names if "." in n})
        found = f" (found {', '.join(endings)})" if endings else " (it is empty)"
        raise DataError(f"{folder}: no file ends with file_ending '{ending}'{found}")
    if spec.version == 1:
        return [NnUNetCase(stem, (os.fspath(folder / (stem + ending)),)) for stem in matching]
    channels: dict[str, set[int]] = {}
    for stem in matching:
        parsed = _CHANNEL.match(stem)
        if parsed is None:
            raise DataError(
                f"{folder / (stem + ending)}: not named {{case}}_{{XXXX}}{ending} (XXXX = channel)"
            )
        channels.setdefault(parsed["case"], set()).add(int(parsed["channel"]))
    cases = []
    for case, present in sorted(channels.items()):
        for index, name in enumerate(spec.channel_names):
            if index not in present:
                missing = folder / f"{case}_{index:04d}{ending}"
                raise DataError(f"{missing}: missing (channel {index}, '{name}', of case {case})")
        extra = sorted(present - set(range(spec.in_channels)))
        if extra:
            raise DataError(
                f"{folder / f'{case}_{extra[0]:04d}{ending}'}: channel {extra[0]} is not in "
                f"channel_names of dataset.json ({spec.in_channels} channels)"
            )
        files = tuple(
            os.fspath(folder / f"{case}_{i:04d}{ending}") for i in range(spec.in_channels)
        )
        cases.append(NnUNetCase(case, files))
    return cases


def find_cases(spec: DatasetSpec) -> list[NnUNetCase]:
    """The training cases with their labels, checked against ``numTraining``.

    Raises:
        DataError: as :func:`find_images`; a missing label file; ``numTraining`` not the
            number of cases found.
    """
    root = spec.root
    if spec.version == 1:
        cases = []
        for image, label in spec.training:
            image_path, label_path = root / image, root / label
            for path in (image_path, label_path):
                if not path.is_file():
                    raise DataError(f"{path}: missing (listed in {root / 'dataset.json'} training)")
            stem = image_path.name.removesuffix(".nii.gz").removesuffix(".nii")
            cases.append(NnUNetCase(stem, (os.fspath(image_path),), os.fspath(label_path)))
        cases.sort(key=lambda c: c.case)
    else:
        cases = []
        for case in find_images(root / "imagesTr", spec):
            label = root / "labelsTr" / f"{case.case}{spec.file_ending}"
            if not label.is_file():
                raise DataError(f"{label}: missing (the label of case {case.case})")
            cases.append(NnUNetCase(case.case, case.image, os.fspath(label)))
    if len(cases) != spec.num_training:
        raise DataError(
            f"{root / 'dataset.json'}: numTraining is {spec.num_training} but "
            f"{len(cases)} training cases were found"
        )
    return cases


@dataclass(frozen=True)
class Header:
    """The geometry of an image file, in SimpleITK's ``(x, y, z)`` order."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int  # volumes of a 4D file (or vector components), else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.size[:3]  # type: ignore[return-value]


def header(path: str | os.PathLike) -> Header:
    """Read the geometry of an image file without its voxels.

    Raises:
        DataError: the file cannot be read.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        raise DataError(f"{path}: cannot read: {reason}") from None
    if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise DataError(f"{path}: complex voxels: store real intensities (e.g. the magnitude)")
    dim = reader.GetDimension()
    size = tuple(reader.GetSize())
    if dim < 3:
        raise DataError(f"{path}: a {dim}D image; revseg reads 3D volumes")
    spatial = min(dim, 3)
    direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[:spatial, :spatial]
    components = reader.GetNumberOfComponents() * (size[3] if dim > 3 else 1)
    return Header(
        size[:3],
        tuple(reader.GetSpacing()[:spatial]),
        tuple(reader.GetOrigin()[:spatial]),
        tuple(direction.ravel().tolist()),
        components,
    )


def _differs(a: Sequence[float], b: Sequence[float]) -> bool:
    return not np.allclose(a, b, rtol=0.0, atol=_TOLERANCE)


def format_values(values: Sequence[float]) -> str:
    """A shape, spacing or origin as messages and reports write it: ``0.8x0.8x5``."""
    return "x".join(f"{v:g}" for v in values)


def check_headers(cases: Sequence[NnUNetCase], spec: DatasetSpec) -> dict[str, Header]:
    """Check that the channels and the label of each case share one grid.

    Returns:
        Each case's header (of its first image file).

    Raises:
        DataError: a file that cannot be read; a 4D image without one volume per channel; a
            channel or label whose shape, spacing, origin or orientation differs from the
            case's first image (naming both files).
    """
    out = {}
    for case in cases:
        files = [*case.image, *([case.label] if case.label else [])]
        first = header(files[0])
        if spec.version == 1 and first.components != spec.in_channels:
            raise DataError(
                f"{files[0]}: {first.components} volume(s), dataset.json's modality names "
                f"{spec.in_channels}"
            )
        for other in files[1:]:
            h = header(other)
            for what, a, b, fmt in (
                ("shape", h.shape, first.shape, format_values),
                ("spacing", h.spacing, first.spacing, format_values),
                ("origin", h.origin, first.origin, format_values),
                ("orientation", h.direction, first.direction, format_values),
            ):
                if (a != b) if what == "shape" else _differs(a, b):
                    raise DataError(f"{other}: {what} {fmt(a)} differs from {files[0]} {fmt(b)}")
        out[case.case] = first
    return out


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, int, int]:
    """The size of a ``shape`` grid of voxels ``spacing`` mm resampled to ``target`` mm:
    ``shape * spacing / target`` rounded half up per axis (nnU-Net's rule), at least 1.

    The field of view is kept: the voxels are ``shape * spacing / new shape`` mm, ``target``
    up to that rounding (0.8 x 0.8 x 5 mm, 40 x 40 x 12 to 0.8 x 0.8 x 2.5: 40 x 40 x 24).
    """
    ratio = np.asarray(shape[:3], np.float64) * np.asarray(spacing[:3]) / np.asarray(target[:3])
    return tuple(max(1, int(np.floor(r + 0.5))) for r in ratio)  # type: ignore[return-value]


def median_spacing(headers: Iterable[Header]) -> tuple[float, float, float]:
    """The dataset's median voxel spacing in mm per axis (nnU-Net's default target spacing).

    Args:
        headers: one per case, e.g. the values of :func:`check_headers` over every training case.

    Returns:
        ``(x, y, z)`` in the files' order (SimpleITK's ``GetSpacing``), which is the arrays'
        axis order in revseg (``(C, x, y, z)``).

    Raises:
        DataError: no header.
    """
    spacings = np.asarray([h.spacing[:3] for h in headers], np.float64)
    if not len(spacings):
        raise DataError("no case to take the median spacing of")
    return tuple(float(v) for v in np.median(spacings, axis=0))  # type: ignore[return-value]


def median_shape(
    headers: Iterable[Header], spacing: Sequence[float] | None = None
) -> tuple[int, int, int]:
    """The dataset's median shape in voxels per axis (``(x, y, z)``, as :func:`median_spacing`),
    of the cases resampled to ``spacing`` mm when given (:func:`resampled_shape`), rounded half
    up.

    Raises:
        DataError: no header.
    """
    headers = list(headers)
    if not headers:
        raise DataError("no case to take the median shape of")
    shapes = [
        h.shape if spacing is None else resampled_shape(h.shape, h.spacing, spacing)
        for h in headers
    ]
    median = np.median(np.asarray(shapes, np.float64), axis=0)
    return tuple(int(np.floor(v + 0.5)) for v in median)  # type: ignore[return-value]


def _read_array(path: str) -> np.ndarray:
    """``(C, x, y, z)`` float32 (a 3D file: C = 1) in the readers' ``(x, y, z)`` order."""
    image = sitk.ReadImage(path)
    array = sitk.GetArrayFromImage(image).T  # (x, y, z[, t])
    if array.ndim == 3:
        return array[None].astype(np.float32)
    return np.moveaxis(array, -1, 0).astype(np.float32)


def ct_statistics(
    cases: Sequence[NnUNetCase], spec: DatasetSpec, seed: int = 1234
) -> dict[str, dict[str, float]]:
    """nnU-Net's intensity statistics of the CT channels over the cases' foreground voxels.

    From each case and CT channel, :data:`CT_SAMPLES_PER_CASE` voxels are drawn (with
    replacement) where the label is not 0; the pooled samples give the 0.5 and 99.5 percentiles,
    mean and std.

    Returns:
        ``{str(channel): {"mean", "std", "percentile_00_5", "percentile_99_5"}}``.

    Raises:
        DataError: no foreground voxel in any case.
    """
    rng = np.random.default_rng(seed)
    samples: dict[int, list[np.ndarray]] = {c: [] for c in spec.ct_channels}
    for case in cases:
        label = _read_array(case.label)[0] if case.label else None
        if label is None:
            continue
        foreground = label > 0
        if not foreground.any():
            continue
        volumes = (
            _read_array(case.image[0])
            if spec.version == 1
            else np.concatenate([_read_array(f) for f in case.image])
        )
        for channel in spec.ct_channels:
            values = volumes[channel][foreground]
            samples[channel].append(rng.choice(values, CT_SAMPLES_PER_CASE, replace=True))
    out = {}
    for channel, parts in samples.items():
        if not parts:
            raise DataError(f"{spec.root}: no foreground voxel in any case for the CT statistics")
        pooled = np.concatenate(parts).astype(np.float64)
        out[str(channel)] = {
            "mean": float(pooled.mean()),
            "std": float(pooled.std()),
            "percentile_00_5": float(np.percentile(pooled, 0.5)),
            "percentile_99_5": float(np.percentile(pooled, 99.5)),
        }
    return out


class NormalizeChannelsd(MapTransform):
    """Normalise each channel as nnU-Net does for its type.

    A channel with CT statistics is clipped to ``[percentile_00_5, percentile_99_5]`` and
    z-scored with the dataset's foreground ``mean`` and ``std``; every other channel is z-scored
    over its non-zero voxels (all voxels where none is zero is the same), zeros kept at 0.

    Args:
        keys: keys of ``(C, ...)`` images.
        ct_stats: ``{str(channel): {"mean", "std", "percentile_00_5", "percentile_99_5"}}``.

    Raises:
        DataError: a channel with NaN/Inf voxels (naming the file).
    """

    def __init__(self, keys: KeysCollection, ct_stats: Mapping[str, Mapping[str, float]]) -> None:
        super().__init__(keys)
        self.ct_stats = {int(k): dict(v) for k, v in ct_stats.items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float().clone()
            if not bool(torch.isfinite(image).all()):
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise DataError(f"{source}: NaN/Inf voxels")
            for channel in range(image.shape[0]):
                x = image[channel]
                stats = self.ct_stats.get(channel)
                if stats is not None:
                    x.clamp_(stats["percentile_00_5"], stats["percentile_99_5"])
                    x.sub_(stats["mean"]).div_(max(stats["std"], 1e-8))
                    continue
                mask = x != 0
                if not bool(mask.any()):
                    continue
                values = x[mask]
                std = float(values.std()) if values.numel() > 1 else 0.0
                x[mask] = (values - values.mean()) / max(std, 1e-8)
            d[key] = image
        return d


class LabelsToChannelsd(MapTransform):
    """Label map ``(1, ...)`` -> the network's target channels ``(C, ...)`` uint8.

    Label-based: one channel per label, background first (a one-hot map, for a softmax);
    region-based: one channel per region, 1 where the label is any of the region's values.

    Raises:
        DataError: a label value that ``dataset.json`` does not list (naming the file).
    """

    def __init__(self, keys: KeysCollection, spec: DatasetSpec) -> None:
        super().__init__(keys)
        self.values = spec.values
        self.region_based = spec.region_based
        self.channels = spec.label_values

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
            label = torch.round(torch.as_tensor(d[key])[0].float()).long()
            found = torch.unique(label).tolist()
            unknown = [v for v in found if v not in self.values]
            if unknown:
                shown = ", ".join(str(v) for v in unknown[:5])
                allowed = ", ".join(str(v) for v in self.values)
                raise DataError(f"{source}: label values {shown} not in dataset.json ({allowed})")
            if self.region_based:
                masks = [torch.isin(label, torch.tensor(v)) for v in self.channels]
            else:
                masks = [label == v for v in self.channels]
            d[key] = torch.stack(masks).to(torch.uint8)
        return d
