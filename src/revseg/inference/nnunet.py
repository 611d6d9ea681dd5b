"""Prediction and evaluation for nnU-Net-format datasets, in the dataset's own convention.

:func:`predict_folder` predicts every case of an images folder (``imagesTs``:
``{case}_{XXXX}{file_ending}``, or the Decathlon's 4D ``{case}.nii.gz``) with a run trained on
``data=nnunet`` (or an ensemble of such runs, averaging their probabilities), and writes
``{case}{file_ending}`` with the input's size, spacing, origin and direction and the dataset's
label values (region-based: each region's ``regions_class_order`` value painted in order, as
nnU-Net does). Cases are read and normalised as in training (the run's ``split.json`` keeps the
dataset's description and CT statistics) and covered by MONAI's sliding-window inference with
windows of the training size (a case smaller than that is padded). A run trained with
``data.spacing`` predicts each case resampled to that spacing (its saved config's value;
``median`` as resolved in training, kept in ``split.json``) and its probabilities are resampled
back (trilinear) to the case's own grid before the labels are taken.

:func:`evaluate_folder` scores predictions against a ``labelsTr`` folder per label (or region),
named as in ``dataset.json``: Dice, IoU and HD95 in mm (:mod:`revseg.metrics.labels`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Resize
from omegaconf import DictConfig

from revseg.data.nnunet import DatasetSpec, NnUNetCase, find_images, header, read_spec
from revseg.data.nnunet_data import build_nnunet_transforms, spacing_option
from revseg.errors import ConfigError, DataError
from revseg.inference.prediction import load_runs, mirrored, run_dirs
from revseg.metrics.labels import label_case_metrics, summarize_labels

__all__ = [
    "evaluate_folder",
    "is_nnunet_run",
    "nnunet_truth_spec",
    "predict_folder",
    "spacing_from_run",
    "spec_from_run",
    "to_label_map",
    "write_evaluation",
    "write_like",
]


def _split(run: Path) -> dict[str, Any]:
    path = run / "split.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(f"run: cannot read {path} (written by every training run)") from None


def is_nnunet_run(run: str | os.PathLike | Sequence[str | os.PathLike]) -> bool:
    """Whether the (first) run trained on an nnU-Net-format dataset (its ``split.json`` says)."""
    first = run_dirs(run if isinstance(run, (str, os.PathLike)) else list(run))[0]
    try:
        return "dataset" in json.loads((first / "split.json").read_text())
    except (OSError, ValueError):
        return False


def spec_from_run(run: Path) -> tuple[DatasetSpec, dict[str, Any]]:
    """The dataset description a run kept, and its ``split.json``."""
    split = _split(run)
    d = split.get("dataset")
    if not isinstance(d, dict):
        raise DataError(f"run: {run / 'split.json'} has no nnU-Net dataset description")
    values = tuple(tuple(v) if isinstance(v, list) else v for v in d["label_values"])
    order = d.get("regions_class_order")
    spec = DatasetSpec(
        Path(split.get("root", run)),
        int(d["version"]),
        tuple(d["channel_names"]),
        tuple(d["label_names"]),
        values,
        bool(d["region_based"]),
        None if order is None else tuple(order),
        str(d["file_ending"]),
        0,
    )
    return spec, split


def spacing_from_run(cfg: DictConfig, split: dict[str, Any]) -> tuple[float, ...] | None:
    """The spacing a run's cases were resampled to: its config's ``data.spacing`` (``median``:
    the value resolved in training, kept in ``split.json``), or None.

    Raises:
        DataError: a bad ``data.spacing`` in the run's config, or ``median`` without its value
            in ``split.json``.
    """
    try:
        value = spacing_option((cfg.get("data") or {}).get("spacing"))
    except ConfigError as error:
        raise DataError(f"run: its config's {error}") from None
    if value != "median":
        return value  # type: ignore[return-value]
    recorded = split.get("spacing")
    if not isinstance(recorded, list) or len(recorded) != 3:
        raise DataError("run: data.spacing=median but split.json does not record its value")
    return tuple(float(v) for v in recorded)


def to_label_map(probabilities: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """``(C, X, Y, Z)`` probabilities -> ``(X, Y, Z)`` label values of the dataset."""
    if not spec.region_based:
        values = np.asarray(spec.label_values)
        return values[probabilities.argmax(0)]
    label = np.zeros(probabilities.shape[1:], dtype=np.int64)
    for channel, value in enumerate(spec.regions_class_order or ()):
        label[probabilities[channel] > 0.5] = value
    return label


def write_like(label: np.ndarray, reference: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write ``label`` ``(X, Y, Z)`` with the spacing, origin and direction of ``reference``'s
    first three axes (a 4D Decathlon image gives a 3D label map), in the format of ``path``'s
    ending (uint8, or uint16 for values above 255)."""
    ref = header(reference)
    if tuple(label.shape) != ref.shape:
        raise DataError(f"{reference}: prediction shape {label.shape} != image shape {ref.shape}")
    dtype = np.uint8 if int(label.max(initial=0)) < 256 else np.uint16
    image = sitk.GetImageFromArray(np.ascontiguousarray(label.astype(dtype).T))
    image.SetSpacing(ref.spacing)
    image.SetOrigin(ref.origin)
    image.SetDirection(ref.direction)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, os.fspath(path), useCompression=True)
    return path


class _Member:
    """One run of an ensemble: its model, its preprocessing and its window size."""

    def __init__(
        self, run: Path, model: torch.nn.Module, cfg: DictConfig, device: torch.device
    ) -> None:
        self.spec, split = spec_from_run(run)
        self.model, self.device = model, device
        self.window = tuple(split["sample_size"])
        self.spacing = spacing_from_run(cfg, split)
        self.pipeline = build_nnunet_transforms(
            self.spec,
            split.get("ct_stats") or {},
            None,
            train=False,
            with_label=False,
            spacing=self.spacing,
        )

    def _probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(
            inputs, self.window, 1, self.model, overlap=0.5, mode="gaussian"
        )
        logits = torch.as_tensor(logits).float()
        return torch.sigmoid(logits) if self.spec.region_based else torch.softmax(logits, 1)

    @torch.no_grad()
    def probabilities(self, case: NnUNetCase, tta: bool) -> np.ndarray:
        """``(C, X, Y, Z)`` on the case's own grid (resampled back from the run's spacing)."""
        image = self.pipeline({"image": list(case.image)})["image"]
        inputs = torch.as_tensor(image)[None].to(self.device)
        if tta:
            probabilities = mirrored(self._probabilities, inputs)[0].cpu()
        else:
            probabilities = self._probabilities(inputs)[0].cpu()
        if self.spacing is not None:  # back from the run's grid to the case's own
            shape = header(case.image[0]).shape
            if tuple(probabilities.shape[1:]) != tuple(shape):
                probabilities = torch.as_tensor(Resize(shape, mode="trilinear")(probabilities))
        return probabilities.numpy()


def predict_folder(
    run: str | os.PathLike | Sequence[str | os.PathLike],
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    tta: bool = False,
) -> list[dict[str, Any]]:
    """Predict every case of the images folder ``input`` into ``output/{case}{file_ending}``.

    Args:
        run: a run directory trained with ``data=nnunet``, a list of them, or a folder of runs
            (an ensemble: the mean of their probabilities).
        input: ``imagesTs`` (or any folder of images named as ``imagesTr``).
        output: the folder written.
        checkpoint: ``best``, ``last`` or a checkpoint path (one run).
        device: ``auto``, ``cpu``, ``cuda``...
        tta: mean over the 8 mirrorings (nnU-Net's test-time augmentation).

    Returns:
        One record per case: ``{"case", "output", "seconds", "shape", "runs", "et_relabelled"}``.

    Raises:
        DataError: a run without its dataset description, runs of different datasets, an input
            folder without the dataset's files, or a case missing a channel.
    """
    from revseg.device import resolve_device

    torch_device = resolve_device(device, "predict.device")
    runs = run_dirs(run if isinstance(run, (str, os.PathLike)) else list(run))
    members = [
        _Member(r, model, cfg, torch_device)
        for r, (model, cfg) in zip(runs, load_runs(runs, checkpoint, torch_device))
    ]
    spec = members[0].spec
    for r, member in zip(runs[1:], members[1:]):
        if member.spec.to_dict() != spec.to_dict():
            raise DataError(f"run: {r} was trained on another dataset than {runs[0]}")
    if Path(output).name.endswith(spec.file_ending):
        raise DataError(f"output={output}: give a folder (one {spec.file_ending} file per case)")
    records = []
    for case in find_images(input, spec):
        start = time.perf_counter()
        probabilities = np.mean([m.probabilities(case, tta) for m in members], axis=0)
        label = to_label_map(probabilities, spec)
        path = write_like(label, case.image[0], Path(output) / f"{case.case}{spec.file_ending}")
        records.append(
            {
                "case": case.case,
                "output": os.fspath(path),
                "seconds": time.perf_counter() - start,
                "shape": label.shape,
                "runs": len(members),
                "et_relabelled": 0,
            }
        )
    return records


def nnunet_truth_spec(truth: str | os.PathLike) -> DatasetSpec | None:
    """The dataset of a ``labelsTr`` (or ``labelsTs``) folder: its parent's ``dataset.json``,
    or None when the folder is not one of an nnU-Net dataset.

    Raises:
        DataError: an nnU-Net ``dataset.json`` with a bad key (:func:`read_spec`).
    """
    truth = Path(truth)
    path = truth.parent / "dataset.json"
    if not truth.is_dir() or not truth.name.startswith("labels") or not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = content.keys() if isinstance(content, dict) else ()
    if "labels" not in keys or not {"channel_names", "modality"} & set(keys):
        return None  # not an nnU-Net description (e.g. a generated BraTS set's manifest)
    return read_spec(truth.parent)


def _read_label(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    image = sitk.ReadImage(os.fspath(path))
    return np.rint(sitk.GetArrayFromImage(image).T).astype(np.int64), tuple(image.GetSpacing())


def _masks(label: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """``(L, X, Y, Z)`` bool: one mask per scored label (foreground labels, or regions)."""
    if spec.region_based:
        return np.stack([np.isin(label, v) for v in spec.label_values])
    return np.stack([label == v for v in spec.label_values[1:]])


def evaluate_folder(
    pred: str | os.PathLike, truth: str | os.PathLike, spec: DatasetSpec, hd: bool = True
) -> tuple[dict[str, dict[str, float]], list[str], list[str]]:
    """Score ``pred/{case}{file_ending}`` against ``truth/{case}{file_ending}`` per label.

    Returns:
        ``(per_case, missing, unmatched)``: the metrics of each truth case (a case without a
        prediction is scored as an empty prediction, Dice 0), the cases without a prediction,
        and the prediction files that match no truth case.

    Raises:
        DataError: a folder without label files, a prediction whose shape differs from its
            truth, or label values that ``dataset.json`` does not list (naming the file).
    """
    pred, truth = Path(pred), Path(truth)
    ending = spec.file_ending
    if not pred.is_dir():
        raise DataError(f"pred: {pred} is not a folder")
    truths = sorted(p for p in truth.iterdir() if p.name.endswith(ending))
    if not truths:
        raise DataError(f"truth: no file ends with file_ending '{ending}' in {truth}")
    preds = {p.name: p for p in pred.iterdir() if p.name.endswith(ending)}
    unmatched = sorted(n for n in preds if not (truth / n).is_file())
    per_case, missing = {}, []
    names = spec.foreground_names
    for path in truths:
        case = path.name[: -len(ending)]
        label, spacing = _read_label(path)
        truth_masks = _masks(label, spec)
        if path.name in preds:
            predicted, _ = _read_label(preds[path.name])
            if predicted.shape != label.shape:
                raise DataError(f"{preds[path.name]}: shape {predicted.shape} != {label.shape}")
            unknown = sorted(set(np.unique(predicted).tolist()) - set(spec.values))
            if unknown:
                raise DataError(f"{preds[path.name]}: label values {unknown} not in dataset.json")
            pred_masks = _masks(predicted, spec)
        else:
            missing.append(case)
            pred_masks = np.zeros_like(truth_masks)
        per_case[case] = label_case_metrics(pred_masks, truth_masks, names, spacing, hd=hd)
    return per_case, missing, unmatched


def write_evaluation(
    per_case: dict[str, dict[str, float]], output: str | os.PathLike, extra: dict[str, Any]
) -> list[Path]:
    """``metrics.json`` (per case and mean) and ``summary.csv`` (mean per metric) in ``output``."""
    from revseg.files import write_text_atomic

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    mean = summarize_labels(per_case)
    content = {**extra, "mean": mean, "cases": per_case}
    written = [
        write_text_atomic(json.dumps(content, indent=2) + "\n", output / "metrics.json"),
        write_text_atomic(
            "metric,value\n" + "".join(f"{k},{v}\n" for k, v in mean.items()),
            output / "summary.csv",
        ),
    ]
    return written
