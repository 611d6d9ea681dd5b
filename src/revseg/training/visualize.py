"""Images for TensorBoard: a middle slice of input, label and prediction side by side."""

from __future__ import annotations

import torch

__all__ = ["slice_panel"]


def _regions_rgb(regions: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` region masks (WT, TC, ET) -> ``(3, H, W)`` RGB: WT red, TC green, ET blue."""
    return regions.float().clamp(0, 1)


def slice_panel(
    image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, channel: int = -1
) -> torch.Tensor:
    """One ``(3, H, 3 * W)`` RGB image in [0, 1]: input channel, label, prediction.

    Args:
        image: ``(C, D, H, W)`` input; ``channel`` picks the modality shown (default the last,
            FLAIR in BraTS order t1, t1ce, t2, flair).
        label: ``(3, D, H, W)`` region masks.
        pred: ``(3, D, H, W)`` predicted region masks.

    The slice is the middle one along the last spatial axis (axial for BraTS volumes).
    """
    z = image.shape[-1] // 2
    gray = image[channel, :, :, z].float()
    lo, hi = gray.min(), gray.max()
    gray = (gray - lo) / (hi - lo) if hi > lo else torch.zeros_like(gray)
    panels = [gray.expand(3, -1, -1), _regions_rgb(label[..., z]), _regions_rgb(pred[..., z])]
    return torch.cat([p.detach().cpu() for p in panels], dim=-1)
