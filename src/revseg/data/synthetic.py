"""A small BraTS-like dataset generated on disk, for the demo and the tests.

Each case is a "brain" (a perturbed ellipsoid of textured tissue on a zero background, with a
smooth bias field) holding a tumour of nested regions in the BraTS 2018-2021 label convention:

- 1: necrotic / non-enhancing tumour core, inside
- 4: the enhancing rim, inside
- 2: the peritumoral oedema.

Some cases have no necrosis (a solid enhancing core) or no enhancement (a non-enhancing core), so
the TC and ET regions can be empty, as in the real data. The four modalities have distinct
signatures (FLAIR bright in oedema and tumour, T1ce bright on the enhancing rim, T2 bright in
oedema, necrosis and CSF, T1 darker in the tumour) plus a bias field and Gaussian noise: a network
learns the regions, but no single-modality threshold gives all three.

The files follow the BraTS 2021 layout exactly by default::

    root/dataset.json
    root/BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz

and any other layout of :data:`revseg.data.layouts.LAYOUTS` on request (``layout=``, one of
:func:`~revseg.data.layouts.example_layouts`: each layout names its files and gives its label
convention, the labels are mapped to it), so that every layout can be tested and tried without
the real data.

with int16 images, a uint8 label map and an RAS affine of 1 mm spacing. Case ``i`` depends only on
``(seed, i, shape)``, not on ``num_cases``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from revseg.data.layouts import BRATS, ExampleFiles, LabelConvention, Layout, example_layouts
from revseg.errors import DataError

__all__ = [
    "GENERATOR",
    "GENERATOR_VERSION",
    "case_files",
    "make_synthetic_brats",
    "read_manifest",
    "synthesize_case",
]

GENERATOR = "revseg.data.synthetic"
GENERATOR_VERSION = 1

_MODALITIES = ("t1", "t1ce", "t2", "flair")  # row order of _SIGNATURES

# Mean intensity of each tissue class per modality (t1, t1ce, t2, flair), before the per-case
# jitter, bias field and noise. Rows: white matter, grey matter, CSF, oedema, enhancing tumour,
# necrotic / non-enhancing core.
_WM, _GM, _CSF, _OEDEMA, _ENHANCING, _NECROSIS = range(6)
_SIGNATURES = np.array(
    [
        [0.90, 0.85, 0.45, 0.55],
        [0.65, 0.62, 0.62, 0.68],
        [0.25, 0.25, 1.25, 0.20],
        [0.55, 0.55, 1.15, 1.20],
        [0.60, 1.40, 0.80, 0.95],
        [0.35, 0.30, 1.15, 0.80],
    ],
    dtype=np.float32,
)
_NOISE_STD = 0.06


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise smooth over about ``scale`` voxels (trilinear upsampling)."""
    coarse = tuple(max(2, int(np.ceil(n / scale)) + 1) for n in shape)
    field = ndimage.zoom(
        rng.standard_normal(coarse).astype(np.float32),
        [n / c for n, c in zip(shape, coarse)],
        order=1,
        grid_mode=True,
        mode="nearest",
    )
    field = field[tuple(slice(0, n) for n in shape)]
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid_distance(
    grid: np.ndarray, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray
) -> np.ndarray:
    """Normalised distance (< 1 inside) of each point of ``grid`` (3, X, Y, Z) to an ellipsoid."""
    local = np.tensordot(rotation.T, grid - center[:, None, None, None], axes=1)
    return np.sqrt(np.sum((local / radii[:, None, None, None]) ** 2, axis=0))


def synthesize_case(
    seed: int, index: int, shape: Sequence[int] = (48, 48, 48)
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one case in memory.

    Args:
        seed: dataset seed.
        index: case index; the case depends only on ``(seed, index, shape)``.
        shape: spatial shape ``(X, Y, Z)``.

    Returns:
        ``(image, label)``: image ``(4, X, Y, Z)`` int16 in the modality order t1, t1ce, t2, flair
        (zero outside the brain, >= 1 inside), label ``(X, Y, Z)`` uint8 with values 0/1/2/4.
    """
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng([int(seed), int(index)])
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, X, Y, Z), in [-1, 1]
    mean_size = float(np.mean(shape))

    def noise(scale_fraction: float) -> np.ndarray:
        return _smooth_noise(rng, shape, max(2.0, scale_fraction * mean_size))

    # brain: a perturbed ellipsoid
    d_brain = _ellipsoid_distance(
        grid,
        rng.uniform(-0.04, 0.04, 3),
        rng.uniform([0.76, 0.80, 0.70], [0.86, 0.90, 0.80]),
        np.eye(3),
    )
    d_brain = d_brain - 0.04 * noise(0.25)
    brain = d_brain < 1.0

    # tissue classes: white matter, cortex-like grey matter, ventricles and sulcal CSF
    tissue = np.full(shape, _WM, dtype=np.int64)
    tissue[(noise(0.12) > 0.6) | (d_brain > 0.8)] = _GM
    tissue[(d_brain > 0.9) & (noise(0.08) > 0.4)] = _CSF
    for side in (-1.0, 1.0):
        d_vent = _ellipsoid_distance(
            grid,
            np.array([side * 0.12, rng.uniform(-0.1, 0.1), rng.uniform(-0.05, 0.1)]),
            rng.uniform([0.07, 0.22, 0.08], [0.11, 0.30, 0.12]),
            np.eye(3),
        )
        tissue[d_vent < 1.0] = _CSF

    # tumour: oedema > enhancing core > necrosis, each a noisy ellipsoid inside the previous one
    center = rng.uniform(-0.45, 0.45, 3)
    while np.linalg.norm(center) > 0.5:  # well inside the brain
        center = rng.uniform(-0.45, 0.45, 3)
    oedema_radii = rng.uniform(0.3, 0.45, 3)
    core_radii = oedema_radii * rng.uniform(0.55, 0.75) * rng.uniform(0.85, 1.15, 3)
    core_center = center + rng.uniform(-0.3, 0.3, 3) * (oedema_radii - core_radii)
    necrosis_radii = core_radii * rng.uniform(0.55, 0.75) * rng.uniform(0.9, 1.1, 3)
    rotation = _random_rotation(rng)

    d_oedema = _ellipsoid_distance(grid, center, oedema_radii, rotation) - 0.2 * noise(0.15)
    oedema = (d_oedema < 1.0) & brain
    d_core = _ellipsoid_distance(grid, core_center, core_radii, rotation) - 0.12 * noise(0.1)
    core = (d_core < 1.0) & ndimage.binary_erosion(oedema)
    d_necrosis = _ellipsoid_distance(grid, core_center, necrosis_radii, _random_rotation(rng))
    necrosis = (d_necrosis - 0.12 * noise(0.1) < 1.0) & ndimage.binary_erosion(core)

    label = np.zeros(shape, dtype=np.uint8)
    label[oedema] = 2
    mode = rng.random()
    if mode < 0.15:  # non-enhancing core only: ET is empty
        label[core] = 1
    elif mode < 0.35:  # solid enhancing core, no necrosis
        label[core] = 4
    else:  # enhancing rim around a necrotic core
        label[core] = 4
        label[necrosis] = 1

    # intensities: per-case jittered signatures, oedema mixed with the tissue it infiltrates
    signatures = _SIGNATURES * rng.uniform(0.9, 1.1, _SIGNATURES.shape).astype(np.float32)
    clean = signatures[tissue]  # (X, Y, Z, 4)
    clean[oedema] = 0.25 * clean[oedema] + 0.75 * signatures[_OEDEMA]
    clean[label == 4] = signatures[_ENHANCING]
    clean[label == 1] = signatures[_NECROSIS]
    clean = np.moveaxis(clean, -1, 0)

    image = np.empty((4, *shape), dtype=np.int16)
    for c in range(4):
        channel = ndimage.gaussian_filter(clean[c], sigma=0.7)  # partial volume
        channel *= 1.0 + 0.05 * noise(0.06)  # fine texture
        channel *= np.exp(0.12 * noise(0.5))  # bias field
        channel += rng.normal(0.0, _NOISE_STD, shape).astype(np.float32)
        channel *= rng.uniform(300.0, 900.0)
        image[c] = np.where(brain, np.clip(np.rint(channel), 1, 32767), 0).astype(np.int16)
    return image, label


def _affine(shape: tuple[int, ...]) -> np.ndarray:
    """RAS, 1 mm isotropic, world origin at the centre of the volume."""
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape, dtype=float) - 1.0) / 2.0
    return affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def _example(layout: str) -> tuple[Layout, ExampleFiles]:
    """The layout ``layout`` is read as and how it names a case.

    Raises:
        ValueError: ``layout`` is not a name of :func:`~revseg.data.layouts.example_layouts`.
    """
    named = example_layouts()
    if layout not in named:
        raise ValueError(f"layout must be one of {', '.join(named)}, got {layout!r}")
    return named[layout]


def case_files(layout: str, index: int, num_cases: int) -> dict[str, str]:
    """Relative paths of case ``index``'s files in ``layout``: modality (or ``image`` for a 4D
    file) and ``seg`` -> path (the layout's :attr:`~revseg.data.layouts.Layout.example_files`)."""
    return _example(layout)[1](index, num_cases)


def _relabel(label: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """``label`` (BraTS 2018-2021 values, as :func:`synthesize_case` draws them) in
    ``convention``'s values."""
    out = label.copy()
    for part in ("necrotic", "oedema", "enhancing"):
        out[label == getattr(BRATS, part)] = getattr(convention, part)
    return out


def read_generator_manifest(root: str | os.PathLike, generator: str) -> dict | None:
    """The ``dataset.json`` at ``root`` if ``generator`` wrote it, else None."""
    try:
        manifest = json.loads((Path(root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    return (
        manifest if isinstance(manifest, dict) and manifest.get("generator") == generator else None
    )


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The ``dataset.json`` of a dataset written by :func:`make_synthetic_brats`, else None."""
    return read_generator_manifest(root, GENERATOR)


def publish_folder(
    root: Path, write: Callable[[Path], None], is_complete: Callable[[], bool]
) -> Path:
    """Fill a temporary sibling folder with ``write`` and rename it into place as ``root``.

    An interrupted run never leaves a half-written ``root``; an existing ``root`` (empty, or a
    generated dataset being overwritten) is replaced only once the new one is complete. When
    another process (a DDP rank) publishes the same dataset first, ``is_complete()`` says so and
    its copy is kept.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{token}"
    old = root.parent / f".{root.name}.old-{token}"
    tmp.mkdir()
    try:
        write(tmp)
        if is_complete():  # another process was faster
            return root
        if root.is_dir():
            root.rename(old)
        try:
            tmp.rename(root)
        except OSError:
            if is_complete():
                return root
            if old.is_dir() and not root.exists():
                old.rename(root)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root


def _is_complete(
    root: Path, num_cases: int, shape: tuple[int, ...], seed: int, layout: str = "brats2021"
) -> bool:
    manifest = read_manifest(root)
    if manifest is None:
        return False
    if (
        manifest.get("num_cases"),
        manifest.get("shape"),
        manifest.get("seed"),
        manifest.get("layout", "brats2021"),
    ) != (num_cases, list(shape), seed, layout):
        return False
    return all(
        (root / path).is_file()
        for i in range(num_cases)
        for path in case_files(layout, i, num_cases).values()
    )


def _describe(root: Path) -> str:
    manifest = read_manifest(root)
    if manifest is None:
        return "is not a dataset written by revseg's generator (no matching dataset.json)"
    return (
        f"holds a synthetic dataset of num_cases={manifest.get('num_cases')}, "
        f"shape={manifest.get('shape')}, seed={manifest.get('seed')}"
    )


def _write_dataset(
    folder: Path, num_cases: int, shape: tuple[int, ...], seed: int, layout: str = "brats2021"
) -> None:
    read_as, example = _example(layout)
    convention = read_as.convention
    affine = _affine(shape)
    every = [example(index, num_cases) for index in range(num_cases)]
    for index, files in enumerate(every):
        for path in files.values():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
        image, label = synthesize_case(seed, index, shape)
        if read_as.four_d:
            volumes = [image[_MODALITIES.index(m)] for m in read_as.volume_order]
            _save_nifti(np.stack(volumes, axis=-1), affine, folder / files["image"])
        else:
            for channel, modality in enumerate(_MODALITIES):
                _save_nifti(image[channel], affine, folder / files[modality])
        _save_nifti(_relabel(label, convention), affine, folder / files["seg"])
    names = {"necrotic": "necrotic core", "oedema": "oedema", "enhancing": "enhancing"}
    labels = {0: "background", **{getattr(convention, k): v for k, v in names.items()}}
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "num_cases": num_cases,
        "shape": list(shape),
        "layout": layout,
        "modalities": list(_MODALITIES),
        "labels": {str(value): labels[value] for value in sorted(labels)},
    }
    if read_as.example_manifest is not None:  # the layout's own dataset.json keys, plus ours
        manifest.update(read_as.example_manifest(every))
    # written last: its presence marks a complete dataset
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")


def make_synthetic_brats(
    root: str | os.PathLike,
    num_cases: int = 16,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    overwrite: bool = False,
    layout: str = "brats2021",
) -> Path:
    """Write a BraTS-like synthetic dataset at ``root`` in a published layout; return its path.

    The dataset is built in a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a half-written ``root``. Generating 16 cases of 48^3 takes about a second.

    Args:
        root: dataset folder to create (its parent is created if needed).
        num_cases: number of cases, >= 1.
        shape: spatial shape ``(X, Y, Z)`` of every volume, each >= 8.
        seed: generator seed; the same seed gives identical files' contents.
        overwrite: replace an existing dataset written by this generator with other settings.
            A folder not written by the generator is never replaced.
        layout: a name of :func:`~revseg.data.layouts.example_layouts`: ``brats2021`` (the
            default, the demo), any other layout of :data:`~revseg.data.layouts.LAYOUTS` (files
            named as its :attr:`~revseg.data.layouts.Layout.example_files`, labels in its
            convention) or a variant (``brats2019``: BraTS 2019's names, read as brats2018).
            Case ``i`` has the same content in every layout.

    Returns:
        ``root`` as a :class:`pathlib.Path`.

    Raises:
        DataError: ``root`` exists with other contents and ``overwrite`` is False, or ``root`` is
            a non-empty folder not written by this generator.
        ValueError: ``num_cases`` or ``shape`` are invalid.
    """
    root = Path(root)
    shape = tuple(int(n) for n in shape)
    num_cases, seed = int(num_cases), int(seed)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 ints >= 8, got {shape}")
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    _example(layout)  # a known name

    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if _is_complete(root, num_cases, shape, seed, layout):
            return root
        if not overwrite or read_manifest(root) is None:
            raise DataError(
                f"{root}: {_describe(root)}, not num_cases={num_cases}, shape={list(shape)}, "
                f"seed={seed}; delete it, choose another folder"
                + ("" if read_manifest(root) is None else " or overwrite it (--overwrite)")
            )

    return publish_folder(
        root,
        lambda folder: _write_dataset(folder, num_cases, shape, seed, layout),
        lambda: _is_complete(root, num_cases, shape, seed, layout),
    )
