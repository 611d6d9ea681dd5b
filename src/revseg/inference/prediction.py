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

As nnU-Net does (Isensee et al. 2021), ``tta`` averages the sigmoid probabilities over the 8
mirrorings of the three spatial axes (each flipped back), and an :class:`Ensemble` of several runs
(e.g. the folds of a cross-validation) averages the runs' probabilities on the input's grid before
the threshold; :mod:`revseg.inference.postprocessing` may then relabel small enhancing tumour.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from omegaconf import DictConfig, OmegaConf

from revseg.data.layouts import CaseFiles, Discovery, Layout, discover, find_case
from revseg.data.transforms import build_transforms, regions_to_label
from revseg.errors import ConfigError, DataError
from revseg.inference.postprocessing import check_et_min, relabel_small_enhancing

__all__ = [
    "MIRRORS",
    "Ensemble",
    "Predictor",
    "load_run",
    "load_runs",
    "mirrored",
    "output_paths",
    "predict",
    "run_dirs",
    "write_label_map",
]

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


def run_dirs(run: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The run directories of ``run``: one run, a list of runs, or a folder whose sub-folders are
    runs (a Hydra multirun such as ``make train-folds``: every sub-folder with a checkpoint,
    sorted).

    Raises:
        ConfigError: an empty list.
    """
    if not isinstance(run, (str, os.PathLike)):
        runs = [Path(r) for r in run]
        if not runs:
            raise ConfigError("run: an empty list; give a run directory or a list of them")
        return runs
    run = Path(run)
    if run.is_dir() and not (run / "checkpoints").is_dir():
        found = sorted(d for d in run.iterdir() if (d / "checkpoints").is_dir())
        if found:
            log.info("run: %d runs in %s: %s", len(found), run, ", ".join(d.name for d in found))
            return found
    return [run]


def _task(cfg: DictConfig) -> dict[str, Any]:
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    return {
        "data._target_": data.get("_target_"),
        "model.in_channels": model.get("in_channels"),
        "model.out_channels": model.get("out_channels"),
    }


def load_runs(
    runs: Sequence[str | os.PathLike], checkpoint: str = "best", device: torch.device | str = "cpu"
) -> list[tuple[torch.nn.Module, DictConfig]]:
    """:func:`load_run` for each run of an ensemble, checking that they solve the same task.

    Raises:
        ConfigError: a checkpoint file given for several runs, or runs whose data module or
            model input / output channels differ (naming both runs and the key).
        DataError: as :func:`load_run`.
    """
    if len(runs) > 1 and checkpoint not in ("best", "last"):
        raise ConfigError(
            f"predict.checkpoint={checkpoint}: one file for {len(runs)} runs; give best or last"
        )
    loaded = [load_run(run, checkpoint, device) for run in runs]
    first = _task(loaded[0][1])
    for run, (_, cfg) in zip(runs[1:], loaded[1:]):
        for key, value in _task(cfg).items():
            if value != first[key]:
                raise ConfigError(
                    f"run: {run} does not match {runs[0]}: {key} {value} != {first[key]} "
                    "(an ensemble needs runs of the same task)"
                )
    return loaded


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


MIRRORS: tuple[tuple[int, ...], ...] = tuple(
    axes for k in range(4) for axes in itertools.combinations((2, 3, 4), k)
)
"""The 8 mirrorings of test-time augmentation: the subsets of the spatial dims of ``(B, C, D, H,
W)``, the identity first."""


def mirrored(
    probabilities: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    """Mean of ``probabilities`` over the :data:`MIRRORS` of ``inputs``, each flipped back.

    Args:
        probabilities: ``(B, C_in, D, H, W)`` -> ``(B, C_out, D, H, W)``.
        inputs: ``(B, C_in, D, H, W)``.
    """
    total = probabilities(inputs)
    for axes in MIRRORS[1:]:
        total = total + probabilities(inputs.flip(axes)).flip(axes)
    return total / len(MIRRORS)


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
        tta: test-time augmentation: the mean of the 8 mirrorings (:func:`mirrored`).
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
    tta: bool = False

    def __post_init__(self) -> None:
        if self.sliding_window and not self.roi_size:
            raise ConfigError("predict.roi_size must be set for predict.sliding_window=true")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"predict.overlap must be in [0, 1), got {self.overlap}")
        _check_threshold(self.threshold)

    def _probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities ``(1, 3, D, H, W)`` of the preprocessed ``inputs``."""
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
        return torch.sigmoid(torch.as_tensor(logits).float())

    def preprocessing(self) -> tuple:
        """What this predictor's preprocessing depends on: predictors with equal keys read and
        prepare a case the same way (an :class:`Ensemble` does it once for them)."""
        crop = None if self.sliding_window else tuple(self.crop_size)
        return self.sliding_window, crop, self.reader

    def prepared(self, case: CaseFiles, channel_order: Sequence[int] | None = None) -> tuple:
        """``(pipeline, image)``: the case read and preprocessed as this predictor's model saw its
        training data (the pipeline also maps predictions back, :func:`on_case_grid`)."""
        _, crop, reader = self.preprocessing()
        pipeline = build_transforms(
            train=False,
            crop_size=crop,
            reader=reader,
            with_label=False,
            track_meta=True,
            channel_order=channel_order,
        )
        return pipeline, pipeline({"image": case.item()["image"]})["image"]

    @torch.no_grad()
    def grid_probabilities(self, image: MetaTensor) -> torch.Tensor:
        """Region probabilities ``(3, D, H, W)`` on the preprocessed grid of ``image``."""
        inputs = image.as_tensor()[None].to(self.device)
        if self.tta:
            return mirrored(self._probabilities, inputs)[0].cpu()
        return self._probabilities(inputs)[0].cpu()

    def probabilities(
        self, case: CaseFiles, channel_order: Sequence[int] | None = None
    ) -> np.ndarray:
        """Region probabilities ``(3, X, Y, Z)`` float32 (WT, TC, ET) on the grid of the case's
        files (0 outside the brain's bounding box and the crop)."""
        pipeline, image = self.prepared(case, channel_order)
        return on_case_grid(pipeline, image, self.grid_probabilities(image))

    def regions(self, case: CaseFiles, channel_order: Sequence[int] | None = None) -> np.ndarray:
        """Predicted regions ``(3, X, Y, Z)`` bool (WT, TC, ET) on the grid of the case's files."""
        return self.probabilities(case, channel_order) > self.threshold

    def label_map(self, found: Discovery, case: CaseFiles) -> np.ndarray:
        """The predicted label map ``(X, Y, Z)`` in the convention of the case's layout."""
        c = found.layout.convention
        return regions_to_label(
            self.regions(case, found.channel_order), c.enhancing, c.necrotic, c.oedema
        )


def on_case_grid(pipeline: Any, image: MetaTensor, probabilities: torch.Tensor) -> np.ndarray:
    """``probabilities`` ``(3, D, H, W)`` on ``image``'s preprocessed grid, mapped back to the
    grid of the case's files by ``pipeline``'s inverse (the crop and pad undone: a copy, zeros
    outside), as float32."""
    pred = MetaTensor(probabilities, meta=dict(image.meta))
    pred.applied_operations = list(image.applied_operations)
    back = pipeline.inverse({"image": pred})["image"]  # undo pad/crop and the brain crop
    return torch.as_tensor(back).numpy().astype(np.float32, copy=False)


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"predict.threshold must be in (0, 1), got {threshold}")


@dataclass
class Ensemble:
    """Label maps from the mean probabilities of several predictors (runs, the folds of a
    cross-validation; one predictor is a plain prediction), thresholded, then post-processed.

    Args:
        predictors: one per run; each preprocesses with its own run's settings.
        threshold: probability threshold of the mean probabilities.
        et_min_voxels: enhancing tumour below this many voxels becomes tumour core (0: off; see
            :func:`~revseg.inference.postprocessing.relabel_small_enhancing`).
        et_min_mode: ``"total"`` or ``"component"``.
    """

    predictors: Sequence[Predictor]
    threshold: float = 0.5
    et_min_voxels: int = 0
    et_min_mode: str = "total"

    def __post_init__(self) -> None:
        if not self.predictors:
            raise ConfigError("run: no run to predict with")
        _check_threshold(self.threshold)
        check_et_min(self.et_min_voxels, self.et_min_mode)

    def probabilities(
        self,
        case: CaseFiles,
        channel_order: Sequence[int] | None = None,
        members: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Mean region probabilities ``(3, X, Y, Z)`` of the ``members`` (indices of
        ``predictors``; None: all) on the grid of the case's files."""
        members = range(len(self.predictors)) if members is None else members
        # the case is read and preprocessed once per preprocessing (the folds of a
        # cross-validation share one); the sum is taken on that grid and mapped back once (the
        # inverse only crops and pads, so this equals summing the mapped-back probabilities)
        groups: dict[tuple, list[Predictor]] = {}
        for i in members:
            predictor = self.predictors[i]
            groups.setdefault(predictor.preprocessing(), []).append(predictor)
        total: np.ndarray | None = None
        for predictors in groups.values():
            pipeline, image = predictors[0].prepared(case, channel_order)
            grid: torch.Tensor | None = None
            for predictor in predictors:
                p = predictor.grid_probabilities(image)
                grid = p if grid is None else grid + p
            back = on_case_grid(pipeline, image, grid)
            total = back if total is None else total + back
        if total is None:
            raise ValueError("members must name at least one predictor")
        return total / len(members)

    def predict_case(
        self, found: Discovery, case: CaseFiles, members: Sequence[int] | None = None
    ) -> tuple[np.ndarray, int]:
        """``(label map (X, Y, Z) in the case's convention, ET voxels relabelled)``."""
        regions = self.probabilities(case, found.channel_order, members) > self.threshold
        regions, relabelled = relabel_small_enhancing(regions, self.et_min_voxels, self.et_min_mode)
        c = found.layout.convention
        return regions_to_label(regions, c.enhancing, c.necrotic, c.oedema), relabelled


def _is_nifti_name(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def output_paths(
    cases: Sequence[CaseFiles], output: str | os.PathLike, single: bool, layout: Layout
) -> list[Path]:
    """Where each case's label map goes: ``output`` itself for one case given as a file name,
    else ``output/`` and the case's submission name in ``layout`` (``<case>.nii.gz``).

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
    return [output / layout.submission_name(case.case) for case in cases]


def _select(
    found: Discovery, runs: Sequence[Path], which: str
) -> list[tuple[CaseFiles, list[int]]]:
    """The cases to predict, each with the indices of the runs that predict it: every run for
    ``all``; for ``train`` / ``val`` the runs whose ``split.json`` lists the case there (for the
    folds of a cross-validation and ``val``: each case by the one fold that did not train on it)."""
    if which == "all":
        return [(case, list(range(len(runs)))) for case in found.cases]
    if which not in ("train", "val"):
        raise ConfigError(f"predict.cases must be all, train or val, got {which!r}")
    members: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        path = run / "split.json"
        try:
            ids = json.loads(path.read_text())[which]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"predict.cases={which}: cannot read the split from {path}") from None
        for case_id in ids:
            members.setdefault(case_id, []).append(i)
    selected = [(case, members[case.case]) for case in found.cases if case.case in members]
    if len(selected) != len(members):
        log.warning(
            "%d of the runs' %s cases are not in %s",
            len(members) - len(selected),
            which,
            found.root,
        )
    return selected


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
    run: str | os.PathLike | Sequence[str | os.PathLike],
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
    tta: bool = False,
    et_min_voxels: int = 0,
    et_min_mode: str = "total",
    submission: bool = False,
) -> list[dict[str, Any]]:
    """Predict every case of ``input`` with the run's model (or the mean of several runs') and
    write NIfTI label maps.

    Args:
        run: the run directory (``<run>/checkpoints/best.pt``), a list of them (an ensemble), or
            a folder of runs (a multirun, e.g. ``make train-folds``: all its runs).
        input: a case folder, an image file (a case's modality file or a 4D MSD image) or a
            dataset root.
        output: a ``.nii.gz`` file (one case) or a folder (``<case>.nii.gz`` per case).
        checkpoint: ``best``, ``last`` or a checkpoint path (one run only).
        device: ``auto``, ``cpu``, ``cuda``...
        layout: the input's layout (``auto``: detected); decides the label convention.
        reader: None: each run's ``data.reader``.
        sliding_window: sliding-window inference; ``roi_size`` None: each run's
            ``data.patch_size`` or else ``data.crop_size``.
        overlap, sw_batch_size, mode: sliding-window settings.
        threshold: threshold of the (mean) sigmoid probabilities.
        cases: for a dataset root: ``all``, or the runs' ``train`` / ``val`` cases
            (``split.json``; with several runs each case is predicted by the runs that list it).
        tta: test-time augmentation by mirroring (8 forward passes per run).
        et_min_voxels, et_min_mode: BraTS post-processing (:mod:`revseg.inference.postprocessing`).
        submission: write a challenge submission folder (``output`` a folder; the files are
            checked by :func:`revseg.inference.submission.check_submission` afterwards).

    Returns:
        One record per case: ``{"case", "output", "seconds", "shape", "runs", "et_relabelled"}``.

    Raises:
        SubmissionError: ``submission`` and a written file fails the checks (one problem per
            file in ``problems``).
    """
    from revseg.device import resolve_device
    from revseg.inference.submission import check_submission

    _check_threshold(threshold)
    check_et_min(et_min_voxels, et_min_mode)
    torch_device = resolve_device(device, "predict.device")
    runs = run_dirs(run)
    found, single = resolve_input(input, layout)
    if single:
        selected = [(case, list(range(len(runs)))) for case in found.cases]
    else:
        selected = _select(found, runs, cases)
    for case, _ in selected:  # every image must be there (a missing segmentation is fine)
        absent = [(what, path) for what, path in case.missing if what != "seg"]
        if absent:
            what, path = absent[0]
            raise DataError(f"input: case {case.case} has no {what} image: {path} not found")
    if submission and _is_nifti_name(Path(output)):
        raise ConfigError(
            f"output={output}: predict.submission=true writes a folder of <case id>.nii.gz; "
            "give a folder"
        )
    paths = output_paths([case for case, _ in selected], output, single, found.layout)
    predictors = []
    for model, cfg in load_runs(runs, checkpoint, torch_device):
        data = cfg.get("data") or {}
        crop = list(data.get("crop_size") or (160, 192, 160))
        predictors.append(
            Predictor(
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
                tta=tta,
            )
        )
    ensemble = Ensemble(predictors, threshold, et_min_voxels, et_min_mode)
    records = []
    for (case, members), path in zip(selected, paths):
        start = time.perf_counter()
        label, relabelled = ensemble.predict_case(found, case, members)
        write_label_map(label, case.image[0], path)
        seconds = time.perf_counter() - start
        log.info("%s -> %s (%.1f s, %d run(s))", case.case, path, seconds, len(members))
        records.append(
            {
                "case": case.case,
                "output": os.fspath(path),
                "seconds": seconds,
                "shape": label.shape,
                "runs": len(members),
                "et_relabelled": relabelled,
            }
        )
    if submission:
        check_submission(output, found, [case for case, _ in selected])
    return records
