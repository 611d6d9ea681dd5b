"""Whole-volume prediction written back as NIfTI label maps on the input's own grid.

A trained run is rebuilt from its checkpoint alone (the resolved config is stored in it). A case is
read and preprocessed exactly as in validation (brain bounding box, z-score, centre crop/pad to
``data.crop_size``) with MONAI recording every crop and pad; the predicted regions are put back
through the inverse of those operations, so the label map has the input's shape, and is written
with the input's affine and header, in the dataset's own label convention (BraTS 2018-2021:
0/1/2/4, 2023+: 0/1/2/3, MSD: 1 oedema, 2 non-enhancing, 3 enhancing).

With ``sliding_window`` the brain's bounding box is not cropped or padded to a fixed size but
covered by MONAI's :func:`~monai.inferers.sliding_window_inference` with windows of ``roi_size``
(for volumes that do not fit in memory at once).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from omegaconf import DictConfig, OmegaConf

from revseg.data.layouts import CaseFiles, Discovery, discover, find_case
from revseg.data.transforms import build_transforms, regions_to_label
from revseg.errors import ConfigError, DataError

__all__ = ["Predictor", "load_run", "output_paths", "predict", "write_label_map"]

log = logging.getLogger(__name__)


def load_run(
    run: str | os.PathLike, checkpoint: str = "best", device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, DictConfig]:
    """Rebuild a trained model from ``<run>/checkpoints/<checkpoint>.pt`` (or a checkpoint path).

    Returns:
        ``(model in eval mode on device, the run's resolved config)``.

    Raises:
        DataError: no run directory or checkpoint, or an unreadable one.
    """
    from hydra.utils import instantiate

    from revseg.training.checkpoint import load_checkpoint

    run = Path(run)
    if checkpoint in ("best", "last"):
        if not run.is_dir():
            raise DataError(f"run: not a run directory: {run}")
        path = run / "checkpoints" / f"{checkpoint}.pt"
    else:
        path = Path(checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    cfg = OmegaConf.create(state["config"])
    model = instantiate(cfg.model, _convert_="all")
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def write_label_map(
    label: np.ndarray, reference: str | os.PathLike, path: str | os.PathLike
) -> Path:
    """Write ``label`` (X, Y, Z) as a uint8 NIfTI file with ``reference``'s affine and header.

    The qform and sform (and their codes), units and orientation of the reference are kept; a 4D
    reference (MSD) gives a 3D header of its first three axes.

    Raises:
        DataError: ``label``'s shape is not the reference's spatial shape.
    """
    ref = nib.load(os.fspath(reference))
    if tuple(label.shape) != tuple(ref.shape[:3]):
        raise DataError(f"{reference}: prediction shape {label.shape} != image shape {ref.shape}")
    header = ref.header.copy()
    image = nib.Nifti1Image(np.asarray(label, dtype=np.uint8), ref.affine, header)
    image.set_data_dtype(np.uint8)
    image.set_qform(ref.header.get_qform(), code=int(ref.header["qform_code"]))
    image.set_sform(ref.header.get_sform(), code=int(ref.header["sform_code"]))
    image.header["cal_min"], image.header["cal_max"] = 0, float(label.max(initial=0))
    image.header["descrip"] = b"revseg prediction"
    image.header["intent_code"] = 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


@dataclass
class Predictor:
    """Predicts label maps of cases with a trained model.

    Args:
        model: ``(1, 4, D, H, W)`` -> region logits ``(1, 3, D, H, W)`` (WT, TC, ET).
        crop_size: the training ``data.crop_size`` (whole-volume inference).
        reader: ``"nibabel"`` or ``"simpleitk"``.
        device: where the model runs.
        sliding_window: sliding-window inference over the brain's bounding box.
        roi_size: window size for ``sliding_window``.
        overlap: window overlap in (0, 1).
        sw_batch_size: windows per forward pass.
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        threshold: probability threshold of the sigmoid outputs.
    """

    model: torch.nn.Module
    crop_size: Sequence[int]
    reader: str = "nibabel"
    device: torch.device | str = "cpu"
    sliding_window: bool = False
    roi_size: Sequence[int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 1
    mode: str = "gaussian"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.sliding_window and not self.roi_size:
            raise ConfigError("predict.roi_size must be set for predict.sliding_window=true")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"predict.overlap must be in [0, 1), got {self.overlap}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"predict.threshold must be in (0, 1), got {self.threshold}")

    @torch.no_grad()
    def regions(self, case: CaseFiles, channel_order: Sequence[int] | None = None) -> np.ndarray:
        """Predicted regions ``(3, X, Y, Z)`` bool (WT, TC, ET) on the grid of the case's files."""
        pipeline = build_transforms(
            train=False,
            crop_size=None if self.sliding_window else tuple(self.crop_size),
            reader=self.reader,
            with_label=False,
            track_meta=True,
            channel_order=channel_order,
        )
        image = pipeline({"image": case.item()["image"]})["image"]
        inputs = image.as_tensor()[None].to(self.device)
        if self.sliding_window:
            logits = sliding_window_inference(
                inputs,
                roi_size=tuple(self.roi_size),
                sw_batch_size=self.sw_batch_size,
                predictor=self.model,
                overlap=self.overlap,
                mode=self.mode,
            )
        else:
            logits = self.model(inputs)
        inside = (torch.sigmoid(torch.as_tensor(logits)[0]) > self.threshold).float().cpu()
        pred = MetaTensor(inside, meta=dict(image.meta))
        pred.applied_operations = list(image.applied_operations)
        back = pipeline.inverse({"image": pred})["image"]  # undo pad/crop and the brain crop
        return torch.as_tensor(back).numpy() > 0.5

    def label_map(self, found: Discovery, case: CaseFiles) -> np.ndarray:
        """The predicted label map ``(X, Y, Z)`` in the convention of the case's layout."""
        c = found.layout.convention
        return regions_to_label(
            self.regions(case, found.channel_order), c.enhancing, c.necrotic, c.oedema
        )


def _is_nifti_name(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def output_paths(cases: Sequence[CaseFiles], output: str | os.PathLike, single: bool) -> list[Path]:
    """Where each case's label map goes: ``output`` itself for one case given as a file name,
    else ``output/<case>.nii.gz``.

    Raises:
        ConfigError: a dataset root with ``output`` naming a file.
    """
    output = Path(output)
    if _is_nifti_name(output):
        if not single:
            raise ConfigError(
                f"output={output}: a dataset root gives one file per case; give a folder"
            )
        return [output]
    return [output / f"{case.case}.nii.gz" for case in cases]


def _select(found: Discovery, run: Path, which: str) -> list[CaseFiles]:
    if which == "all":
        return found.cases
    if which not in ("train", "val"):
        raise ConfigError(f"predict.cases must be all, train or val, got {which!r}")
    path = run / "split.json"
    try:
        ids = set(json.loads(path.read_text())[which])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"predict.cases={which}: cannot read the split from {path}") from None
    cases = [case for case in found.cases if case.case in ids]
    if len(cases) != len(ids):
        log.warning(
            "%d of the run's %s cases are not in %s", len(ids) - len(cases), which, found.root
        )
    return cases


def resolve_input(path: str | os.PathLike, layout: str = "auto") -> tuple[Discovery, bool]:
    """The cases of ``path`` (a case folder, an image file or a dataset root) and whether it is
    a single case."""
    path = Path(path)
    try:
        return find_case(path, layout), True
    except DataError:
        if not path.is_dir():
            raise
    try:
        return discover(path, layout), False
    except DataError:
        raise DataError(
            f"input: {path} is neither a case folder, an image file nor a dataset root of a known "
            "layout"
        ) from None


def predict(
    run: str | os.PathLike,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    layout: str = "auto",
    reader: str | None = None,
    sliding_window: bool = False,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    threshold: float = 0.5,
    cases: str = "all",
) -> list[dict[str, Any]]:
    """Predict every case of ``input`` with the run's model and write NIfTI label maps.

    Args:
        run: the run directory (``<run>/checkpoints/best.pt``).
        input: a case folder, an image file (a case's modality file or a 4D MSD image) or a
            dataset root.
        output: a ``.nii.gz`` file (one case) or a folder (``<case>.nii.gz`` per case).
        checkpoint: ``best``, ``last`` or a checkpoint path.
        device: ``auto``, ``cpu``, ``cuda``...
        layout: the input's layout (``auto``: detected); decides the label convention.
        reader: None: the run's ``data.reader``.
        sliding_window: sliding-window inference; ``roi_size`` None: the run's ``data.patch_size``
            or else ``data.crop_size``.
        overlap, sw_batch_size, mode: sliding-window settings.
        threshold: sigmoid threshold.
        cases: for a dataset root: ``all``, or the run's ``train`` / ``val`` cases (``split.json``).

    Returns:
        One record per case: ``{"case", "output", "seconds", "shape"}``.
    """
    from revseg.device import resolve_device

    torch_device = resolve_device(device, "predict.device")
    found, single = resolve_input(input, layout)
    selected = found.cases if single else _select(found, Path(run), cases)
    for case in selected:  # every image must be there (a missing segmentation is fine)
        absent = [(what, path) for what, path in case.missing if what != "seg"]
        if absent:
            what, path = absent[0]
            raise DataError(f"input: case {case.case} has no {what} image: {path} not found")
    paths = output_paths(selected, output, single)
    model, cfg = load_run(run, checkpoint, torch_device)
    data = cfg.get("data") or {}
    crop = list(data.get("crop_size") or (160, 192, 160))
    predictor = Predictor(
        model,
        crop_size=crop,
        reader=reader or data.get("reader", "nibabel"),
        device=torch_device,
        sliding_window=sliding_window,
        roi_size=list(roi_size or data.get("patch_size") or crop),
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        mode=mode,
        threshold=threshold,
    )
    records = []
    for case, path in zip(selected, paths):
        start = time.perf_counter()
        label = predictor.label_map(found, case)
        write_label_map(label, case.image[0], path)
        seconds = time.perf_counter() - start
        log.info("%s -> %s (%.1f s)", case.case, path, seconds)
        records.append(
            {"case": case.case, "output": os.fspath(path), "seconds": seconds, "shape": label.shape}
        )
    return records
