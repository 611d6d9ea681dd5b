"""Generated nnU-Net-format test datasets in the real layouts (no download).

Each task is written as its public counterpart is laid out, read back through the same readers,
checks and transforms as real data (:mod:`revseg.data.nnunet`):

=================  =============================================================================
``hippocampus``    v2, one MRI channel, labels background / Anterior / Posterior (Decathlon
                   Task04-like), 1 mm, a few shapes, ``.nii.gz``, with ``imagesTs/``
``hippocampus_mha`` the same in ``.mha``
``spleen``         v2, one CT channel in HU (air -1000, fat, soft tissue; spleen about +100),
                   anisotropic 0.8 x 0.8 x 5 mm, flipped x/y axes and an origin off 0
``prostate_v1``    the Decathlon's own v1 form (Task05-like): ``modality`` T2 / ADC, a 4D image
                   per case, labels 0 background, 1 PZ, 2 TZ, a ``training`` list
``brats_regions``  v2 region-based (BraTS in nnU-Net form): 2 MRI channels, labels 1 / 2 / 3,
                   regions whole tumor [1, 2, 3], tumor core [2, 3], enhancing tumor [3]
=================  =============================================================================

Objects are ellipsoids at random positions whose parts differ in intensity, in smooth noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from revseg.data.synthetic import _ellipsoid_distance, _smooth_noise, publish_folder
from revseg.errors import ConfigError, DataError

__all__ = ["GENERATOR", "TASKS", "make_task", "read_task_manifest"]

GENERATOR = "revseg.data.synthetic_nnunet"


def _write(array: np.ndarray, path: Path, spacing, origin, direction) -> None:
    """Write ``array`` ``(x, y, z)`` (or ``(C, x, y, z)``: a 4D file) with its geometry."""
    if array.ndim == 4:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(0, 3, 2, 1)), False)
        image.SetSpacing((*spacing, 1.0))
        image.SetOrigin((*origin, 0.0))
        d = np.eye(4)
        d[:3, :3] = np.asarray(direction).reshape(3, 3)
        image.SetDirection(d.ravel().tolist())
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, os.fspath(path), useCompression=True)


def _grid(shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))


def _blob(rng: np.random.Generator, shape: tuple[int, ...], size: float) -> np.ndarray:
    """Normalised distance to a random axis-aligned ellipsoid of about ``size`` of the volume."""
    shape_a = np.asarray(shape, dtype=np.float32)
    radii = shape_a * size * rng.uniform(0.8, 1.2, 3)
    center = shape_a / 2 + rng.uniform(-0.15, 0.15, 3) * shape_a
    return _ellipsoid_distance(_grid(shape), center, radii, np.eye(3))


def _hippocampus(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[list, np.ndarray]:
    inside = _blob(rng, shape, 0.28) < 1.0
    cut = np.median(np.nonzero(inside)[0]) if inside.any() else shape[0] / 2
    anterior = np.arange(shape[0])[:, None, None] < cut
    label = np.where(inside, np.where(anterior, 1, 2), 0).astype(np.uint8)
    means = np.array([100.0, 180.0, 60.0])
    image = means[label] + 12.0 * _smooth_noise(rng, shape, 4) + rng.normal(0, 6, shape)
    return [np.clip(image, 1.0, None).astype(np.float32)], label


def _spleen(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[list, np.ndarray]:
    body = _ellipsoid_distance(
        _grid(shape),
        np.asarray(shape, np.float32) / 2,
        np.asarray(shape, np.float32) * np.array([0.45, 0.42, 0.6]),
        np.eye(3),
    )
    organ = _blob(rng, shape, 0.2) < 1.0
    image = np.where(body < 1.0, 40.0, -1000.0) + np.where((body > 0.85) & (body < 1.0), -140, 0)
    image = image + np.where(organ, 70.0, 0.0) + 15.0 * _smooth_noise(rng, shape, 3)
    image += rng.normal(0, 10, shape)
    return [image.astype(np.int16)], organ.astype(np.uint8)


def _prostate(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[list, np.ndarray]:
    distance = _blob(rng, shape, 0.3)
    label = np.where(distance < 0.55, 2, np.where(distance < 1.0, 1, 0)).astype(np.uint8)
    noise = _smooth_noise(rng, shape, 4)
    t2 = np.array([300.0, 500.0, 380.0])[label] + 30 * noise + rng.normal(0, 15, shape)
    adc = np.array([800.0, 1400.0, 1000.0])[label] - 60 * noise + rng.normal(0, 40, shape)
    return [np.clip(t2, 1, None), np.clip(adc, 1, None)], label


def _regions(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[list, np.ndarray]:
    distance = _blob(rng, shape, 0.3)
    label = np.select([distance < 0.4, distance < 0.7, distance < 1.0], [3, 2, 1], 0)
    label = label.astype(np.uint8)
    noise = _smooth_noise(rng, shape, 4)
    t1c = np.array([200.0, 210.0, 150.0, 420.0])[label] + 15 * noise + rng.normal(0, 8, shape)
    flair = np.array([200.0, 380.0, 300.0, 300.0])[label] + 15 * noise + rng.normal(0, 8, shape)
    return [np.clip(t1c, 1, None), np.clip(flair, 1, None)], label


_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_FLIPPED_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

TASKS: dict[str, dict] = {
    "hippocampus": {
        "folder": "Dataset904_SynthHippocampus",
        "make": _hippocampus,
        "shapes": ((24, 28, 20), (28, 24, 24), (24, 24, 24)),
        "spacing": (1.0, 1.0, 1.0),
        "origin": (0.0, 0.0, 0.0),
        "direction": _IDENTITY,
        "channels": {"0": "MRI"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "file_ending": ".nii.gz",
    },
    "spleen": {
        "folder": "Dataset909_SynthSpleen",
        "make": _spleen,
        "shapes": ((40, 40, 12), (44, 40, 12), (40, 44, 10)),
        "spacing": (0.8, 0.8, 5.0),
        "origin": (120.5, 95.25, -310.0),
        "direction": _FLIPPED_XY,
        "channels": {"0": "CT"},
        "labels": {"background": 0, "spleen": 1},
        "file_ending": ".nii.gz",
    },
    "prostate_v1": {
        "folder": "Task905_SynthProstate",
        "make": _prostate,
        "shapes": ((32, 32, 16), (32, 28, 16)),
        "spacing": (0.6, 0.6, 3.6),
        "origin": (0.0, 0.0, 0.0),
        "direction": _IDENTITY,
        "channels": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "file_ending": ".nii.gz",
    },
    "brats_regions": {
        "folder": "Dataset901_SynthBraTS",
        "make": _regions,
        "shapes": ((24, 24, 24), (28, 24, 24)),
        "spacing": (1.0, 1.0, 1.0),
        "origin": (0.0, 0.0, 0.0),
        "direction": _IDENTITY,
        "channels": {"0": "T1c", "1": "FLAIR"},
        "labels": {
            "background": 0,
            "whole tumor": [1, 2, 3],
            "tumor core": [2, 3],
            "enhancing tumor": [3],
        },
        "regions_class_order": [1, 2, 3],
        "file_ending": ".nii.gz",
    },
}
TASKS["hippocampus_mha"] = {
    **TASKS["hippocampus"],
    "folder": "Dataset906_SynthHippocampusMha",
    "file_ending": ".mha",
}
"""The generated tasks by name (module docstring)."""


def read_task_manifest(root: str | os.PathLike) -> dict | None:
    """The ``dataset.json`` at ``root`` if this generator wrote it, else None."""
    try:
        content = json.loads((Path(root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("generator") == GENERATOR else None


def _write_task(folder: Path, task: str, num_cases: int, num_test: int, seed: int) -> None:
    spec = TASKS[task]
    rng = np.random.default_rng(seed)
    make: Callable = spec["make"]
    ending = spec["file_ending"]
    v1 = task.endswith("_v1")
    training = []
    for index in range(num_cases + num_test):
        shape = spec["shapes"][index % len(spec["shapes"])]
        images, label = make(rng, shape)
        test = index >= num_cases
        case = f"{task.split('_')[0]}_{index:03d}"
        geometry = (spec["spacing"], spec["origin"], spec["direction"])
        images_dir = folder / ("imagesTs" if test else "imagesTr")
        if v1:
            _write(np.stack(images).astype(np.float32), images_dir / f"{case}{ending}", *geometry)
            if not test:
                training.append(
                    {"image": f"./imagesTr/{case}{ending}", "label": f"./labelsTr/{case}{ending}"}
                )
        else:
            for channel, image in enumerate(images):
                _write(image, images_dir / f"{case}_{channel:04d}{ending}", *geometry)
        target = folder / ("labelsTs" if test else "labelsTr") / f"{case}{ending}"
        _write(label, target, *geometry)
    manifest: dict = {"generator": GENERATOR, "task": task, "num_cases": num_cases, "seed": seed}
    if v1:
        manifest.update(
            name=spec["folder"],
            modality=spec["channels"],
            labels=spec["labels"],
            numTraining=num_cases,
            numTest=num_test,
            training=training,
            test=[f"./imagesTs/{task.split('_')[0]}_{i:03d}{ending}" for i in
                  range(num_cases, num_cases + num_test)],
        )  # fmt: skip
    else:
        manifest.update(
            channel_names=spec["channels"],
            labels=spec["labels"],
            numTraining=num_cases,
            file_ending=ending,
        )
        if "regions_class_order" in spec:
            manifest["regions_class_order"] = spec["regions_class_order"]
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")


def make_task(
    root: str | os.PathLike, task: str, num_cases: int = 8, num_test: int = 2, seed: int = 0
) -> Path:
    """Write the generated ``task`` (:data:`TASKS`) at ``root``, unless it is already there.

    Training cases go to ``imagesTr`` / ``labelsTr``, ``num_test`` more to ``imagesTs`` with
    their truth in ``labelsTs`` (for evaluating predictions).

    Raises:
        ConfigError: an unknown task or fewer than 2 cases.
        DataError: ``root`` holds another dataset (another task, number of cases or seed).
    """
    if task not in TASKS:
        raise ConfigError(f"data.generate must be one of {', '.join(TASKS)}, got {task!r}")
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 2:
        raise ConfigError(f"data.num_cases must be an int >= 2, got {num_cases!r}")
    root = Path(root)
    wanted = {"task": task, "num_cases": num_cases, "seed": seed}

    def complete() -> bool:
        manifest = read_task_manifest(root)
        return manifest is not None and all(manifest.get(k) == v for k, v in wanted.items())

    if complete():
        return root
    if root.exists() and any(root.iterdir()):
        manifest = read_task_manifest(root) or {}
        found = {k: manifest.get(k) for k in wanted}
        raise DataError(
            f"data.root: {root} holds {found if manifest else 'other files'}, not the generated "
            f"{wanted}; delete it or choose another data.root"
        )
    return publish_folder(
        root, lambda folder: _write_task(folder, task, num_cases, num_test, seed), complete
    )
