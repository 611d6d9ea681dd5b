"""Losses for region segmentation (thin wrappers over MONAI)."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn

__all__ = ["RegionDiceLoss"]


class RegionDiceLoss(nn.Module):
    """Soft Dice loss per region channel, summed over regions and averaged over the batch.

    Brügger et al. 2019 train on "the unweighted sum of the Dice losses of each of the three
    regions" (WT, TC, ET), each a sigmoid channel. MONAI's :class:`~monai.losses.DiceLoss` computes
    the per-sample, per-channel losses; this module only reduces them that way.

    Args:
        sigmoid: apply a sigmoid to the logits (``True`` for region channels).
        squared_pred: use squared terms in the denominator (V-Net style).
        smooth_nr: smoothing added to the numerator (keeps empty-vs-empty at loss 0).
        smooth_dr: smoothing added to the denominator.
        reduction: ``"sum"`` over region channels (the paper) or ``"mean"``.
        jaccard: compute the soft IoU (Jaccard) loss instead of Dice.

    Shapes: ``input`` logits ``(B, C, D, H, W)``; ``target`` ``(B, C, D, H, W)`` in {0, 1};
    optional ``mask`` broadcastable to the input (e.g. ``(B, 1, D, 1, 1)`` selecting annotated
    frames of a video): voxels where it is 0 do not enter the loss (as MONAI's MaskedDiceLoss).
    Returns a scalar.
    """

    def __init__(
        self,
        sigmoid: bool = True,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        reduction: str = "sum",
        jaccard: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"loss.reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.sigmoid = sigmoid
        self.dice = DiceLoss(
            sigmoid=False,
            squared_pred=squared_pred,
            jaccard=jaccard,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            reduction="none",
        )

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        prob = torch.sigmoid(input) if self.sigmoid else input
        if mask is not None:
            mask = mask.to(prob.dtype)
            prob, target = prob * mask, target * mask
        per_channel = self.dice(prob, target).flatten(1)  # (B, C)
        per_sample = per_channel.sum(1) if self.reduction == "sum" else per_channel.mean(1)
        return per_sample.mean()
