"""Training callbacks: hooks the trainer calls, each with a state saved in checkpoints."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from revseg.training.contracts import TrainerView

__all__ = ["Callback", "EarlyStopping"]

log = logging.getLogger(__name__)


class Callback:
    """Base class. Every hook is optional; ``state_dict`` goes into each checkpoint."""

    def on_train_start(self, trainer: TrainerView) -> None:
        """Called once before the first epoch (after a resume, too)."""

    def on_train_batch_end(self, trainer: TrainerView, batch: dict[str, Any], step: int) -> None:
        """Called after each optimisation step that was not skipped, with the loader's batch
        (``batch["image"]``, ...) and the step count ``trainer.global_step``."""

    def on_train_epoch_end(self, trainer: TrainerView, logs: dict[str, float]) -> None:
        """Called after each training epoch with ``{"train/loss": ...}``."""

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        """Called after each validation with ``{"val/dice_mean": ..., ...}``: under DDP rank 0's
        metrics on every rank, and ``trainer.should_stop`` is rank 0's decision (the trainer
        broadcasts it after each epoch), so that every rank stops and checkpoints alike."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        """Entries this callback adds to ``summary.json``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class EarlyStopping(Callback):
    """Stop when the moving average of a validation metric has not improved for a while.

    Brügger et al. stop "once the 30-epoch moving average Dice score on the validation split has
    not increased for 60 epochs". The average runs over the validations of the last ``window``
    epochs (so it works whatever the validation interval); ``patience`` counts epochs since the
    best average.

    Args:
        monitor: the metric key, e.g. ``"val/dice_mean"``.
        window: moving-average window in epochs.
        patience: epochs without improvement of the average before stopping.
        mode: ``"max"`` (Dice) or ``"min"`` (a loss).
        min_delta: the improvement that counts.
    """

    def __init__(
        self,
        monitor: str = "val/dice_mean",
        window: int = 30,
        patience: int = 60,
        mode: str = "max",
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"callbacks.early_stopping.mode must be 'max' or 'min', got {mode!r}")
        if window < 1 or patience < 1:
            raise ValueError("callbacks.early_stopping.window and .patience must be >= 1")
        self.monitor = monitor
        self.window = window
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.history: list[tuple[int, float]] = []  # (epoch, value)
        self.best_average: float | None = None
        self.best_epoch = -1

    def moving_average(self, epoch: int) -> float:
        recent = [v for e, v in self.history if e > epoch - self.window]
        return sum(recent) / len(recent)

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise KeyError(f"early stopping monitors {self.monitor!r}, not in {sorted(metrics)}")
        value = float(metrics[self.monitor])
        epoch = trainer.epoch
        if math.isfinite(value):
            self.history.append((epoch, value))
        if not self.history:
            return
        average = self.moving_average(epoch)
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best_average is None or sign * (average - self.best_average) > self.min_delta:
            self.best_average, self.best_epoch = average, epoch
        elif epoch - self.best_epoch >= self.patience:
            log.info(
                "early stopping at epoch %d: %s moving average %.4f, best %.4f at epoch %d",
                epoch,
                self.monitor,
                average,
                self.best_average,
                self.best_epoch,
            )
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [list(h) for h in self.history],
            "best_average": self.best_average,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(int(e), float(v)) for e, v in state["history"]]
        self.best_average = state["best_average"]
        self.best_epoch = int(state["best_epoch"])
