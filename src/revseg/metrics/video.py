"""Video segmentation metrics: DAVIS region similarity J and boundary F per object, J&F, their
mean / recall / decay, IoU and Dice over the whole video, plots.

Two conventions (:data:`CONVENTIONS`, config key ``data.metrics_convention``):

``official`` (DAVIS 2017 semi-supervised evaluation, Pont-Tuset et al. 2017; the
``davis2017-evaluation`` toolkit): a sequence of ``T`` annotated frames is scored on frames
``1 .. T-2`` (the first frame is the given one, the last is left out too), per object (palette
index ``k``: prediction ``== k`` against annotation ``== k``), at the resolution of the annotation
files. Void pixels (index 255) count as background: a predicted pixel inside void is a false
positive, and void is not removed before the boundaries are drawn.

``revseg`` (the earlier revseg figures): every frame, void pixels left out of J and F, and, in
validation, the network's output channels on the network's grid.

Per frame and object, with ``P`` the predicted and ``G`` the annotated pixels:

- J = ``|P & G| / |P | G|``, and 1 when both are empty;
- F: the one-pixel boundaries of ``P`` and ``G`` (:func:`boundary_map`) are matched within
  ``ceil(0.008 * frame diagonal)`` pixels (a disk); precision = fraction of the predicted boundary
  near the true one, recall the converse, F = 2PR / (P + R) (0 when P + R = 0). No boundary in
  either: F = 1; in only one of them: P, R = 1, 0 or 0, 1, hence F = 0.

Per object, over its frames (:func:`davis_statistics`): the mean, the recall (fraction of frames
scoring above 0.5) and the decay (mean of the first quarter of the frames minus that of the last
quarter). The figures of a set of sequences (:func:`summarize_objects`) are means over all
objects of all sequences; J&F is the mean of the J and F means.

Per-frame IoU is Peters et al.'s "prediction accuracy per time-slice" (their Figure 4), and
:meth:`VideoMetrics.figures` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import DiceMetric, compute_iou
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = [
    "BOUND_TH",
    "CONVENTIONS",
    "VOID",
    "Annotations",
    "SequenceScores",
    "VideoMetrics",
    "boundary_f",
    "boundary_map",
    "davis_statistics",
    "iou_per_frame_plot",
    "jaccard",
    "overlay_frame",
    "resize_indices",
    "score_sequence",
    "summarize_objects",
    "to_indices",
]

BOUND_TH = 0.008
"""Boundary match tolerance of the DAVIS F measure, as a fraction of the frame diagonal."""

VOID = 255.0
"""Target value of void voxels in a ``(C, T, H, W)`` label, and the palette index of void pixels
in annotation files. Left out of the ``revseg`` convention's metrics and (by the data's
``loss_mask``) of the loss; background in the ``official`` convention."""

CONVENTIONS = ("official", "revseg")
"""How J and F are computed: see the module docstring."""

_VOID_INDEX = int(VOID)


def _one_hot_with_background(objects: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(N, C, ...)`` object masks -> ``(N, 1 + C, ...)`` with a background channel first.

    Background is "no object channel on"; void voxels (``valid`` False) are zero in every channel,
    so they count in no intersection and no union.
    """
    objects = objects.bool()
    background = ~objects.any(dim=1, keepdim=True)
    return (torch.cat([background, objects], dim=1) & valid).float()


# ------------------------------------------------------------------------ per-frame measures


def jaccard(
    pred: np.ndarray, truth: np.ndarray, void: np.ndarray | None = None
) -> np.ndarray | float:
    """Region similarity J of ``(..., H, W)`` masks, one value per frame: ``|P & G| / |P | G|``
    over the pixels not in ``void``, and 1 where both masks are empty.

    Args:
        pred, truth: masks of the same shape.
        void: pixels left out of both, or None (every pixel counts).

    Returns:
        A float for one ``(H, W)`` frame, else an array of the leading shape.
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} and {truth.shape}")
    if void is not None:
        keep = ~np.asarray(void, dtype=bool)
        pred, truth = pred & keep, truth & keep
    inter = (pred & truth).sum(axis=(-2, -1))
    union = (pred | truth).sum(axis=(-2, -1))
    value = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(value) if value.ndim == 0 else value


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a 2D mask, offset half a pixel towards the origin (DAVIS
    ``seg2bmap``): a pixel whose right, lower or lower-right neighbour differs from it; along
    the last row only the right neighbour counts, along the last column only the lower one."""
    seg = np.asarray(mask, dtype=bool)
    right, down, diagonal = (np.zeros_like(seg) for _ in range(3))
    right[:, :-1] = seg[:, 1:]
    down[:-1, :] = seg[1:, :]
    diagonal[:-1, :-1] = seg[1:, 1:]
    edge = (seg ^ right) | (seg ^ down) | (seg ^ diagonal)
    edge[-1, :] = seg[-1, :] ^ right[-1, :]
    edge[:, -1] = seg[:, -1] ^ down[:, -1]
    edge[-1, -1] = False
    return edge


def boundary_f(
    pred: np.ndarray, truth: np.ndarray, void: np.ndarray | None = None, bound_th: float = BOUND_TH
) -> float:
    """DAVIS boundary F measure of one frame (module docstring).

    Args:
        pred, truth: ``(H, W)`` masks.
        void: ``(H, W)`` pixels left out (removed from both masks first), or None.
        bound_th: tolerance; below 1 a fraction of the frame diagonal, else pixels.
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if void is not None:
        keep = ~np.asarray(void, dtype=bool)
        pred, truth = pred & keep, truth & keep
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape))
    pred_edge, true_edge = boundary_map(pred), boundary_map(truth)
    n_pred, n_true = int(pred_edge.sum()), int(true_edge.sum())
    if n_pred == 0 or n_true == 0:
        precision, recall = (1.0 if n_pred == 0 else 0.0), (1.0 if n_true == 0 else 0.0)
    else:
        # within the disk of the radius <=> Euclidean distance to the other boundary <= radius;
        # both boundaries lie in their bounding box, so the distances are those of the box
        rows, cols = np.nonzero(pred_edge | true_edge)
        box = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        pred_edge, true_edge = pred_edge[box], true_edge[box]
        near_true = ndimage.distance_transform_edt(~true_edge)[pred_edge] <= radius
        near_pred = ndimage.distance_transform_edt(~pred_edge)[true_edge] <= radius
        precision, recall = near_true.mean(), near_pred.mean()
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


# ---------------------------------------------------------------- sequences and their objects


def davis_statistics(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """``(mean, recall, decay)`` of one object's per-frame J (or F) values.

    Recall is the fraction of frames scoring above 0.5. Decay: the frames ``1 .. n`` are cut at
    the four quarter points ``1 + i (n - 1) / 4`` (rounded, halves up; ``i = 0 .. 4``), each part
    holding both its end frames; decay = mean of the first part - mean of the last. All three are
    NaN for no frames.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n = values.size
    if n == 0:
        return math.nan, math.nan, math.nan
    cuts = [math.floor(1 + i * (n - 1) / 4 + 0.5) - 1 for i in range(5)]  # 0-based frames
    first, last = values[cuts[0] : cuts[1] + 1], values[cuts[3] : cuts[4] + 1]
    return float(values.mean()), float((values > 0.5).mean()), float(first.mean() - last.mean())


_STATISTICS = ("j_mean", "j_recall", "j_decay", "f_mean", "f_recall", "f_decay")


@dataclass
class SequenceScores:
    """J and F of one sequence: ``j[k, i]`` and ``f[k, i]`` are object ``object_ids[k]``'s on
    frame ``frames[i]`` (an index into the sequence's annotated frames)."""

    sequence: str
    object_ids: tuple[int, ...]
    frames: tuple[int, ...]
    j: np.ndarray
    f: np.ndarray

    def per_object(self) -> list[dict[str, float | str]]:
        """One row per object: ``{"object": "<sequence>_<id>", "j_mean", "j_recall",
        "j_decay", "f_mean", "f_recall", "f_decay"}`` (:func:`davis_statistics`)."""
        rows: list[dict[str, float | str]] = []
        for k, object_id in enumerate(self.object_ids):
            values = (*davis_statistics(self.j[k]), *davis_statistics(self.f[k]))
            rows.append(
                {"object": f"{self.sequence}_{object_id}", **dict(zip(_STATISTICS, values))}
            )
        return rows


def score_sequence(
    pred: np.ndarray,
    truth: np.ndarray,
    convention: str = "official",
    sequence: str = "",
    object_ids: Sequence[int] | None = None,
) -> SequenceScores:
    """Per-frame J and F of every object of one sequence, in a convention of the module docstring.

    Args:
        pred: ``(T, H, W)`` palette indices of the prediction: 0 background, ``k`` object ``k``
            (indices of no scored object count as background).
        truth: ``(T, H, W)`` palette indices of the annotations, :data:`VOID` (255) on void.
        convention: ``official`` (frames ``1 .. T-2``, void as background) or ``revseg`` (every
            frame, void left out).
        sequence: the sequence's name (names the objects ``<sequence>_<id>``).
        object_ids: the objects scored; None: every index of ``truth`` other than 0 and 255, in
            any frame (an object absent from some frames scores J = F = 1 there when it is not
            predicted either).

    Raises:
        ValueError: shapes differ or are not ``(T, H, W)``; an unknown convention.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and truth must both be (T, H, W), got {pred.shape} and {truth.shape}"
        )
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if object_ids is None:
        object_ids = [int(k) for k in np.unique(truth) if k not in (0, _VOID_INDEX)]
    frames = list(range(1, len(truth) - 1) if convention == "official" else range(len(truth)))
    pred, truth = pred[frames], truth[frames]
    void = None if convention == "official" else truth == _VOID_INDEX
    j = np.zeros((len(object_ids), len(frames)))
    f = np.zeros_like(j)
    for k, object_id in enumerate(object_ids):
        p, g = pred == object_id, truth == object_id
        j[k] = jaccard(p, g, void)
        for i in range(len(frames)):
            f[k, i] = boundary_f(p[i], g[i], None if void is None else void[i])
    return SequenceScores(sequence, tuple(int(k) for k in object_ids), tuple(frames), j, f)


def summarize_objects(scores: Sequence[SequenceScores]) -> dict[str, float]:
    """The global figures of a set of sequences: ``j_mean``, ``j_recall``, ``j_decay``,
    ``f_mean``, ``f_recall``, ``f_decay`` (means over all objects of all sequences of each
    object's statistic) and ``jf_mean`` (``(j_mean + f_mean) / 2``); NaN for no object."""
    rows = [row for s in scores for row in s.per_object()]
    out = {
        key: float(np.mean([row[key] for row in rows])) if rows else math.nan for key in _STATISTICS
    }
    out["jf_mean"] = (out["j_mean"] + out["f_mean"]) / 2
    return out


def to_indices(pred: torch.Tensor | np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """``(C, T, H, W)`` binary channel masks -> ``(T, H, W)`` uint8 palette indices: channel
    ``c`` becomes index ``ids[c]``, a later channel wins where two overlap, 0 elsewhere."""
    array = pred.detach().cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)
    if array.ndim != 4 or len(array) != len(ids):
        raise ValueError(f"pred must be (C={len(ids)}, T, H, W), got shape {array.shape}")
    indices = np.zeros(array.shape[1:], dtype=np.uint8)
    for channel, object_id in zip(array, ids):
        indices[channel > 0.5] = object_id
    return indices


def resize_indices(indices: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(T, h, w)`` palette indices -> ``(T, H, W)``, nearest neighbour (Pillow's, as the
    written PNGs are resized)."""
    indices = np.asarray(indices, dtype=np.uint8)
    height, width = int(size[0]), int(size[1])
    if indices.shape[1:] == (height, width):
        return indices
    return np.stack(
        [
            np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.NEAREST))
            for frame in indices
        ]
    )


@dataclass(frozen=True)
class Annotations:
    """The annotations of one sequence at their own resolution, and how a prediction made on
    the network's grid maps onto them (the ``official`` convention in validation).

    Attributes:
        sequence: the sequence's name.
        masks: ``(T, H, W)`` uint8 palette indices of the annotation files (255 void).
        volume_frames: ``(T,)`` the frame of the network's volume that predicts each annotated
            frame (the nearest in time).
        channel_ids: the palette index each output channel predicts.
        object_ids: the objects scored (every index of ``masks`` other than 0 and 255).
    """

    sequence: str
    masks: np.ndarray
    volume_frames: np.ndarray
    channel_ids: tuple[int, ...]
    object_ids: tuple[int, ...]

    def prediction(self, pred: torch.Tensor) -> np.ndarray:
        """``(C, T_volume, h, w)`` binary masks -> ``(T, H, W)`` uint8 palette indices of the
        annotated frames at the annotations' size."""
        indices = to_indices(pred, self.channel_ids)
        return resize_indices(indices[np.asarray(self.volume_frames)], self.masks.shape[1:])


# ------------------------------------------------------------------------------ accumulator


class VideoMetrics:
    """Accumulates DAVIS J and F, IoU and Dice over the videos of a validation pass.

    Predictions are ``sigmoid(logits) > threshold`` per object channel (one channel: object vs
    background). :meth:`compute` returns (means over the videos seen)::

        iou_<name>       IoU of object channel <name> over all frames
        iou_background   IoU of the background over all frames
        iou_mean         mean over classes (background and objects) of those IoUs: the "mean
                         IoU" of semantic segmentation, Peters et al.'s Table 3 figure
        dice_<name>, dice_mean   Dice per object channel over all frames, and their mean
        j_mean, j_recall         DAVIS J mean and recall (fraction above 0.5)
        f_mean, f_recall         DAVIS boundary F mean and recall
        jf_mean                  (j_mean + f_mean) / 2
        j_<object>, f_<object>   J and F of one object, averaged over its frames
        j_mean_annotated, j_mean_unannotated   J mean over the frames that were / were not
                         supervised (when ``annotated_frames`` is given)

    IoU and Dice are always those of the network's grid with void voxels left out (MONAI
    :func:`~monai.metrics.compute_iou`, :class:`~monai.metrics.DiceMetric`). J and F follow
    ``convention``:

    - ``official``: per object of ``annotations`` at the annotation files' resolution, on
      frames ``1 .. T-2`` (:func:`score_sequence`); the means are over objects of each object's
      mean, and ``j_decay`` / ``f_decay`` are added. ``<object>`` is ``object<k>`` for palette
      index ``k``; ``annotated_frames`` are indices of the annotated (source) frames.
    - ``revseg``: per output channel on the network's grid, every frame, void left out; the
      means are over (frame, channel) pairs. ``<object>`` is the channel's name;
      ``annotated_frames`` are frames of the volume.

    Args:
        names: names of the output channels, in order (``("object",)`` for binary masks).
        threshold: probability threshold.
        annotated_frames: the frames that entered the training loss, marked in the plot and
            used for the annotated / unannotated split; None: not known.
        convention: ``official`` or ``revseg`` (:data:`CONVENTIONS`).
        annotations: the sequence's annotation files; required by ``official``.

    Raises:
        ValueError: an unknown convention, or ``official`` without ``annotations``.
    """

    def __init__(
        self,
        names: Sequence[str] = ("object",),
        threshold: float = 0.5,
        annotated_frames: Sequence[int] | None = None,
        convention: str = "revseg",
        annotations: Annotations | None = None,
    ) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(
                f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}"
            )
        if convention == "official" and annotations is None:
            raise ValueError("the official convention scores against the annotation files: "
                             "pass annotations")  # fmt: skip
        self.names = tuple(names)
        self.threshold = float(threshold)
        self.annotated_frames = None if annotated_frames is None else sorted(set(annotated_frames))
        self.convention = convention
        self.annotations = annotations
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self.reset()

    @property
    def object_names(self) -> tuple[str, ...]:
        """The ``<object>`` of the ``j_<object>`` / ``f_<object>`` keys, in order."""
        if self.annotations is not None and self.convention == "official":
            return tuple(f"object{k}" for k in self.annotations.object_ids)
        return self.names

    def reset(self) -> None:
        self.dice.reset()
        self._volume_iou: list[torch.Tensor] = []  # per video: (1 + C,)
        self._frame_iou: list[torch.Tensor] = []  # revseg, per video: (T, C)
        self._frame_f: list[torch.Tensor] = []  # revseg, per video: (T, C)
        self._scores: list[SequenceScores] = []  # official, per video

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` logits -> ``(B, C, T, H, W)`` float {0, 1} object masks."""
        return (torch.sigmoid(logits.float()) > self.threshold).float()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add a batch of videos; returns the binary prediction ``(B, C, T, H, W)``.

        Args:
            logits: ``(B, C, T, H, W)``.
            target: ``(B, C, T, H, W)`` in {0, 1}, :data:`VOID` on void voxels.
        """
        if logits.shape != target.shape or logits.ndim != 5:
            raise ValueError(
                f"logits and target must both be (B, C, T, H, W), got {tuple(logits.shape)} "
                f"and {tuple(target.shape)}"
            )
        if logits.shape[1] != len(self.names):
            raise ValueError(f"expected {len(self.names)} channels, got {logits.shape[1]}")
        pred = self.predict(logits)
        valid = (target != VOID).all(dim=1, keepdim=True)  # (B, 1, T, H, W)
        objects = (target == 1) & valid
        pred_one_hot = _one_hot_with_background(pred, valid)
        true_one_hot = _one_hot_with_background(objects, valid)
        self._volume_iou.extend(
            compute_iou(pred_one_hot, true_one_hot, include_background=True, ignore_empty=False)
        )
        self.dice(pred_one_hot, true_one_hot)
        for b in range(pred.shape[0]):
            if self.convention == "official":
                annotations = self.annotations
                self._scores.append(
                    score_sequence(
                        annotations.prediction(pred[b]),
                        annotations.masks,
                        "official",
                        annotations.sequence,
                        annotations.object_ids,
                    )
                )
                continue
            # frames as the batch: (T, C, H, W) -> per-frame, per-channel IoU (T, C)
            frames_pred = (pred[b] * valid[b]).transpose(0, 1)
            frames_true = objects[b].float().transpose(0, 1)
            self._frame_iou.append(compute_iou(frames_pred, frames_true, ignore_empty=False))
            void = ~valid[b, 0].cpu().numpy()  # (T, H, W)
            pred_np, true_np = pred[b].cpu().numpy() > 0.5, objects[b].cpu().numpy()
            self._frame_f.append(
                torch.tensor(
                    [
                        [
                            boundary_f(pred_np[c, t], true_np[c, t], void[t])
                            for c in range(len(self.names))
                        ]
                        for t in range(pred_np.shape[1])
                    ],
                    dtype=torch.float64,
                )
            )
        return pred

    def scored_frames(self) -> list[int]:
        """The frame indices J and F are computed on (of the annotations under ``official``,
        of the volume under ``revseg``); empty before any update."""
        if self._scores:
            return list(self._scores[0].frames)
        return list(range(len(self.per_frame_iou())))

    def per_frame_iou(self) -> torch.Tensor:
        """``(F, K)``: J per scored frame (:meth:`scored_frames`) and object, averaged over the
        videos seen. Videos of different lengths are averaged over their common first frames."""
        if self.convention == "official":
            return self._per_frame([torch.from_numpy(s.j.T) for s in self._scores])
        return self._per_frame(self._frame_iou)

    def per_frame_f(self) -> torch.Tensor:
        """``(F, K)``: boundary F per scored frame and object, as :meth:`per_frame_iou`."""
        if self.convention == "official":
            return self._per_frame([torch.from_numpy(s.f.T) for s in self._scores])
        return self._per_frame(self._frame_f)

    def _per_frame(self, values: list[torch.Tensor]) -> torch.Tensor:
        if not values:
            return torch.empty(0, len(self.object_names))
        length = min(f.shape[0] for f in values)
        return torch.stack([f[:length].float() for f in values]).mean(0)

    def _keys(self) -> list[str]:
        keys = [f"iou_{n}" for n in self.names] + ["iou_background", "iou_mean"]
        keys += [f"dice_{n}" for n in self.names] + ["dice_mean"]
        keys += ["j_mean", "j_recall", "f_mean", "f_recall", "jf_mean"]
        if self.convention == "official":
            keys += ["j_decay", "f_decay"]
        keys += [f"{m}_{n}" for n in self.object_names for m in ("j", "f")]
        return keys

    def compute(self) -> dict[str, float]:
        """The metrics of the class docstring; NaN for all of them before any update."""
        out: dict[str, float] = {}
        if not self._volume_iou:
            return dict.fromkeys(self._keys(), math.nan)
        volume = torch.stack(self._volume_iou).float().mean(0)  # (1 + C,)
        for i, name in enumerate(self.names, start=1):
            out[f"iou_{name}"] = float(volume[i])
        out["iou_background"] = float(volume[0])
        out["iou_mean"] = float(volume.mean())
        dice = self.dice.aggregate().float()  # (N, C)
        for i, name in enumerate(self.names):
            out[f"dice_{name}"] = float(dice[:, i].mean())
        out["dice_mean"] = float(dice.mean())
        if self.convention == "official":
            out.update(summarize_objects(self._scores))
            per_frame_j = [(s.frames, torch.from_numpy(s.j.T)) for s in self._scores]
            for k, name in enumerate(self.object_names):
                out[f"j_{name}"] = float(np.mean([s.j[k].mean() for s in self._scores]))
                out[f"f_{name}"] = float(np.mean([s.f[k].mean() for s in self._scores]))
        else:
            frames = torch.cat(self._frame_iou).float()  # (sum of T, C)
            out["j_mean"] = float(frames.mean())
            out["j_recall"] = float((frames > 0.5).float().mean())
            boundary = torch.cat(self._frame_f).float()  # (sum of T, C)
            out["f_mean"] = float(boundary.mean())
            out["f_recall"] = float((boundary > 0.5).float().mean())
            out["jf_mean"] = (out["j_mean"] + out["f_mean"]) / 2
            for i, name in enumerate(self.names):
                out[f"j_{name}"] = float(frames[:, i].mean())
                out[f"f_{name}"] = float(boundary[:, i].mean())
            per_frame_j = [(range(len(f)), f.float()) for f in self._frame_iou]
        if self.annotated_frames is not None:  # per video: (its scored frames, (F, K) J)
            marked = set(self.annotated_frames)
            for key, keep in (("j_mean_annotated", True), ("j_mean_unannotated", False)):
                values = torch.cat(
                    [
                        j[[i for i, t in enumerate(ts) if (t in marked) == keep]]
                        for ts, j in per_frame_j
                    ]
                )
                out[key] = float(values.float().mean()) if values.numel() else math.nan
        return out

    def figures(self) -> dict[str, torch.Tensor]:
        """``{"iou_per_frame": (3, H, W) float image in [0, 1]}``: J per scored frame.

        Empty before any update.
        """
        per_frame = self.per_frame_iou()
        if per_frame.numel() == 0:
            return {}
        image = iou_per_frame_plot(
            per_frame.T.detach().cpu().numpy(),  # on the metrics' device (CUDA in training)
            names=self.object_names,
            annotated_frames=self.annotated_frames,
            first_frame=self.scored_frames()[0],
        )
        return {"iou_per_frame": image}


# ------------------------------------------------------------------------------------- plots

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _plot_matplotlib(curves, names, annotated, size, first) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(size[1] / dpi, size[0] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    frames = first + np.arange(curves.shape[1])
    for i, (curve, name) in enumerate(zip(curves, names)):
        colour = np.array(_COLOURS[i % len(_COLOURS)]) / 255
        ax.plot(frames, curve, marker=".", color=colour, label=f"{name} (mean {curve.mean():.3f})")
    for t in annotated or []:
        ax.axvline(t, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlim(first - 0.5, first + max(curves.shape[1] - 0.5, 0.5))
    ax.set_xlabel("time slice (frame)" + ("; dashed: annotated" if annotated else ""))
    ax.set_ylabel("IoU")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _plot_pillow(curves, names, annotated, size, first) -> np.ndarray:
    height, width = size
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 40, width - 10, 10, height - 25
    frames = curves.shape[1]

    def x(t: float) -> float:
        return left + (right - left) * (t - first + 0.5) / max(frames, 1)

    def y(v: float) -> float:
        return bottom - (bottom - top) * float(np.clip(v, 0.0, 1.0))

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid and labels
        draw.line([(left, y(v)), (right, y(v))], fill=(225, 225, 225))
        draw.text((4, y(v) - 6), f"{v:.2f}", fill="black")
    for t in [t for t in annotated or [] if first <= t < first + frames]:
        for y0 in range(top, bottom, 6):
            draw.line([(x(t), y0), (x(t), min(y0 + 3, bottom))], fill=(150, 150, 150))
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(
        (left, bottom + 6),
        f"IoU per time slice (frame {first} .. {first + frames - 1})",
        fill="black",
    )
    for i, (curve, name) in enumerate(zip(curves, names)):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [(x(t), y(v)) for t, v in enumerate(curve, start=first)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((right - 150, top + 4 + 12 * i), f"{name}: {curve.mean():.3f}", fill=colour)
    return np.array(image)


def iou_per_frame_plot(
    curves: np.ndarray,
    names: Sequence[str] = ("object",),
    annotated_frames: Sequence[int] | None = None,
    size: tuple[int, int] = (300, 600),
    backend: str = "auto",
    first_frame: int = 0,
) -> torch.Tensor:
    """Plot IoU per frame (Peters et al., Figure 4) as a ``(3, H, W)`` float image in [0, 1].

    Args:
        curves: ``(C, T)`` IoU per object channel and frame.
        names: a legend entry per curve.
        annotated_frames: frames marked with a dashed line (those that were supervised).
        size: image ``(H, W)`` in pixels.
        backend: ``"matplotlib"``, ``"pillow"`` (no matplotlib needed), or ``"auto"``
            (matplotlib when it is installed).
        first_frame: the frame index of the curves' first value (1 for DAVIS's official frames).
    """
    curves = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            backend = "pillow"
        else:
            backend = "matplotlib"
    if backend == "matplotlib":
        pixels = _plot_matplotlib(curves, names, annotated_frames, size, first_frame)
    elif backend == "pillow":
        pixels = _plot_pillow(curves, names, annotated_frames, size, first_frame)
    else:
        raise ValueError(f"backend must be auto, matplotlib or pillow, got {backend!r}")
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0


def overlay_frame(
    image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, frame: int | None = None
) -> torch.Tensor:
    """One frame of a video with prediction errors coloured: a ``(3, H, W)`` image in [0, 1].

    Green: object predicted and true; red: predicted, not true (false positive); blue: true,
    missed (false negative); grey: void. Object channels are merged.

    Args:
        image: ``(3, T, H, W)`` RGB video (any scale: each frame is min-max normalised).
        label: ``(C, T, H, W)`` target in {0, 1} with :data:`VOID` on void voxels.
        pred: ``(C, T, H, W)`` binary prediction.
        frame: the frame shown; None = the middle one.
    """
    t = image.shape[1] // 2 if frame is None else frame
    rgb = image[:, t].detach().float().cpu()
    lo, hi = rgb.min(), rgb.max()
    rgb = (rgb - lo) / (hi - lo) if hi > lo else torch.zeros_like(rgb)
    lab = label[:, t].detach().cpu()
    void = (lab == VOID).any(0)
    true = ((lab == 1).any(0)) & ~void
    hit = (pred[:, t].detach().cpu() > 0.5).any(0) & ~void
    colours = {
        "tp": (true & hit, (0.1, 0.85, 0.1)),
        "fp": (~true & hit & ~void, (0.95, 0.1, 0.1)),
        "fn": (true & ~hit, (0.1, 0.3, 1.0)),
        "void": (void, (0.6, 0.6, 0.6)),
    }
    out = rgb.clone()
    for where, colour in colours.values():
        tint = torch.tensor(colour).view(3, 1)
        out[:, where] = 0.45 * rgb[:, where] + 0.55 * tint
    return out.clamp(0, 1)
