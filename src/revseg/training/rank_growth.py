"""Adaptive block rank (Peters, Haber, Lensink): grow the low-rank layers when training stalls.

The block rank ``m`` of a symmetric block-low-rank layer sets how many ``3x3x3`` kernels it holds
(``2mn`` convolutions instead of ``2n^2``). Training starts at a small rank (4 in the paper);
when the training loss stops decreasing, kernels are added (existing kernels unchanged), and when
the network starts to over-fit (validation worsens while training still improves) the last ones
are removed again. The paper's DAVIS schedule goes from rank 4 to rank 8.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from revseg.training.callbacks import Callback
from revseg.training.contracts import AdaptiveRanks

if TYPE_CHECKING:
    from revseg.training.contracts import TrainerView

__all__ = ["BlockRankSchedule"]

log = logging.getLogger(__name__)


class BlockRankSchedule(Callback):
    """Step through ``ranks`` as training plateaus; step back when validation over-fits.

    Works with any model that has ``ranks() -> list[int]`` and ``set_ranks(rank, init, scale)``
    (an int sets the block rank of the coarse levels), e.g.
    :class:`revseg.models.hyperbolic_net.HyperbolicNet`. After a change the optimizer keeps the
    state of the existing parameters and gains the new ones (``TrainerView.sync_optimizer_params``).

    Args:
        ranks: the schedule of coarse-level ranks, e.g. ``[4, 8]``; the model starts at the first.
        patience: epochs without a relative improvement of the training loss by ``threshold``
            before growing to the next rank.
        threshold: relative improvement of the training loss that counts (0.01 = 1 %).
        shrink: step back one rank when validation worsens while training improves for
            ``shrink_patience`` validations in a row.
        shrink_patience: see ``shrink``.
        monitor: validation metric watched for over-fitting, with ``mode`` (``"max"`` for Dice or
            IoU, ``"min"`` for a loss).
        init: initialisation of new kernels (``"small"``: small random values, so that training
            continues smoothly; ``"zeros"``: the network function is unchanged at first).
        scale: scale of the ``"small"`` initialisation.
    """

    def __init__(
        self,
        ranks: Sequence[int] = (4, 8),
        patience: int = 3,
        threshold: float = 0.01,
        shrink: bool = True,
        shrink_patience: int = 2,
        monitor: str = "val/dice_mean",
        mode: str = "max",
        init: str = "small",
        scale: float = 1e-2,
    ) -> None:
        if not ranks or any(int(r) < 1 for r in ranks):
            raise ValueError(
                f"callbacks.rank_growth.ranks must be positive ints, got {list(ranks)}"
            )
        if patience < 1 or shrink_patience < 1:
            raise ValueError("callbacks.rank_growth.patience and .shrink_patience must be >= 1")
        if mode not in ("max", "min"):
            raise ValueError(f"callbacks.rank_growth.mode must be max or min, got {mode!r}")
        self.schedule = [int(r) for r in ranks]
        self.patience = patience
        self.threshold = threshold
        self.shrink = shrink
        self.shrink_patience = shrink_patience
        self.monitor = monitor
        self.mode = mode
        self.init = init
        self.scale = scale
        self.index = 0  # position in the schedule
        self.best_train: float | None = None
        self.stalled = 0
        self.last_train: float | None = None
        self.last_val: float | None = None
        self.overfitting = 0
        self._improving_train = False
        self.history: list[dict[str, Any]] = []
        self.current: list[int] = []

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _model(trainer: TrainerView) -> Any:
        model = trainer.network
        if not isinstance(model, AdaptiveRanks):
            raise TypeError(
                f"callbacks.rank_growth needs a model with ranks()/set_ranks(); "
                f"{type(model).__name__} has none (use model=hyperbolic_blr)"
            )
        return model

    def _apply(self, trainer: TrainerView, index: int, reason: str) -> None:
        model = self._model(trainer)
        before = model.ranks()
        self.index = index
        self.current = model.set_ranks(self.schedule[index], init=self.init, scale=self.scale)
        trainer.sync_optimizer_params()
        event = {"epoch": trainer.epoch, "from": before, "to": self.current, "reason": reason}
        self.history.append(event)
        log.info(
            "block rank %s -> %s at epoch %d (%s)", before, self.current, trainer.epoch, reason
        )
        if trainer.writer is not None:
            trainer.writer.add_text("model/rank_change", str(event), trainer.epoch)
        self.best_train, self.stalled, self.overfitting = None, 0, 0

    # -------------------------------------------------------------- hooks
    def on_train_start(self, trainer: TrainerView) -> None:
        model = self._model(trainer)
        if not self.history:  # a fresh run starts at the schedule's first rank
            self.current = model.set_ranks(
                self.schedule[self.index], init=self.init, scale=self.scale
            )
            trainer.sync_optimizer_params()
        else:  # resumed: the checkpoint's weights already carry the ranks
            self.current = model.ranks()
        self._log_ranks(trainer)

    def _log_ranks(self, trainer: TrainerView) -> None:
        if trainer.writer is not None:
            trainer.writer.add_scalar("model/block_rank", self.schedule[self.index], trainer.epoch)

    def on_train_epoch_end(self, trainer: TrainerView, logs: dict[str, float]) -> None:
        loss = float(logs["train/loss"])
        self.last_train, improving = loss, self.best_train is None or loss < self.best_train
        if self.best_train is None or loss < self.best_train * (1.0 - self.threshold):
            self.best_train, self.stalled = loss, 0
        else:
            self.stalled += 1
        self._improving_train = improving
        if self.stalled >= self.patience and self.index + 1 < len(self.schedule):
            self._apply(trainer, self.index + 1, f"training loss stalled for {self.stalled} epochs")
        self._log_ranks(trainer)

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        if not self.shrink or self.monitor not in metrics:
            return
        value = float(metrics[self.monitor])
        sign = 1.0 if self.mode == "max" else -1.0
        worse = self.last_val is not None and sign * (value - self.last_val) < 0
        self.last_val = value
        if worse and self._improving_train:
            self.overfitting += 1
        else:
            self.overfitting = 0
        if self.overfitting >= self.shrink_patience and self.index > 0:
            self._apply(trainer, self.index - 1, f"over-fitting for {self.overfitting} validations")

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "best_train": self.best_train,
            "stalled": self.stalled,
            "last_val": self.last_val,
            "overfitting": self.overfitting,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
        self.best_train = state["best_train"]
        self.stalled = int(state["stalled"])
        self.last_val = state["last_val"]
        self.overfitting = int(state["overfitting"])
        self.history = [dict(h) for h in state["history"]]

    def summary(self) -> dict[str, Any]:
        return {"ranks": {"current": list(self.current), "history": list(self.history)}}
