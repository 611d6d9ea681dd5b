"""The plumbing every revseg model shares: :class:`SegmentationModel`.

A model says what its blocks are; this base holds what they all need around them (the idea of
segmentation_models.pytorch's ``SegmentationModel``): the input check against the model's
``divisor``, the ``memory_saving`` switch over its reversible parts (found by
:func:`~revseg.nn.reversible.reversible_parts`, never listed by hand) and gradient checkpointing
of the non-reversible parts. Hydra-free.
"""

from __future__ import annotations

import torch
from torch import nn

from revseg.nn.blocks import check_volume, checkpointed
from revseg.nn.reversible import reversible_parts

__all__ = ["SegmentationModel"]


class SegmentationModel(nn.Module):
    """Base of every model: ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)`` logits.

    A subclass sets ``divisor`` (an attribute or a property: ``D, H, W`` must be multiples of
    it, its downsampling factor), may set ``in_channels`` (then checked too) and
    ``checkpointing``, calls :meth:`check_input` first in ``forward`` and runs its
    non-reversible parts through :meth:`checkpoint`.

    Attributes:
        divisor: the factor ``D, H, W`` must be multiples of.
        in_channels: the input channels :meth:`check_input` requires (None: any).
        checkpointing: run the modules given to :meth:`checkpoint` under gradient checkpointing
            in training.
    """

    divisor: int
    in_channels: int | None = None
    checkpointing: bool = False

    @property
    def memory_saving(self) -> bool:
        """``True`` if the model has reversible parts and every one is memory-saving; setting it
        sets every part (``False`` on a model without parts is a no-op).

        Raises:
            ValueError: ``True`` on a model without reversible parts.
        """
        parts = reversible_parts(self)
        return bool(parts) and all(part.memory_saving for _, part in parts)

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        parts = reversible_parts(self)
        if value and not parts:
            raise ValueError(f"{type(self).__name__} has no reversible parts to save memory in")
        for _, part in parts:
            part.memory_saving = bool(value)

    def check_input(self, x: torch.Tensor, why: str = "") -> None:
        """Raise ``ValueError`` naming the model unless ``x`` is ``(B, in_channels, D, H, W)``
        with ``D, H, W`` multiples of ``divisor`` (:func:`~revseg.nn.blocks.check_volume`)."""
        check_volume(x, self.divisor, type(self).__name__, self.in_channels, why)

    def checkpoint(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)``, under gradient checkpointing (only ``x`` kept, ``module`` recomputed in
        backward: :func:`~revseg.nn.blocks.checkpointed`) when ``checkpointing`` is on, in
        training with grad enabled."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpointed(module, x)
        return module(x)
