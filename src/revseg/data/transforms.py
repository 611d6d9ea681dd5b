"""MONAI transforms for BraTS-style volumes: reading, label regions, normalisation, crops.

The pipeline of :func:`build_transforms` follows Brügger et al. (2019), "A partially reversible
U-Net for memory-efficient volumetric image segmentation": four modalities stacked channel-first,
z-score per channel over the non-zero (brain) voxels, the brain's bounding box centre-cropped or
padded to a fixed size (the full field of view, 160x192x160 on BraTS), optional random patches and
the paper's in-plane augmentation for training (rotation, scaling, elastic deformation, flips,
intensity shift), and the label turned into the overlapping regions WT, TC, ET in the label
convention of each dataset.

Both readers, nibabel and SimpleITK, return arrays indexed ``(x, y, z)`` in the file's voxel order
with an RAS affine, so the two give identical tensors.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import is_supported_format, orientation_ras_lps
from monai.transforms import (
    CastToTyped,
    Compose,
    CopyItemsd,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Rand2DElasticd,
    RandFlipd,
    Randomizable,
    RandomizableTransform,
    RandShiftIntensityd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
)
from monai.utils import ensure_tuple

from revseg.data.layouts import REGIONS
from revseg.errors import ConfigError, DataError, RevsegError

__all__ = [
    "READERS",
    "REGIONS",
    "CheckImaged",
    "CheckedNibabelReader",
    "LabelToRegionsd",
    "RandInPlaneDeformd",
    "ReorderChannelsd",
    "SimpleITKReader",
    "build_transforms",
    "split_pipeline",
    "label_to_regions",
    "make_reader",
    "regions_to_label",
]

READERS = ("nibabel", "simpleitk")
"""Names accepted by ``data.reader``."""


ArrayLike = np.ndarray | torch.Tensor
PathOrPaths = Sequence[os.PathLike | str] | os.PathLike | str
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


def _check_nifti_complete(path: str) -> None:
    """Raise :class:`DataError` if a NIfTI file holds fewer bytes than its header says.

    SimpleITK (2.5) reads a truncated ``.nii`` or ``.nii.gz`` without an error, padding it. The
    check reads the header and, for ``.nii.gz``, the gzip trailer (the uncompressed size); only
    when that does not match does it decompress the whole file.
    """
    try:
        header = nib.load(path).header
        expected = int(header.get_data_offset()) + int(
            np.prod(header.get_data_shape()) * header.get_data_dtype().itemsize
        )
        if not path.endswith(".gz"):
            size = os.path.getsize(path)
        else:
            with open(path, "rb") as file:
                file.seek(-4, os.SEEK_END)
                if int.from_bytes(file.read(4), "little") == expected % 2**32:
                    return
            size = 0
            with gzip.open(path, "rb") as file:
                while chunk := file.read(1 << 22):
                    size += len(chunk)
    except _READ_ERRORS as error:
        raise DataError(f"{path}: cannot read: {_one_line(error)}") from None
    if size < expected:
        raise DataError(f"{path}: truncated, {size} bytes of the {expected} its header needs")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _file_names(data: Any) -> tuple[str, ...]:
    return tuple(os.fspath(name) for name in ensure_tuple(data))


class CheckedNibabelReader(NibabelReader):
    """MONAI's :class:`~monai.data.NibabelReader`, with unreadable files reported as one line.

    Reading is deferred from ``read`` to ``get_data``: an error in ``read`` makes MONAI's
    ``LoadImage`` silently try other readers, while an error in ``get_data`` reaches the user, as
    a :class:`DataError` naming the file.
    """

    def read(self, data: PathOrPaths, **kwargs: Any) -> tuple[str, ...]:
        """Return the file names; they are read by :meth:`get_data`."""
        return _file_names(data)

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """Read the files and return ``(array, meta)`` as ``NibabelReader.get_data`` does.

        Raises:
            DataError: a file cannot be read (missing, not NIfTI, truncated).
        """
        names = _file_names(img)
        try:
            return super().get_data(super().read(names))
        except _READ_ERRORS as error:
            for name in names if len(names) > 1 else ():  # find the culprit (error path only)
                try:
                    np.asanyarray(nib.load(name).dataobj)
                except _READ_ERRORS as culprit:
                    raise DataError(f"{name}: cannot read: {_one_line(culprit)}") from None
            raise DataError(f"{', '.join(names)}: cannot read: {_one_line(error)}") from None


class SimpleITKReader(ImageReader):
    """Read images with SimpleITK, laid out like MONAI's :class:`~monai.data.NibabelReader`.

    ``sitk.GetArrayFromImage`` returns ``(z, y, x)``; the array is transposed to ``(x, y, z)`` and
    the LPS affine of ITK converted to RAS, so a NIfTI file gives the same array and affine as
    with nibabel. A list of files is stacked on a new first (channel) axis. MONAI's own
    ``ITKReader`` needs the ``itk`` package; this reader only needs ``SimpleITK``.

    Args:
        channel_dim: channel axis of a single file, as in ``NibabelReader``; None: no channel
            axis for scalar images, last axis for vector images.
    """

    suffixes = ("nii", "nii.gz", "nrrd", "mha", "mhd")

    def __init__(self, channel_dim: str | int | None = None) -> None:
        super().__init__()
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """Whether every file of ``filename`` has a suffix SimpleITK reads (NIfTI, NRRD, MHA)."""
        return is_supported_format(filename, self.suffixes)

    def read(self, data: PathOrPaths, **kwargs: Any) -> tuple[str, ...]:
        """Return the file names; they are read by :meth:`get_data` (see
        :class:`CheckedNibabelReader` for why)."""
        return _file_names(data)

    @staticmethod
    def _read_file(name: str) -> sitk.Image:
        if name.endswith((".nii", ".nii.gz")):
            _check_nifti_complete(name)
        try:
            return sitk.ReadImage(name)
        except RuntimeError as error:  # SimpleITK's message: "... \nsitk::ERROR: <reason>"
            reason = str(error).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
            raise DataError(f"{name}: cannot read: {reason}") from None

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """Return ``(array, meta)``: ``(C, X, Y, Z)`` for a list, ``(X, Y, Z)`` for one image.

        Args:
            img: file name(s) from :meth:`read`, or ``sitk.Image`` object(s).

        ``meta`` holds ``affine`` and ``original_affine`` (RAS), ``spatial_shape``, ``spacing``,
        ``space`` and ``original_channel_dim``.

        Raises:
            DataError: a file cannot be read, or a NIfTI file is truncated.
        """
        arrays: list[np.ndarray] = []
        meta: dict = {}
        for item in img if isinstance(img, (list, tuple)) else [img]:
            image = item if isinstance(item, sitk.Image) else self._read_file(os.fspath(item))
            array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, components)
            if image.GetNumberOfComponentsPerPixel() == 1:
                array = array.T
            else:
                array = np.moveaxis(array.T, 0, -1)
            arrays.append(array)
            header: dict = {
                "affine": self._affine(image),
                "original_affine": self._affine(image),
                "spacing": np.asarray(image.GetSpacing()),
                "spatial_shape": np.asarray(image.GetSize()[:3]),
                "space": "RAS",
            }
            if self.channel_dim is None:
                header["original_channel_dim"] = (
                    float("nan") if array.ndim == len(header["spatial_shape"]) else -1
                )
            else:
                header["original_channel_dim"] = self.channel_dim
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta

    @staticmethod
    def _affine(image: sitk.Image) -> np.ndarray:
        ndim = min(image.GetDimension(), 3)
        direction = np.asarray(image.GetDirection()).reshape(image.GetDimension(), -1)
        affine = np.eye(ndim + 1)
        affine[:ndim, :ndim] = direction[:ndim, :ndim] @ np.diag(image.GetSpacing()[:ndim])
        affine[:ndim, -1] = image.GetOrigin()[:ndim]
        return orientation_ras_lps(affine)


def make_reader(name: str) -> ImageReader:
    """Return the MONAI image reader for ``data.reader`` (``"nibabel"`` or ``"simpleitk"``).

    Raises:
        ConfigError: unknown name.
    """
    if name == "nibabel":
        return CheckedNibabelReader()
    if name == "simpleitk":
        return SimpleITKReader()
    raise ConfigError(f"data.reader must be one of {', '.join(READERS)}, got {name!r}")


def _label_source(label: ArrayLike) -> str:
    meta = getattr(label, "meta", None) or {}
    return str(meta.get("filename_or_obj", "label"))


def label_to_regions(
    label: ArrayLike, enhancing_label: int = 4, necrotic_label: int = 1, oedema_label: int = 2
) -> ArrayLike:
    """Turn a BraTS label map into the three overlapping regions.

    WT = ``label != 0``, TC = ``label in {necrotic_label, enhancing_label}``,
    ET = ``label == enhancing_label``. The defaults are BraTS 2018-2021 (0/1/2/4); BraTS 2023+
    has ``enhancing_label=3``; the Decathlon (MSD) ``necrotic_label=2, oedema_label=1,
    enhancing_label=3`` (see :mod:`revseg.data.layouts`).

    Args:
        label: ``(1, D, H, W)`` or ``(D, H, W)`` label map, numpy or torch, values in
            ``{0, necrotic_label, oedema_label, enhancing_label}``.
        enhancing_label: label of the enhancing tumour.
        necrotic_label: label of the necrotic / non-enhancing tumour core.
        oedema_label: label of the oedema.

    Returns:
        ``(3, D, H, W)`` uint8 regions in the order WT, TC, ET, of the input's type (a MONAI
        ``MetaTensor`` keeps its metadata).

    Raises:
        DataError: the label map holds other values; the message names the file.
    """
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    if label.ndim != 3:
        raise ValueError(f"label must be (1, D, H, W) or (D, H, W), got shape {tuple(label.shape)}")
    codes = (0, necrotic_label, oedema_label, enhancing_label)
    background, necrotic, oedema, enhancing = (label == v for v in codes)
    known = background | necrotic | oedema | enhancing
    if not bool(known.all()):
        values = label[~known]
        unique = sorted(
            {float(v) for v in (values.unique() if torch.is_tensor(values) else np.unique(values))}
        )
        shown = ", ".join(f"{v:g}" for v in unique[:5])
        allowed = "/".join(str(v) for v in sorted(codes))
        raise DataError(
            f"{_label_source(label)}: label values {shown} not in {allowed} (the convention of "
            f"data.layout; BraTS 2018-2021: 0/1/2/4, 2023+: 0/1/2/3, MSD: 0/1/2/3 with 1 = oedema)"
        )
    regions = [~background, necrotic | enhancing, enhancing]
    if torch.is_tensor(label):
        return torch.stack(regions).to(torch.uint8)
    return np.stack(regions).astype(np.uint8)


def regions_to_label(
    regions: ArrayLike, enhancing_label: int = 4, necrotic_label: int = 1, oedema_label: int = 2
) -> ArrayLike:
    """Inverse of :func:`label_to_regions`: regions to a label map in a dataset's convention.

    ET -> ``enhancing_label``, TC \\ ET -> ``necrotic_label``, WT \\ TC -> ``oedema_label``,
    elsewhere 0. A voxel in an inner region but not in the outer one (e.g. ET outside WT in a
    prediction) takes the inner label.

    Args:
        regions: ``(3, D, H, W)`` in the order WT, TC, ET; bool, or numbers where non-zero means
            inside (threshold probabilities first). Numpy or torch.
        enhancing_label: label written for ET (4 for BraTS 2018-2021, 3 from 2023 and in MSD).
        necrotic_label: label written for TC \\ ET (1; 2 in MSD).
        oedema_label: label written for WT \\ TC (2; 1 in MSD).

    Returns:
        ``(D, H, W)`` uint8 label map of the input's type.
    """
    if regions.ndim != 4 or regions.shape[0] != 3:
        raise ValueError(f"regions must be (3, D, H, W), got shape {tuple(regions.shape)}")
    wt, tc, et = (regions[i] != 0 for i in range(3))
    if torch.is_tensor(regions):
        label = torch.zeros(wt.shape, dtype=torch.uint8, device=regions.device)
    else:
        label = np.zeros(wt.shape, dtype=np.uint8)
    label[wt] = oedema_label
    label[tc] = necrotic_label
    label[et] = enhancing_label
    return label


class _Pipeline(Compose):
    """A MONAI ``Compose`` that lets a :class:`RevsegError` raised inside a transform through as
    itself (one line for the user) instead of wrapped in MONAI's ``RuntimeError`` chain."""

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as error:
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, RevsegError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause.with_traceback(None) from None


class LabelToRegionsd(MapTransform):
    """Dictionary transform: label map ``(1, D, H, W)`` -> regions ``(3, D, H, W)`` uint8.

    Channels in the order WT, TC, ET (see :func:`label_to_regions`). Unlike MONAI's
    ``ConvertToMultiChannelBasedOnBratsClassesd`` (TC, WT, ET, labels fixed to 1/2/4), WT is every
    non-zero label and the label values are those of the dataset's convention.

    Args:
        keys: keys of the label maps.
        enhancing_label: label of the enhancing tumour.
        necrotic_label: label of the necrotic / non-enhancing core.
        oedema_label: label of the oedema.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        enhancing_label: int = 4,
        allow_missing_keys: bool = False,
        necrotic_label: int = 1,
        oedema_label: int = 2,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.codes = (enhancing_label, necrotic_label, oedema_label)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = label_to_regions(d[key], *self.codes)
        return d


class CheckImaged(MapTransform):
    """Dictionary transform: stop on an image volume with NaN/Inf voxels or no non-zero voxel.

    The message names the file: ``d[files_key]`` holds the image's file names as given to
    ``LoadImaged`` (one per channel, or one 4D file); the key is removed.

    Raises:
        DataError: ``<file>: N NaN/Inf voxels`` or ``<file>: empty volume (all voxels are 0)``.
    """

    def __init__(self, keys: KeysCollection, files_key: str = "image_files") -> None:
        super().__init__(keys)
        self.files_key = files_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        names = _file_names(d.pop(self.files_key, ()))
        for key in self.key_iterator(d):
            image = d[key].as_tensor() if isinstance(d[key], MetaTensor) else d[key]
            image = torch.as_tensor(image)
            for channel in range(image.shape[0]):
                if len(names) == image.shape[0]:
                    source = names[channel]
                elif names:
                    source = f"{names[0]} (volume {channel})"
                else:
                    source = f"{key} channel {channel}"
                finite = torch.isfinite(image[channel])
                if not bool(finite.all()):
                    raise DataError(f"{source}: {int((~finite).sum())} NaN/Inf voxels")
                if not bool(image[channel].any()):
                    raise DataError(f"{source}: empty volume (all voxels are 0)")
        return d


class ReorderChannelsd(MapTransform):
    """Dictionary transform: ``d[key] = d[key][order]`` along the channel axis.

    Used for 4D images whose volumes are not in the order t1, t1ce, t2, flair (MSD: FLAIR, T1w,
    T1gd, T2w).
    """

    def __init__(self, keys: KeysCollection, order: Sequence[int]) -> None:
        super().__init__(keys)
        self.order = list(order)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].shape[0] != len(self.order):
                raise DataError(
                    f"{_label_source(d[key])}: {d[key].shape[0]} volumes, expected "
                    f"{len(self.order)} (one per modality)"
                )
            d[key] = d[key][self.order]
        return d


class RandInPlaneDeformd(RandomizableTransform, MapTransform):
    """In-plane rotation, scaling and elastic deformation, the same for every z slice.

    Brügger et al. augment "only on the planes that are perpendicular to the z-axis" because the
    z-axis of BraTS is interpolated. The volumes ``(C, X, Y, Z)`` are viewed as ``C * Z`` images
    of ``(X, Y)`` and deformed together by MONAI's :class:`~monai.transforms.Rand2DElasticd`
    (one resampling for rotation, scaling and the elastic field; nearest neighbour for labels).

    Args:
        keys: the volumes, e.g. ``("image", "label")``; all get the same deformation.
        prob: probability of deforming a sample.
        rotate_deg: rotation about z, uniform in ``[-rotate_deg, rotate_deg]`` degrees.
        scale_max: scaling per in-plane axis, uniform in ``[1 / scale_max, scale_max]``.
        elastic_magnitude: maximum control-point offset in voxels (0: no elastic field).
        elastic_spacing: distance between the elastic control points in voxels.
        mode: interpolation per key (``"bilinear"`` for images, ``"nearest"`` for labels).
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        rotate_deg: float = 20.0,
        scale_max: float = 1.1,
        elastic_magnitude: float = 3.0,
        elastic_spacing: int = 40,
        mode: Sequence[str] | str = "bilinear",
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        angle = math.radians(rotate_deg)
        low, high = 1.0 / scale_max - 1.0, scale_max - 1.0
        self.deform = Rand2DElasticd(
            keys,
            spacing=(elastic_spacing, elastic_spacing),
            magnitude_range=(0.0, float(elastic_magnitude)),
            prob=1.0,
            rotate_range=(angle,) if angle else None,
            scale_range=((low, high), (low, high)) if scale_max != 1.0 else None,
            mode=mode,
            padding_mode="zeros",
        )

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandInPlaneDeformd:
        super().set_random_state(seed, state)
        self.deform.set_random_state(state=self.R)  # one stream for both
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        shapes, flat = {}, {}
        for key in self.key_iterator(d):
            volume = torch.as_tensor(d[key])
            shapes[key] = volume.shape  # (C, X, Y, Z) -> (C * Z, X, Y)
            c, x, y, z = volume.shape
            flat[key] = volume.permute(0, 3, 1, 2).reshape(c * z, x, y)
        out = self.deform(flat)
        for key, (c, x, y, z) in shapes.items():
            d[key] = torch.as_tensor(out[key]).reshape(c, z, x, y).permute(0, 2, 3, 1)
        return d


def split_pipeline(pipeline: Compose) -> tuple[Compose, Compose]:
    """Split a pipeline before its first random transform: ``(deterministic, random)``.

    The deterministic part is what a cache may keep (as MONAI's ``CacheDataset`` does).
    """
    steps = list(pipeline.transforms)
    first = next((i for i, t in enumerate(steps) if isinstance(t, Randomizable)), len(steps))
    # the final cast to float32 is never cached: a cache keeps the (smaller) cache dtype, and
    # training and validation items then look alike in the cache, whatever their pipelines
    if first == len(steps) and steps and isinstance(steps[-1], EnsureTyped):
        first -= 1
    return _Pipeline(steps[:first]), _Pipeline(steps[first:])


def build_transforms(
    train: bool,
    crop_size: Sequence[int] | None = (160, 192, 160),
    patch_size: Sequence[int] | None = None,
    flip_prob: float = 0.5,
    enhancing_label: int = 4,
    reader: str = "nibabel",
    *,
    with_label: bool = True,
    track_meta: bool = False,
    necrotic_label: int = 1,
    oedema_label: int = 2,
    channel_order: Sequence[int] | None = None,
    rotate_deg: float = 0.0,
    scale_max: float = 1.0,
    elastic_magnitude: float = 0.0,
    elastic_spacing: int = 40,
    deform_prob: float = 1.0,
    intensity_shift: float = 0.0,
    cache_dtype: torch.dtype | None = None,
) -> Compose:
    """Build the BraTS pipeline for dicts ``{"image": [4 paths] or 4D path, "label": path, ...}``.

    Steps: load the modality files as one ``(4, X, Y, Z)`` float32 image (a 4D file's volumes
    reordered by ``channel_order``) and the label as ``(1, X, Y, Z)``; stop on NaN/Inf voxels or an
    empty volume; label -> ``(3, X, Y, Z)`` regions WT, TC, ET; crop to the bounding box of the
    brain (non-zero voxels of any channel); z-score each channel over its non-zero voxels
    (background stays 0); centre-crop or zero-pad to ``crop_size``. For training only, in this
    order and each only when enabled: in-plane rotation / scaling / elastic deformation
    (:class:`RandInPlaneDeformd`), a random ``patch_size`` patch, a flip with probability
    ``flip_prob`` along each spatial axis, a per-channel intensity shift. Last, both are cast to
    float32. Everything before the first random step is deterministic, so a cache keeps it
    (:func:`split_pipeline`).

    Args:
        train: add the random steps.
        crop_size: fixed ``(D, H, W)`` after the foreground crop; None: keep the brain's bounding
            box (sliding-window inference).
        patch_size: training patch ``(D, H, W)`` <= ``crop_size``; None: the whole crop.
        flip_prob: flip probability per axis in training; 0 disables flips.
        enhancing_label: label of the enhancing tumour (4 for BraTS 2018-2021, 3 from 2023, MSD).
        reader: ``"nibabel"`` or ``"simpleitk"``.
        with_label: whether the dicts have a ``"label"`` (False for inference).
        track_meta: return MONAI ``MetaTensor`` s (with the applied operations, so that
            ``pipeline.inverse`` maps a prediction back to the file's grid) instead of tensors.
        necrotic_label: label of the necrotic / non-enhancing core (2 in MSD).
        oedema_label: label of the oedema (1 in MSD).
        channel_order: for a 4D image, the volume index of t1, t1ce, t2, flair.
        rotate_deg: in-plane rotation range in degrees (Brügger et al.: 20); 0 disables it.
        scale_max: in-plane scaling in ``[1 / scale_max, scale_max]`` (paper: 1.1); 1 disables.
        elastic_magnitude: elastic control-point offsets up to this many voxels; 0 disables.
        elastic_spacing: elastic control-point spacing in voxels.
        deform_prob: probability of the in-plane deformation per sample.
        intensity_shift: per-channel intensity shift in ``[-s, s]`` (z-score units; paper 0.1).
        cache_dtype: cast the image to this dtype at the end of the deterministic part (e.g.
            float16 for the disk cache); the label is kept as uint8.

    Returns:
        A :class:`monai.transforms.Compose`.

    Raises:
        ConfigError: unknown ``reader``.
    """
    keys = ["image", "label"] if with_label else ["image"]
    steps: list = [
        CopyItemsd("image", names="image_files"),
        LoadImaged(keys, reader=make_reader(reader), ensure_channel_first=True),
        CheckImaged("image"),
    ]
    if channel_order is not None:
        steps.append(ReorderChannelsd("image", channel_order))
    if with_label:
        steps.append(
            LabelToRegionsd(
                "label",
                enhancing_label=enhancing_label,
                necrotic_label=necrotic_label,
                oedema_label=oedema_label,
            )
        )
    steps += [
        CropForegroundd(
            keys,
            source_key="image",
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    ]
    if crop_size is not None:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=tuple(crop_size)))
    if cache_dtype is not None:
        steps.append(CastToTyped("image", dtype=cache_dtype))
    if train:
        if rotate_deg or scale_max != 1.0 or elastic_magnitude:
            steps.append(
                RandInPlaneDeformd(
                    keys,
                    prob=deform_prob,
                    rotate_deg=rotate_deg,
                    scale_max=scale_max,
                    elastic_magnitude=elastic_magnitude,
                    elastic_spacing=elastic_spacing,
                    mode=["bilinear", "nearest"][: len(keys)],
                )
            )
        if patch_size is not None and tuple(patch_size) != tuple(crop_size or ()):
            steps.append(RandSpatialCropd(keys, roi_size=tuple(patch_size), random_size=False))
        if flip_prob > 0:
            steps += [RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
        if intensity_shift:
            steps.append(
                RandShiftIntensityd("image", offsets=intensity_shift, prob=1.0, channel_wise=True)
            )
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=track_meta))
    return _Pipeline(steps)
