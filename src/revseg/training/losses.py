"""Losses for region and label segmentation (thin wrappers over MONAI)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss as MonaiDiceCELoss
from monai.losses import DiceLoss
from torch import nn

__all__ = ["DiceCELoss", "RegionDiceLoss"]


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


class DiceCELoss(nn.Module):
    """Dice plus cross-entropy, nnU-Net's default loss (Isensee et al. 2021).

    Label-based (``sigmoid=False``): a softmax over one channel per label, background first,
    with the Dice over the foreground labels (nnU-Net leaves the background out) and the
    cross-entropy over all. Region-based (``sigmoid=True``): one sigmoid channel per region, the
    Dice over every region and the binary cross-entropy. MONAI's
    :class:`~monai.losses.DiceCELoss` computes both terms.

    Args:
        sigmoid: region channels (sigmoid, BCE) instead of labels (softmax, CE).
        include_background: label-based: let the background channel enter the Dice.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        batch_dice: one Dice over the whole batch per channel (nnU-Net's ``batch_dice``).
        smooth_nr: smoothing added to the numerator.
        smooth_dr: smoothing added to the denominator.

    Shapes: ``input`` logits ``(B, C, D, H, W)``; ``target`` ``(B, C, D, H, W)`` in {0, 1} (a
    one-hot label map or region masks). Returns a scalar.

    Raises:
        ValueError: a loss ``mask`` (data with partially labelled volumes) is given.
    """

    def __init__(
        self,
        sigmoid: bool = False,
        include_background: bool = False,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        batch_dice: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.sigmoid = sigmoid
        self.loss = MonaiDiceCELoss(
            include_background=include_background or sigmoid,
            sigmoid=sigmoid,
            softmax=not sigmoid,
            batch=batch_dice,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if mask is not None:
            raise ValueError("loss=dice_ce takes no loss mask (partially labelled data)")
        return self.loss(input, target.to(input.dtype))
