"""MONAI transforms for BraTS-style volumes: reading, label regions, normalisation, crops.

The pipeline of :func:`build_transforms` follows Brügger et al. (2019), "A partially reversible
U-Net for memory-efficient volumetric image segmentation": four modalities stacked channel-first,
z-score per channel over the non-zero (brain) voxels, the brain's bounding box centre-cropped or
padded to a fixed size (the full field of view, 160x192x160 on BraTS), optional random patches and
random flips for training, and the label turned into the overlapping regions WT, TC, ET.

Both readers, nibabel and SimpleITK, return arrays indexed ``(x, y, z)`` in the file's voxel order
with an RAS affine, so the two give identical tensors.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, NibabelReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import is_supported_format, orientation_ras_lps
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandFlipd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
)
from monai.utils import ensure_tuple

from revseg.errors import ConfigError, DataError, RevsegError

__all__ = [
    "READERS",
    "REGIONS",
    "LabelToRegionsd",
    "CheckedNibabelReader",
    "SimpleITKReader",
    "build_transforms",
    "label_to_regions",
    "make_reader",
    "regions_to_label",
]

READERS = ("nibabel", "simpleitk")
"""Names accepted by ``data.reader``."""

REGIONS = ("WT", "TC", "ET")
"""Output channels of :class:`LabelToRegionsd`: whole tumour, tumour core, enhancing tumour."""

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
        """Return ``(array, meta)``: ``(C, X, Y, Z)`` for a list, ``(X, Y, Z)`` for one scalar image.

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


def label_to_regions(label: ArrayLike, enhancing_label: int = 4) -> ArrayLike:
    """Turn a BraTS label map into the three overlapping regions.

    WT = ``label != 0``, TC = ``label in {1, enhancing_label}``, ET = ``label == enhancing_label``.

    Args:
        label: ``(1, D, H, W)`` or ``(D, H, W)`` label map, numpy or torch, values in
            ``{0, 1, 2, enhancing_label}``.
        enhancing_label: label of the enhancing tumour: 4 for BraTS 2018-2021, 3 from 2023.

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
    background, necrotic, oedema, enhancing = (label == v for v in (0, 1, 2, enhancing_label))
    known = background | necrotic | oedema | enhancing
    if not bool(known.all()):
        values = label[~known]
        unique = sorted(
            {float(v) for v in (values.unique() if torch.is_tensor(values) else np.unique(values))}
        )
        shown = ", ".join(f"{v:g}" for v in unique[:5])
        raise DataError(
            f"{_label_source(label)}: label values {shown} not in 0/1/2/{enhancing_label} "
            f"(data.enhancing_label={enhancing_label}; 4 for BraTS 2018-2021, 3 from 2023)"
        )
    regions = [~background, necrotic | enhancing, enhancing]
    if torch.is_tensor(label):
        return torch.stack(regions).to(torch.uint8)
    return np.stack(regions).astype(np.uint8)


def regions_to_label(regions: ArrayLike, enhancing_label: int = 4) -> ArrayLike:
    """Inverse of :func:`label_to_regions`: regions to a BraTS label map.

    ET -> ``enhancing_label``, TC \\ ET -> 1, WT \\ TC -> 2, elsewhere 0. A voxel in an inner
    region but not in the outer one (e.g. ET outside WT in a prediction) takes the inner label.

    Args:
        regions: ``(3, D, H, W)`` in the order WT, TC, ET; bool, or numbers where non-zero means
            inside (threshold probabilities first). Numpy or torch.
        enhancing_label: label written for ET: 4 for BraTS 2018-2021, 3 from 2023.

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
    label[wt] = 2
    label[tc] = 1
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
    """Dictionary transform: BraTS label map ``(1, D, H, W)`` -> regions ``(3, D, H, W)`` uint8.

    Channels in the order WT, TC, ET (see :func:`label_to_regions`). Unlike MONAI's
    ``ConvertToMultiChannelBasedOnBratsClassesd`` (TC, WT, ET), WT is every non-zero label and
    the enhancing label is configurable (4 for BraTS 2018-2021, 3 from 2023).

    Args:
        keys: keys of the label maps.
        enhancing_label: label of the enhancing tumour.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self, keys: KeysCollection, enhancing_label: int = 4, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.enhancing_label = enhancing_label

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = label_to_regions(d[key], self.enhancing_label)
        return d


def build_transforms(
    train: bool,
    crop_size: Sequence[int] = (160, 192, 160),
    patch_size: Sequence[int] | None = None,
    flip_prob: float = 0.5,
    enhancing_label: int = 4,
    reader: str = "nibabel",
    *,
    with_label: bool = True,
    track_meta: bool = False,
) -> Compose:
    """Build the BraTS pipeline for dicts ``{"image": [4 paths], "label": path, ...}``.

    Steps: load the modality files as one ``(4, X, Y, Z)`` float32 image and the label as
    ``(1, X, Y, Z)``; label -> ``(3, X, Y, Z)`` regions WT, TC, ET; crop to the bounding box of
    the brain (non-zero voxels of any channel); z-score each channel over its non-zero voxels
    (background stays 0); centre-crop or zero-pad to ``crop_size``. For training only: a random
    ``patch_size`` patch, and a flip with probability ``flip_prob`` along each spatial axis.
    Last, both are cast to float32. Everything before the first random step is deterministic,
    so a MONAI ``CacheDataset`` caches it.

    Args:
        train: add the random patch and flips.
        crop_size: fixed ``(D, H, W)`` after the foreground crop.
        patch_size: training patch ``(D, H, W)`` <= ``crop_size``; None: the whole crop.
        flip_prob: flip probability per axis in training; 0 disables flips.
        enhancing_label: label of the enhancing tumour (4 for BraTS 2018-2021, 3 from 2023).
        reader: ``"nibabel"`` or ``"simpleitk"``.
        with_label: whether the dicts have a ``"label"`` (False for inference).
        track_meta: return MONAI ``MetaTensor`` s (with the applied operations, for
            ``Invertd``) instead of plain tensors.

    Returns:
        A :class:`monai.transforms.Compose`.

    Raises:
        ConfigError: unknown ``reader``.
    """
    keys = ["image", "label"] if with_label else ["image"]
    steps: list = [LoadImaged(keys, reader=make_reader(reader), ensure_channel_first=True)]
    if with_label:
        steps.append(LabelToRegionsd("label", enhancing_label=enhancing_label))
    steps += [
        CropForegroundd(
            keys,
            source_key="image",
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        ResizeWithPadOrCropd(keys, spatial_size=tuple(crop_size)),
    ]
    if train:
        if patch_size is not None and tuple(patch_size) != tuple(crop_size):
            steps.append(RandSpatialCropd(keys, roi_size=tuple(patch_size), random_size=False))
        if flip_prob > 0:
            steps += [RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=track_meta))
    return _Pipeline(steps)
