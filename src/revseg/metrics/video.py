"""Video segmentation metrics: IoU over the whole video and per frame (DAVIS J), the DAVIS
boundary F measure, J&F, Dice, plots.

A video is a volume ``(C, T, H, W)`` with time as depth. Targets mark "void" voxels (DAVIS
palette index 255, e.g. unsure object boundaries) with the value :data:`VOID`; they are left out
of every metric, as in the DAVIS evaluation (Perazzi et al. 2016; Pont-Tuset et al. 2017).

The boundary F measure is the DAVIS benchmark's (``davis2017-evaluation``, ``f_measure``): the
one-pixel boundaries of prediction and truth (``seg2bmap``, void pixels removed from both),
matched within ``ceil(0.008 * frame diagonal)`` pixels (a disk); precision = fraction of the
predicted boundary near the true one, recall the converse, F = 2PR / (P + R) (0 when P + R = 0).
No boundary in either: F = 1; in only one of them: P, R = 1, 0 or 0, 1, hence F = 0. J&F is the
mean of J and F. Metrics are computed on the network's grid, and over every frame (the DAVIS 2017
toolkit leaves out the first and last frames, and scores the source-resolution masks).

Per-frame IoU is Peters et al.'s "prediction accuracy per time-slice" (their Figure 4), and
:meth:`VideoMetrics.figures` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, compute_iou
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = [
    "BOUND_TH",
    "VOID",
    "VideoMetrics",
    "boundary_f",
    "boundary_map",
    "iou_per_frame_plot",
    "overlay_frame",
]

BOUND_TH = 0.008
"""Boundary match tolerance of the DAVIS F measure, as a fraction of the frame diagonal."""

VOID = 255.0
"""Target value of void voxels: excluded from the metrics (and, by the data's ``loss_mask``, from
the loss)."""


def _one_hot_with_background(objects: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(N, C, ...)`` object masks -> ``(N, 1 + C, ...)`` with a background channel first.

    Background is "no object channel on"; void voxels (``valid`` False) are zero in every channel,
    so they count in no intersection and no union.
    """
    objects = objects.bool()
    background = ~objects.any(dim=1, keepdim=True)
    return (torch.cat([background, objects], dim=1) & valid).float()


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
        # within the disk of the radius <=> Euclidean distance to the other boundary <= radius
        near_true = ndimage.distance_transform_edt(~true_edge)[pred_edge] <= radius
        near_pred = ndimage.distance_transform_edt(~pred_edge)[true_edge] <= radius
        precision, recall = near_true.mean(), near_pred.mean()
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


class VideoMetrics:
    """Accumulates IoU and Dice over the videos of a validation pass.

    Predictions are ``sigmoid(logits) > threshold`` per object channel (one channel: object vs
    background). Per video (batch item) and object channel it computes, with void excluded:

    - the IoU and Dice of the whole video (intersection and union pooled over all frames);
    - the IoU of every frame (MONAI :func:`~monai.metrics.compute_iou`); a frame where both the
      prediction and the target are empty scores 1, as in the DAVIS evaluation.

    :meth:`compute` returns (means over the videos seen)::

        iou_<name>       IoU of object channel <name> over all frames
        iou_background   IoU of the background over all frames
        iou_mean         mean over classes (background and objects) of those IoUs: the "mean
                         IoU" of semantic segmentation, Peters et al.'s Table 3 figure
        dice_<name>, dice_mean   Dice per object channel over all frames, and their mean
        j_mean           DAVIS J mean: per-frame object IoU, averaged over frames and objects
        j_recall         DAVIS J recall: fraction of (frame, object) pairs with IoU > 0.5
        j_mean_annotated, j_mean_unannotated   J mean over the frames that were / were not
                         supervised (when ``annotated_frames`` is given)
        f_mean           DAVIS F mean: per-frame boundary F, averaged over frames and objects
        f_recall         fraction of (frame, object) pairs with F > 0.5
        jf_mean          DAVIS J&F mean: (j_mean + f_mean) / 2
        j_<name>, f_<name>   J and F of object channel <name>, averaged over the frames

    Args:
        names: names of the object channels, in order (``("object",)`` for binary masks).
        threshold: probability threshold.
        annotated_frames: indices of the frames that entered the training loss, marked in the
            plot and used for the annotated / unannotated split; None: not known.
    """

    def __init__(
        self,
        names: Sequence[str] = ("object",),
        threshold: float = 0.5,
        annotated_frames: Sequence[int] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.threshold = float(threshold)
        self.annotated_frames = None if annotated_frames is None else sorted(set(annotated_frames))
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self.reset()

    def reset(self) -> None:
        self.dice.reset()
        self._volume_iou: list[torch.Tensor] = []  # per video: (1 + C,)
        self._frame_iou: list[torch.Tensor] = []  # per video: (T, C)
        self._frame_f: list[torch.Tensor] = []  # per video: (T, C)

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

    def per_frame_iou(self) -> torch.Tensor:
        """``(T, C)``: IoU per frame and object channel, averaged over the videos seen.

        Videos of different lengths are averaged over their common first frames.
        """
        return self._per_frame(self._frame_iou)

    def per_frame_f(self) -> torch.Tensor:
        """``(T, C)``: boundary F per frame and object channel, as :meth:`per_frame_iou`."""
        return self._per_frame(self._frame_f)

    def _per_frame(self, values: list[torch.Tensor]) -> torch.Tensor:
        if not values:
            return torch.empty(0, len(self.names))
        length = min(f.shape[0] for f in values)
        return torch.stack([f[:length].float() for f in values]).mean(0)

    def compute(self) -> dict[str, float]:
        """The metrics of the class docstring; NaN for all of them before any update."""
        out: dict[str, float] = {}
        if not self._volume_iou:
            keys = [f"iou_{n}" for n in self.names] + ["iou_background", "iou_mean"]
            keys += [f"dice_{n}" for n in self.names] + ["dice_mean", "j_mean", "j_recall"]
            keys += ["f_mean", "f_recall", "jf_mean"]
            keys += [f"{m}_{n}" for n in self.names for m in ("j", "f")]
            return dict.fromkeys(keys, math.nan)
        volume = torch.stack(self._volume_iou).float().mean(0)  # (1 + C,)
        for i, name in enumerate(self.names, start=1):
            out[f"iou_{name}"] = float(volume[i])
        out["iou_background"] = float(volume[0])
        out["iou_mean"] = float(volume.mean())
        dice = self.dice.aggregate().float()  # (N, C)
        for i, name in enumerate(self.names):
            out[f"dice_{name}"] = float(dice[:, i].mean())
        out["dice_mean"] = float(dice.mean())
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
        if self.annotated_frames is not None:
            per_video = [f.float() for f in self._frame_iou]
            annotated = [f[[t for t in self.annotated_frames if t < f.shape[0]]] for f in per_video]
            others = [
                f[[t for t in range(f.shape[0]) if t not in self.annotated_frames]]
                for f in per_video
            ]
            for key, parts in (("j_mean_annotated", annotated), ("j_mean_unannotated", others)):
                values = torch.cat(parts)
                out[key] = float(values.mean()) if values.numel() else math.nan
        return out

    def figures(self) -> dict[str, torch.Tensor]:
        """``{"iou_per_frame": (3, H, W) float image in [0, 1]}``: IoU per time slice.

        Empty before any update.
        """
        per_frame = self.per_frame_iou()
        if per_frame.numel() == 0:
            return {}
        image = iou_per_frame_plot(
            per_frame.T.detach().cpu().numpy(),  # on the metrics' device (CUDA in training)
            names=self.names,
            annotated_frames=self.annotated_frames,
        )
        return {"iou_per_frame": image}


# ------------------------------------------------------------------------------------- plots

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _plot_matplotlib(curves, names, annotated, size) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(size[1] / dpi, size[0] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    frames = np.arange(curves.shape[1])
    for i, (curve, name) in enumerate(zip(curves, names)):
        colour = np.array(_COLOURS[i % len(_COLOURS)]) / 255
        ax.plot(frames, curve, marker=".", color=colour, label=f"{name} (mean {curve.mean():.3f})")
    for t in annotated or []:
        ax.axvline(t, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlim(-0.5, max(curves.shape[1] - 0.5, 0.5))
    ax.set_xlabel("time slice (frame)" + ("; dashed: annotated" if annotated else ""))
    ax.set_ylabel("IoU")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _plot_pillow(curves, names, annotated, size) -> np.ndarray:
    height, width = size
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 40, width - 10, 10, height - 25
    frames = curves.shape[1]

    def x(t: float) -> float:
        return left + (right - left) * (t + 0.5) / max(frames, 1)

    def y(v: float) -> float:
        return bottom - (bottom - top) * float(np.clip(v, 0.0, 1.0))

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid and labels
        draw.line([(left, y(v)), (right, y(v))], fill=(225, 225, 225))
        draw.text((4, y(v) - 6), f"{v:.2f}", fill="black")
    for t in annotated or []:
        for y0 in range(top, bottom, 6):
            draw.line([(x(t), y0), (x(t), min(y0 + 3, bottom))], fill=(150, 150, 150))
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, bottom + 6), f"IoU per time slice (frame 0 .. {frames - 1})", fill="black")
    for i, (curve, name) in enumerate(zip(curves, names)):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [(x(t), y(v)) for t, v in enumerate(curve)]
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
) -> torch.Tensor:
    """Plot IoU per frame (Peters et al., Figure 4) as a ``(3, H, W)`` float image in [0, 1].

    Args:
        curves: ``(C, T)`` IoU per object channel and frame.
        names: a legend entry per curve.
        annotated_frames: frames marked with a dashed line (those that were supervised).
        size: image ``(H, W)`` in pixels.
        backend: ``"matplotlib"``, ``"pillow"`` (no matplotlib needed), or ``"auto"``
            (matplotlib when it is installed).
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
        pixels = _plot_matplotlib(curves, names, annotated_frames, size)
    elif backend == "pillow":
        pixels = _plot_pillow(curves, names, annotated_frames, size)
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
