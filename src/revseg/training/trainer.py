"""The training loop: ``train(cfg) -> dict`` builds everything from a composed config and runs it.

Every run directory gets TensorBoard event files, ``checkpoints/last.pt`` and
``checkpoints/best.pt`` (written atomically), and ``summary.json`` with the measured peak memory
(docs/architecture.md, contract 4). ``train.py`` is a thin Hydra wrapper over :func:`train`;
tests call :func:`train` directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import revseg
from revseg.config import (
    build,
    check_input_sizes,
    data_name,
    metrics_config,
    model_name,
    model_option,
    trainer_config,
    validate_config,
)
from revseg.data.figures import save_png, slice_panel
from revseg.device import (
    CHANNELS_LAST,
    autocast_context,
    compile_backend,
    resolve_device,
    set_cudnn_benchmark,
    set_deterministic,
    set_tf32,
    tf32_flags,
)
from revseg.errors import ConfigError, TrainingError
from revseg.memory.measure import MemoryMeasurement, PeakMemoryMeter, format_bytes
from revseg.step import NON_FINITE, OVERFLOW, MicroBatch, TrainStep
from revseg.training.callbacks import Callback
from revseg.training.checkpoint import (
    check_writable,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_atomic,
    with_checksum,
    write_text_atomic,
)
from revseg.training.contracts import (
    DataModule,
    Figures,
    MemoryReport,
    Metrics,
    ParameterGroups,
    Previews,
    WritesSplit,
    check_data_module,
    val_key,
    validation_metrics,
)
from revseg.training.distributed import (
    DistInfo,
    all_ranks_agree,
    broadcast_object,
    end_process_group,
    gather_objects,
    init_distributed,
    max_over_ranks,
    mean_over_ranks,
    shard_loader,
    training_device,
)
from revseg.training.hparams import write_hparams
from revseg.training.run_dir import check_fresh_run, claim_run_dir, write_run_record
from revseg.validation import model_divisor

__all__ = ["Trainer", "autocast_context", "train", "resolve_device", "seed_everything"]

log = logging.getLogger(__name__)

_NOT_PRINTED = ("hd95_", "lesion_", "tp_", "fp_", "fn_")
"""Metric name prefixes left out of the epoch's log line (still in TensorBoard and summary.json)."""


def parameter_groups(model: nn.Module, lr: float) -> Any:
    """What the optimizer is built on: ``model.parameters()``, or the model's own groups.

    A model may define ``parameter_groups() -> [{"params": [...], "lr_scale": s}, ...]`` (RevUp's
    Fixup scalars train at 0.1x the lr); each group's ``lr`` is then ``lr * lr_scale``, and the
    first group keeps the optimizer's lr (the logged ``lr``).
    """
    if not isinstance(model, ParameterGroups):
        return model.parameters()
    out = []
    for group in model.parameter_groups():
        group = dict(group)
        scale = group.pop("lr_scale", None)
        if scale is not None:
            group["lr"] = float(lr) * float(scale)
        out.append(group)
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global state libraries draw from
    torch.manual_seed(seed)


class Trainer:
    """Runs epochs of training and validation, logs, checkpoints and measures memory.

    Args:
        cfg: the composed ``train`` config (resolved); stored in every checkpoint.
        model: the network, ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)`` logits.
        data: a :class:`~revseg.training.contracts.DataModule` (optionally with its own
            metrics, preview and split file: see :mod:`revseg.training.contracts`).
        loss_fn: ``loss_fn(logits, target) -> scalar``.
        optimizer: the optimizer over ``model.parameters()``.
        scheduler: an epoch-wise LR scheduler or ``None``.
        callbacks: :class:`Callback` objects keyed by name (the name keys their saved state).
        writer: a TensorBoard ``SummaryWriter`` or ``None``.
        output_dir: the run directory.
        device: where to train.
    """

    def __init__(
        self,
        cfg: DictConfig,
        model: nn.Module,
        data: DataModule | None,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        callbacks: dict[str, Callback],
        writer: Any | None,
        output_dir: Path,
        device: torch.device,
        dist_info: DistInfo | None = None,
    ) -> None:
        self.cfg = cfg
        self.tcfg = trainer_config(cfg)  # typed: revseg.config.TrainerConfig
        self.dist = dist_info or DistInfo()
        self.network = model  # the network itself (state dicts, parameters)
        self.device = device
        self.pin_memory = device.type == "cuda"  # page-locked batches only for a GPU that trains
        self.channels_last = self.tcfg.channels_last
        if self.channels_last:
            model.to(memory_format=CHANNELS_LAST)
        # what is called in training: DDP(network) when distributed, else the network (compiled
        # with trainer.compile)
        self.wrapped = self._wrap(model)
        self.data = data
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.callbacks = callbacks
        self.writer = writer
        self.output_dir = output_dir
        self.ckpt_dir = output_dir / "checkpoints"
        self.meter = PeakMemoryMeter(device)
        # cuDNN's autotuner (trainer.cudnn_benchmark) tries every algorithm, with its trial
        # workspaces, at this process's first step: that step's peak is kept apart
        self.autotune_first_step = device.type == "cuda" and self.tcfg.cudnn_benchmark
        # the data module's own metrics and preview where it has them (contracts.BuildsMetrics,
        # contracts.Previews), else BraTS region metrics and a slice panel; the metrics group's
        # options (configs/metrics/)
        options = dataclasses.asdict(metrics_config(cfg))
        self.metrics: Metrics = validation_metrics(data, options)
        self.preview = data.preview if isinstance(data, Previews) else slice_panel
        # state that a resume restores
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.should_stop = False
        self.trained = False  # whether fit() trained (False: the run was already finished)
        self.best: dict[str, Any] = {"name": self.tcfg.monitor, "value": None, "epoch": None}
        self.final_metrics: dict[str, float] = {}
        self.initial_metrics: dict[str, float] | None = None  # trainer.val_before_training
        self.history: list[dict[str, Any]] = []
        self.peak_memory_bytes = 0  # of the training steps, over the run (contract 4)
        # peaks over the run of what runs outside the steps, and of CUDA's reserved memory
        self.other_peaks: dict[str, int] = {}
        self.epoch_peaks: dict[str, int] = {}  # the same, and "train", in the current epoch
        self.rss_peak_bytes: int | None = None
        self.step_times: list[float] = []
        self.batch_in_epoch = 0  # batches of the current epoch already trained on
        # the epoch's summed training loss (float64, on the device: read once per epoch)
        self.epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.epoch_loss_count = 0
        self.skipped_steps = 0
        self.planned_peak_bytes: int | None = None
        self.precision = self.tcfg.precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self._step: TrainStep | None = None  # built on first use, again after a re-wrap
        # micro-batches per optimizer step (gradient accumulation)
        self.accumulate = self.tcfg.accumulate_grad_batches

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything a resume restores. ``rng_ranks``: every rank's RNG states (DDP), saved so
        that each rank resumes its own random streams."""
        return {
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "should_stop": self.should_stop,
            "best": dict(self.best),
            "final_metrics": dict(self.final_metrics),
            "initial_metrics": self.initial_metrics,
            "history": list(self.history),
            "peak_memory_bytes": self.peak_memory_bytes,
            "other_peaks": dict(self.other_peaks),
            "rss_peak_bytes": self.rss_peak_bytes,
            "step_times": list(self.step_times),
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_loss_sum": float(self.epoch_loss_sum),
            "epoch_loss_count": self.epoch_loss_count,
            "skipped_steps": self.skipped_steps,
            "scaler": self.scaler.state_dict(),
            "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items()},
            "rng": rng_state(self.device),
            "rng_ranks": rng_ranks,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "revseg_version": revseg.__version__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["model"])
        if {id(p) for p in self.network.parameters()} != {
            id(p) for g in self.optimizer.param_groups for p in g["params"]
        }:
            self.sync_optimizer_params()  # the model changed shape on load (e.g. grown ranks)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.should_stop = bool(state.get("should_stop", False))
        self.best = dict(state["best"])
        self.final_metrics = dict(state["final_metrics"])
        self.initial_metrics = state["initial_metrics"]
        self.history = list(state["history"])
        self.peak_memory_bytes = int(state["peak_memory_bytes"])
        self.other_peaks = {k: int(v) for k, v in (state.get("other_peaks") or {}).items()}
        self.rss_peak_bytes = state.get("rss_peak_bytes")
        self.step_times = [float(t) for t in state["step_times"]]
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.epoch_loss_sum.fill_(float(state["epoch_loss_sum"]))
        self.epoch_loss_count = int(state["epoch_loss_count"])
        self.skipped_steps = int(state["skipped_steps"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
            self._step = None  # the next step reads the restored scale
        for name, cb in self.callbacks.items():
            if name in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][name])
        own = restore_rng(state, self.dist.rank, self.dist.world_size, self.device)
        if not own and self.dist.is_main:
            rngs = state.get("rng_ranks")
            log.warning(
                "the checkpoint holds the RNG states of %d process(es), not %d: every rank "
                "restores rank 0's, so the random streams differ from an uninterrupted run",
                len(rngs) if rngs else 1,
                self.dist.world_size,
            )

    def save_checkpoint(self, name: str) -> Path:
        path = self.ckpt_dir / name
        # every rank's RNG states (a collective: every rank calls this); one writer, and every
        # rank reads the same file on resume
        rngs = gather_objects(rng_state(self.device), self.dist) if self.dist.enabled else None
        if self.dist.is_main:
            save_atomic(with_checksum(self.state_dict(rngs)), path)
        return path

    def resume(self, resume: bool | str, checkpoint: tuple[Path, dict] | None = None) -> None:
        """Continue from ``<run>/checkpoints/last.pt`` (``True``) or from a given file.

        Args:
            resume: ``trainer.resume``.
            checkpoint: ``(path, state)`` already read by :func:`read_resume_checkpoint`.

        Raises:
            ConfigError: no checkpoint there, or one whose weights do not fit the model (the
                message names the checkpoint and its model).
        """
        path, state = checkpoint or read_resume_checkpoint(resume, self.ckpt_dir, self.cfg)
        try:
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"trainer.resume: {path} does not fit this {_current_model(self.cfg)} model "
                f"({_saved_model(state)[0]} with {_config_differences(state, self.cfg)}): {first}"
            ) from None
        log.info("resumed from %s after epoch %d (step %d)", path, self.epoch, self.global_step)

    # ---------------------------------------------------------------- steps
    def _static_tensors(self, *batch: torch.Tensor) -> list[torch.Tensor]:
        tensors = list(self.wrapped.parameters()) + list(batch)
        for state in self.optimizer.state.values():
            tensors.extend(v for v in state.values() if torch.is_tensor(v))
        return tensors

    def compute_loss(
        self, logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The loss, restricted to ``mask`` (a batch's ``loss_mask``) when the data gives one."""
        if mask is None:
            return self.loss_fn(logits, label)
        return self.loss_fn(logits, label, mask=mask)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """What training calls: ``model``, in DistributedDataParallel when distributed, then
        compiled with ``trainer.compile`` (the reversible sequences' autograd Functions run
        eagerly between the compiled graphs, so memory saving is kept)."""
        if self.dist.enabled:
            model = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.tcfg.find_unused_parameters,
            )
        backend = compile_backend(self.tcfg.compile)
        if backend is not None:
            model = torch.compile(model, backend=backend)
        return model

    def _to_device(self, t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """A batch tensor on the training device, channels-last for 5D tensors when
        ``trainer.channels_last``."""
        if self.channels_last and t.ndim == 5:
            return t.to(self.device, non_blocking=non_blocking, memory_format=CHANNELS_LAST)
        return t.to(self.device, non_blocking=non_blocking)

    def sync_optimizer_params(self) -> None:
        """Make the optimizer's parameters ``list(model.parameters())``, keeping existing state.

        For models whose parameters change during training (block-rank growth): new parameters
        join the (single) parameter group with fresh state, removed ones leave it.
        """
        if len(self.optimizer.param_groups) != 1:
            raise RuntimeError("sync_optimizer_params supports one parameter group")
        params = list(self.network.parameters())
        keep = {id(p) for p in params}
        for p in [p for p in self.optimizer.state if id(p) not in keep]:
            del self.optimizer.state[p]
        self.optimizer.param_groups[0]["params"] = params
        # DDP's buckets are built for a fixed set of parameters
        self.wrapped = self._wrap(self.network)

    @contextlib.contextmanager
    def _compile_errors(self) -> Any:
        """A torch.compile failure (``trainer.compile``) as one line naming the model."""
        if compile_backend(self.tcfg.compile) is None:
            yield
            return
        from torch._dynamo.exc import TorchDynamoException

        try:
            yield
        except TorchDynamoException as err:
            first = next((line for line in str(err).splitlines() if line.strip()), "")
            raise TrainingError(
                f"trainer.compile={_text(self.tcfg.compile)}: torch.compile failed on the "
                f"{_current_model(self.cfg)} model ({type(err).__name__}: {first.strip()}); "
                "train without it (trainer.compile=false)"
            ) from None

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.precision)

    def _non_finite(self, what: str, value: float, cases: list[str]) -> None:
        """Stop (default) or skip the step after a NaN/Inf, naming the step and the case."""
        where = f"epoch {self.epoch + 1}, step {self.global_step + 1}"
        case = f", case {', '.join(map(str, cases))}" if cases else ""
        if self.tcfg.nan_policy == "skip":
            self.skipped_steps += 1
            log.warning("non-finite %s (%s) at %s%s: step skipped", what, value, where, case)
            return
        last = self.ckpt_dir / "last.pt"
        kept = f"; the last good checkpoint is {last}" if last.exists() else ""
        raise TrainingError(f"non-finite {what} ({value}) at {where}{case}{kept}")

    def _account(self, phase: str, m: MemoryMeasurement) -> None:
        """Add a measurement of ``phase`` (train, val or callbacks) to the epoch's and the run's
        peaks; on CUDA also to the reserved peak.

        With ``trainer.cudnn_benchmark`` on CUDA the first training step of each process runs
        cuDNN's autotuner, whose trial workspaces are freed after it: that step's peak goes to
        ``autotune`` (``summary.json`` ``autotune_peak_bytes``), not to the training peak.
        """
        if phase == "train" and self.autotune_first_step:
            self.autotune_first_step = False
            phase = "autotune"
            log.info(
                "trainer.cudnn_benchmark: the first step's peak (%s, with the cuDNN autotuner's "
                "trial workspaces) is left out of the training peak (autotune_peak_bytes in "
                "summary.json)",
                format_bytes(m.peak_bytes),
            )
        peaks = {phase: m.peak_bytes}
        if m.reserved_bytes is not None:
            peaks["reserved"] = m.reserved_bytes
        for key, value in peaks.items():
            self.epoch_peaks[key] = max(self.epoch_peaks.get(key, 0), value)
            if key == "train":
                self.peak_memory_bytes = max(self.peak_memory_bytes, value)
            else:
                self.other_peaks[key] = max(self.other_peaks.get(key, 0), value)
        if m.rss_peak_bytes is not None:
            self.rss_peak_bytes = max(self.rss_peak_bytes or 0, m.rss_peak_bytes)

    def _callbacks(self, hook: str, *args: Any) -> None:
        """Run every callback's ``hook`` under the memory meter (phase ``callbacks``)."""
        if not self.callbacks:
            return
        with self.meter.measure(static=self._static_tensors()) as m:
            for cb in self.callbacks.values():
                getattr(cb, hook)(self, *args)
        self._account("callbacks", m)

    def _train_step(self) -> TrainStep:
        """The run's :class:`~revseg.step.TrainStep` over ``self.wrapped``, built once and again
        when the model is re-wrapped (e.g. after block-rank growth)."""
        if self._step is not None and self._step.model is self.wrapped:
            return self._step
        ddp = self.wrapped if isinstance(self.wrapped, DistributedDataParallel) else None
        step = TrainStep(
            self.wrapped,
            self.optimizer,
            self.compute_loss,
            device=self.device,
            precision=self.precision,
            scaler=self.scaler,
            grad_clip=self.tcfg.grad_clip,
            all_finite=lambda flag: all_ranks_agree(flag, self.dist, self.device),
            no_sync=ddp.no_sync if ddp is not None else None,
            guard=self._compile_errors,
            autocast=self._autocast,
        )
        if self._step is not None:  # the scale after the last step (fp16, read without a sync)
            step.scale = self._step.scale
        self._step = step
        return step

    def training_step(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        mask: torch.Tensor | None = None,
        cases: list[str] | None = None,
    ) -> torch.Tensor | None:
        """One optimisation step on one batch (see :meth:`accumulated_step`)."""
        return self.accumulated_step([(image, label, mask)], cases)

    def accumulated_step(
        self, micro_batches: list[MicroBatch], cases: list[str] | None = None
    ) -> torch.Tensor | None:
        """One optimisation step over ``micro_batches`` (gradient accumulation), measured.

        Each micro-batch goes to the device just before its forward. Returns the detached mean
        loss (a 0-dim tensor on the training device: reading it synchronises), or ``None`` for
        a skipped step (a non-finite loss or gradient norm with ``trainer.nan_policy=skip``, or
        an fp16 step whose gradients overflowed, which the GradScaler skips and backs off
        from); skipped steps count in ``skipped_steps``.
        """

        def on_device() -> Iterator[MicroBatch]:
            for image, label, mask in micro_batches:
                yield (
                    self._to_device(image, non_blocking=True),
                    self._to_device(label, non_blocking=True),
                    None if mask is None else self._to_device(mask, non_blocking=True),
                )

        self.optimizer.zero_grad(set_to_none=True)
        step = self._train_step()
        held = [t for batch in micro_batches for t in batch if t is not None]
        with self.meter.measure(static=self._static_tensors(*held)) as m:
            start = time.perf_counter()
            result = step(on_device(), count=len(micro_batches))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
        if result.skipped == NON_FINITE:
            value = float(result.loss)
            what = "loss" if not math.isfinite(value) else "gradient norm"
            norm = float(result.grad_norm) if result.grad_norm is not None else float("nan")
            self._non_finite(what, value if what == "loss" else norm, cases or [])
            return None
        self.last_measurement = m
        self._account("train", m)
        self.step_times.append(seconds)
        if result.skipped == OVERFLOW:
            log.info(
                "fp16 gradients overflowed at epoch %d, step %d: the GradScaler skipped the "
                "update and lowered its scale to %g",
                self.epoch + 1,
                self.global_step + 1,
                step.scale,
            )
            self.skipped_steps += 1
            return None
        self.global_step += 1
        if self.writer is not None and self.global_step % self.tcfg.log_every_n_steps == 0:
            norm = result.grad_norm if result.grad_norm is not None else 0.0
            self.writer.add_scalar("train/loss_step", float(result.loss), self.global_step)
            self.writer.add_scalar("train/grad_norm", float(norm), self.global_step)
            self.writer.add_scalar("memory/peak_step_mib", m.peak_bytes / 2**20, self.global_step)
            self.writer.add_scalar("time/step_s", seconds, self.global_step)
        return result.loss

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch; a run resumed mid-epoch skips the batches it already trained on.

        The data order of epoch ``e`` depends only on ``seed + e``, so skipping the first
        ``batch_in_epoch`` batches of the same loader reproduces the uninterrupted run.
        """
        self.wrapped.train()
        loader = self.data.train_dataloader(
            seed=int(self.cfg.seed) + self.epoch, pin_memory=self.pin_memory
        )
        if self.dist.enabled:
            loader = shard_loader(loader, self.dist, int(self.cfg.seed), self.epoch, shuffle=True)
        limit = self.tcfg.limit_train_batches
        total = min(len(loader), limit) if limit else len(loader)
        every = self.tcfg.checkpoint_every_n_steps
        bar = tqdm(
            loader,
            total=total,
            desc=f"epoch {self.epoch + 1}/{self.tcfg.max_epochs}",
            disable=not (self.tcfg.progress_bar and self.dist.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        k = self.accumulate
        group: list[MicroBatch] = []
        cases: list[str] = []
        for index, batch in enumerate(bar):
            if limit and index >= limit:
                break
            if index < self.batch_in_epoch:
                continue  # trained before the interruption (always a whole group)
            group.append((batch["image"], batch["label"], batch.get("loss_mask")))
            cases += list(batch.get("case", []))
            # groups of k batches from the epoch's start; the last one may be shorter
            if len(group) < k and index + 1 < total:
                continue
            loss = self.accumulated_step(group, cases)
            group, cases = [], []
            if loss is not None:
                self.epoch_loss_sum += loss
                self.epoch_loss_count += 1
                if not bar.disable and self.global_step % self.tcfg.log_every_n_steps == 0:
                    peak = format_bytes(self.peak_memory_bytes)
                    bar.set_postfix(loss=f"{float(loss):.4f}", peak=peak)
                self._callbacks("on_train_batch_end", batch, self.global_step)
            self.batch_in_epoch = index + 1
            if every and self.global_step % every == 0 and self.batch_in_epoch < total:
                self.save_checkpoint("last.pt")
        bar.close()
        mean = float(self.epoch_loss_sum) / max(self.epoch_loss_count, 1)
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count, self.batch_in_epoch = 0, 0
        if self.dist.enabled:  # the same number on every rank, so callbacks decide alike
            mean = mean_over_ranks(mean, self.dist, self.device)
        return {"train/loss": mean}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.network.eval()
        self.metrics.reset()
        losses = []
        limit = self.tcfg.limit_val_batches
        # every rank validates every case with the bare module (no DDP collectives); fit() then
        # hands rank 0's metrics to every rank (MONAI's metrics gather across ranks; the repeated
        # cases leave the means unchanged)
        for index, batch in enumerate(self.data.val_dataloader(pin_memory=self.pin_memory)):
            if limit and index >= limit:
                break
            image = self._to_device(batch["image"])
            label = self._to_device(batch["label"])
            mask = batch.get("loss_mask")
            mask = self._to_device(mask) if mask is not None else None
            static = self._static_tensors(image, label, *([] if mask is None else [mask]))
            with self.meter.measure(static=static) as m:
                with self._autocast():
                    logits = self.network(image).float()
                losses.append(float(self.compute_loss(logits, label, mask)))
                pred = self.metrics.update(logits, label)
            self._account("val", m)
            if index == 0 and self.dist.is_main and self.tcfg.log_images:
                # the labelled figure of the first case, in TensorBoard and as val_slice.png
                shown = self.preview(image[0], label[0], pred[0])
                save_png(shown, self.output_dir / "val_slice.png")
                if self.writer is not None:
                    self.writer.add_image("val/slice_input_label_prediction", shown, self.epoch)
        metrics = {val_key(k): v for k, v in self.metrics.compute().items()}
        if isinstance(self.metrics, Figures) and self.writer is not None and self.tcfg.log_images:
            for name, image in self.metrics.figures().items():  # (3, H, W), e.g. IoU per frame
                self.writer.add_image(f"val/{name}", image, self.epoch)
        metrics[val_key("loss")] = sum(losses) / max(len(losses), 1)
        return metrics

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        max_epochs = self.tcfg.max_epochs
        for cb in self.callbacks.values():
            cb.on_train_start(self)
        if self.epoch >= max_epochs or self.should_stop:
            log.info(
                "nothing to do: %d epochs already completed%s",
                self.epoch,
                " (stopped early)" if self.should_stop else "",
            )
        # decided alike on every rank (train() gathers the peaks only after training)
        self.trained = self.epoch < max_epochs and not self.should_stop
        if self.tcfg.val_before_training and self.epoch == 0 and self.initial_metrics is None:
            self._validate_untrained()
        written = self.output_dir / "summary.json"
        if not self.trained and written.is_file():
            return json.loads(written.read_text())  # a finished run resumed: summary as it was
        while self.epoch < max_epochs and not self.should_stop:
            self.epoch_peaks = {}
            logs = self.train_epoch()
            self.epoch += 1
            if self.scheduler is not None:
                self.scheduler.step()
            logs["lr"] = self.optimizer.param_groups[0]["lr"]
            self._callbacks("on_train_epoch_end", logs)
            improved = False
            if self.epoch % self.tcfg.val_every == 0 or self.epoch == max_epochs:
                # rank 0's metrics on every rank: each rank's own may differ in the last bits
                # (other kernels, reduction orders), and every decision taken from them must be
                # the same everywhere
                metrics = broadcast_object(self.validate(), self.dist)
                logs.update(metrics)
                self.final_metrics = metrics
                improved = self._update_best(metrics)
                self._callbacks("on_validation_end", metrics)
            # saving is a collective: every rank takes rank 0's decisions (a callback may also
            # stop on what only its rank sees)
            improved, self.should_stop = broadcast_object((improved, self.should_stop), self.dist)
            self._log_epoch(logs)
            self.history.append({"epoch": self.epoch, **logs})
            self.save_checkpoint("last.pt")
            if improved:
                self.save_checkpoint("best.pt")
            self.write_summary()
        if self.best["epoch"] is None and self.epoch > 0:
            # no validation yet: best is the latest (decided alike on every rank, without
            # looking at files another rank may be writing: saving is a collective)
            self.save_checkpoint("best.pt")
        summary = self.write_summary()
        self._log_hparams(summary)
        return summary

    def _validate_untrained(self) -> None:
        """Validate the untrained network once (``trainer.val_before_training``): how far from
        chance the run starts, in summary.json (``initial_metrics``) and TensorBoard (epoch 0)."""
        metrics = broadcast_object(self.validate(), self.dist)
        self.initial_metrics = metrics
        name = self.tcfg.monitor
        log.info("untrained: %s=%s", name, metrics.get(name))
        if self.writer is not None:
            self._write_scalars(metrics, 0)

    def _write_scalars(self, values: dict[str, Any], step: int) -> None:
        """Every finite number of ``values`` as a TensorBoard scalar at ``step``."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def _update_best(self, metrics: dict[str, float]) -> bool:
        name = self.tcfg.monitor
        if name not in metrics:
            raise ConfigError(
                f"trainer.monitor={name!r} is not a validation metric: {sorted(metrics)}"
            )
        value = metrics[name]
        sign = 1.0 if self.tcfg.monitor_mode == "max" else -1.0
        if math.isfinite(value) and (
            self.best["value"] is None or sign * (value - self.best["value"]) > 0
        ):
            self.best = {"name": name, "value": float(value), "epoch": self.epoch}
            return True
        return False

    def _log_epoch(self, logs: dict[str, float]) -> None:
        parts = [
            f"{k}={v:.4f}"
            for k, v in logs.items()
            if isinstance(v, float) and not k.startswith(_NOT_PRINTED, k.find("/") + 1)
        ]
        log.info(
            "epoch %d/%d %s peak=%s",
            self.epoch,
            self.tcfg.max_epochs,
            " ".join(parts),
            format_bytes(self.peak_memory_bytes),
        )
        if self.writer is None:
            return
        self._write_scalars(logs, self.epoch)
        # this epoch's peaks (summary.json holds the run's): training steps, validation,
        # callbacks, and on CUDA the allocator's reserve over all three
        for phase, tag in (
            ("train", "peak_mib"),
            ("val", "val_peak_mib"),
            ("callbacks", "callbacks_peak_mib"),
            ("reserved", "reserved_peak_mib"),
        ):
            if phase in self.epoch_peaks:
                self.writer.add_scalar(f"memory/{tag}", self.epoch_peaks[phase] / 2**20, self.epoch)
        self.writer.flush()

    def _log_hparams(self, summary: dict[str, Any]) -> None:
        if self.writer is None:
            return
        hparams = {
            "model": summary["model"],
            "memory_saving": bool(self.cfg.model.get("memory_saving", False)),
            "encoder_depth": str(self.cfg.model.get("encoder_depth", "-")),
            "decoder_depth": str(self.cfg.model.get("decoder_depth", "-")),
            "lr": float(self.cfg.optimizer.lr),
            "input_shape": "x".join(str(s) for s in self.data.input_shape),
            "params": summary["params"],
            "seed": int(self.cfg.seed),
        }
        metrics = {
            f"hparam/{k.split('/', 1)[-1]}": v
            for k, v in self.final_metrics.items()
            if isinstance(v, float) and math.isfinite(v)
        }
        metrics["hparam/peak_memory_mib"] = summary["peak_memory_bytes"] / 2**20
        metrics["hparam/step_time_s"] = summary["step_time_s"] or 0.0
        # one session per run, replaced by a resumed run's (the writer's add_hparams would add
        # a second one); the run directory is the writer's log_dir
        write_hparams(self.output_dir, hparams, metrics, step=self.epoch)

    # ---------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        shape = list(self.data.input_shape)
        voxels = math.prod(shape)
        batch = int(self.cfg.data.get("batch_size", 1))
        times = self.step_times[1:] or self.step_times  # the first step warms up caches
        # the training steps' peak; the autotuning step's only when no other step ran
        peak = self.peak_memory_bytes or self.other_peaks.get("autotune", 0)
        return {
            "model": model_name(self.cfg),
            "data": data_name(self.cfg),
            "epochs_completed": self.epoch,
            "global_step": self.global_step,
            "stopped_early": self.should_stop,
            "skipped_steps": self.skipped_steps,
            "precision": self.precision,
            "tf32": tf32_flags(),
            "accumulate_grad_batches": self.accumulate,
            "best_metric": dict(self.best),
            "final_metrics": dict(self.final_metrics),
            "initial_metrics": self.initial_metrics,
            "params": sum(p.numel() for p in self.network.parameters()),
            "world_size": self.dist.world_size,
            "peak_memory_bytes": peak,
            "peak_memory": format_bytes(peak),
            "val_peak_memory_bytes": self.other_peaks.get("val"),
            "callbacks_peak_memory_bytes": self.other_peaks.get("callbacks"),
            "peak_reserved_bytes": self.other_peaks.get("reserved"),
            "autotune_peak_bytes": self.other_peaks.get("autotune"),
            "planned_peak_bytes": self.planned_peak_bytes,
            "memory_method": self.meter.method,
            "rss_peak_bytes": self.rss_peak_bytes,
            "step_time_s": statistics.median(times) if times else None,
            "input_shape": shape,
            "batch_size": batch,
            "voxels_per_sample": voxels,
            "bytes_per_voxel": peak / (voxels * batch) if voxels else None,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "revseg": revseg.__version__,
            "output_dir": str(self.output_dir),
            **self.model_memory(),
            **{k: v for cb in self.callbacks.values() for k, v in cb.summary().items()},
        }

    def model_memory(self) -> dict[str, Any]:
        """The model's own memory report (e.g. Peters et al.'s Table 2 terms), if it has one."""
        if not isinstance(self.network, MemoryReport):
            return {}
        batch = int(self.cfg.data.get("batch_size", 1))
        shape = tuple(self.data.input_shape)
        return {"model_memory": self.network.memory_report(shape, batch).megabytes()}

    def write_summary(self) -> dict[str, Any]:
        summary = self.summary()
        if not self.dist.is_main:
            return summary
        text = json.dumps(summary, indent=2, allow_nan=True, default=str)
        write_text_atomic(text + "\n", self.output_dir / "summary.json")
        return summary


def _saved_model(state: dict[str, Any]) -> tuple[str, DictConfig | None]:
    """The model a checkpoint was trained with: its name (config option or class) and config."""
    try:
        saved = OmegaConf.create(state["config"]).get("model")
    except Exception:  # noqa: BLE001 - an unreadable config is reported as unknown
        saved = None
    if saved is None or "_target_" not in saved:
        return "an unknown model", None
    target = str(saved._target_)
    return model_option(target) or target, saved


def _text(value: Any) -> str:
    """A config value as the command line writes it (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _current_model(cfg: DictConfig) -> str:
    return model_option(str(cfg.model._target_)) or model_name(cfg)


def _config_differences(state: dict[str, Any], cfg: DictConfig) -> str:
    """``model.<key>=<saved>`` for each model key whose saved value differs from ``cfg``'s."""
    _, saved = _saved_model(state)
    if saved is None:
        return "an unreadable config"
    now = OmegaConf.to_container(cfg.model, resolve=True)
    then = OmegaConf.to_container(saved, resolve=True)
    keys = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if not keys:
        return "the same model config"
    return ", ".join(f"model.{k}={then.get(k)!r}".replace("'", "") for k in keys)


# what a resumed run may change without saying so: how long it trains and how it reports, where it
# runs and where it finds the data (everything else changes what it trains and is refused)
RESUME_MAY_CHANGE = (
    "trainer.max_epochs",
    "trainer.resume",
    "trainer.resume_changes",
    "trainer.overwrite",
    "trainer.device",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
    "trainer.log_images",
    "trainer.checkpoint_every_n_steps",
    "trainer.plan_memory",
    "trainer.val_every",
    "trainer.val_before_training",
    "trainer.limit_val_batches",
    "data.root",
    "data.num_workers",
    "metrics",
    "paths",
    "logger",
    "task_name",
)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _covered(key: str, prefixes: Any) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def resume_differences(state: dict[str, Any], cfg: DictConfig) -> list[str]:
    """``key=<now> (was <then>)`` for every setting that differs from the checkpoint's run,
    except those a resumed run may change (:data:`RESUME_MAY_CHANGE`) and those the user names
    in ``trainer.resume_changes``."""
    try:
        then = _flat(OmegaConf.to_container(OmegaConf.create(state["config"]), resolve=True))
    except Exception:  # noqa: BLE001 - an unreadable config: the model check reports it
        return []
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    intended = [str(k) for k in (cfg.trainer.get("resume_changes") or [])]
    return [
        f"{key}={_text(now.get(key))} (was {_text(then.get(key))})"
        for key in sorted(set(now) | set(then))
        if now.get(key) != then.get(key)
        and not _covered(key, RESUME_MAY_CHANGE)
        and not _covered(key, intended)
    ]


def read_resume_checkpoint(
    resume: bool | str, ckpt_dir: Path, cfg: DictConfig
) -> tuple[Path, dict[str, Any]]:
    """Read the checkpoint ``trainer.resume`` names and check it holds the configured model.

    Loaded on the CPU: ``load_state_dict`` copies to the parameters' device, and the RNG states
    stay on the CPU. Called before the data is read, so a wrong checkpoint fails at once.

    Raises:
        ConfigError: no checkpoint there, or one of another model (the message names the
            checkpoint and the model it holds).
    """
    path = ckpt_dir / "last.pt" if resume is True else Path(str(resume))
    if not path.is_file():
        raise ConfigError(f"trainer.resume={resume}: no checkpoint at {path}")
    state = load_checkpoint(path, map_location="cpu")
    name, saved = _saved_model(state)
    if saved is None or str(saved._target_) != str(cfg.model._target_):
        raise ConfigError(
            f"trainer.resume: {path} holds {name}, not {_current_model(cfg)}: resume with "
            f"model={name}, or start a new run in another directory"
        )
    changed = resume_differences(state, cfg)
    if changed:
        keys = ",".join(c.split("=", 1)[0] for c in changed)
        raise ConfigError(
            f"trainer.resume: {path} was trained with other settings: {'; '.join(changed)}; "
            f"resume with the same ones, or say the change is intended with "
            f"trainer.resume_changes=[{keys}]"
        )
    return path, state


def check_channels(cfg: DictConfig, data: Any) -> None:
    """The model's ``in_channels`` / ``out_channels`` must be what the data gives, e.g. one
    channel per object with ``data.objects=all`` (known once the data is read).

    Raises:
        ConfigError: naming both keys and the value the data needs.
    """
    for key in ("in_channels", "out_channels"):
        wanted, given = getattr(data, key, None), cfg.model.get(key)
        if wanted is None or given is None or int(given) == int(wanted):
            continue
        what = "input channels" if key == "in_channels" else "label channels"
        reason = ""
        if key == "out_channels" and cfg.data.get("objects") == "all":
            names = ", ".join(getattr(data, "channel_names", ()))
            reason = f" with data.objects=all ({names})"
        raise ConfigError(
            f"model.{key}={given} but the data gives {wanted} {what}{reason}: "
            f"set model.{key}={wanted}"
        )


def remove_stale_temporaries(output_dir: Path) -> None:
    """Remove the temporary files of a process killed while writing (the real files are
    intact); one that is already gone (another process removed it) is fine."""
    for stale in [
        *output_dir.glob(".summary.json.*.tmp"),
        *(output_dir / "checkpoints").glob(".*.tmp"),
    ]:
        stale.unlink(missing_ok=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the model the composed config describes; returns the run summary (``summary.json``).

    Raises:
        ConfigError / DataError: bad config values or data (one line naming the key or file).
    """
    validate_config(cfg)
    options = trainer_config(cfg)
    device = resolve_device(options.device)
    info = init_distributed(options.strategy, options.ddp_backend, device.type)
    device = training_device(device, info)
    # every rank uses rank 0's run directory (Hydra names one per process)
    output_dir = Path(broadcast_object(str(cfg.paths.output_dir), info))
    if not info.is_main:
        return _train(cfg, options, device, info, output_dir)
    # one run per directory; a fresh run does not replace another's checkpoints
    check_fresh_run(output_dir, options.resume, options.overwrite)
    with claim_run_dir(output_dir):
        # before anything is read or trained: a save must not fail an epoch later
        check_writable(output_dir, "paths.output_dir (the run directory)")
        check_writable(output_dir / "checkpoints", "the checkpoint directory")
        return _train(cfg, options, device, info, output_dir)


def _train(
    cfg: DictConfig, options: Any, device: torch.device, info: Any, output_dir: Path
) -> dict[str, Any]:
    """:func:`train` once the run directory is this run's."""
    seed_everything(int(cfg.seed))
    if options.precision == "bf16" and device.type == "cpu":
        log.info(
            "trainer.precision=bf16 on CPU: convolutions of inputs with a spatial size of 2 run "
            "in float32 (torch's CPU bf16 conv3d weight gradient is wrong there; "
            "docs/precision.md)"
        )
    if options.deterministic:
        set_deterministic(device)
    set_cudnn_benchmark(options.cudnn_benchmark)
    set_tf32(options.tf32)
    if compile_backend(options.compile) and device.type != "cuda":
        raise ConfigError(
            f"trainer.compile={_text(options.compile)} needs trainer.device=cuda: on {device} the "
            "step's memory is measured under a dispatch mode, in which torch.compile does not "
            "compile (the model would run uncompiled); use trainer.compile=false"
        )

    model = build(cfg.model, "model").to(device)
    check_input_sizes(cfg, model_divisor(model))
    checkpoint = None
    if options.resume:  # before the data is read: a wrong checkpoint fails at once
        checkpoint = read_resume_checkpoint(options.resume, output_dir / "checkpoints", cfg)
    optimizer = build(cfg.optimizer, "optimizer")(params=parameter_groups(model, cfg.optimizer.lr))
    scheduler = (
        build(cfg.scheduler, "scheduler")(optimizer=optimizer) if cfg.get("scheduler") else None
    )
    loss_fn = build(cfg.loss, "loss")
    callbacks = {
        name: build(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c
    }
    data = build(cfg.data, "data")
    check_data_module(data)
    data.setup()
    check_channels(cfg, data)
    if isinstance(data, WritesSplit) and info.is_main:
        data.write_split(output_dir)  # the cases used for training and validation
    logging_here = cfg.get("logger") and info.is_main
    writer = build(cfg.logger, "logger", log_dir=str(output_dir)) if logging_here else None
    if info.is_main:
        remove_stale_temporaries(output_dir)
    trainer = Trainer(
        cfg, model, data, loss_fn, optimizer, scheduler, callbacks, writer, output_dir, device, info
    )
    if checkpoint is not None:
        trainer.resume(options.resume, checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s: %.2fM parameters on %s, input %s, %d train / %d val cases, run dir %s",
        model_name(cfg),
        n_params / 1e6,
        device,
        "x".join(map(str, data.input_shape)),
        len(data.train_cases),
        len(data.val_cases),
        output_dir,
    )
    if options.plan_memory and info.is_main:
        from revseg.memory.plan import plan_run

        try:  # the planner's prediction, next to the measured peak in summary.json
            plan = plan_run(cfg, model, optimizer, loss_fn, data, writer=writer)
            # the traced peak plus what a CUDA plan computes: what max_memory_allocated reaches
            trainer.planned_peak_bytes = int(plan.allocated_bytes)
            log.info("memory plan:\n%s", plan.table())
        except Exception as err:  # noqa: BLE001 - a failed plan must not stop training
            log.warning("memory plan failed (%s: %s); training goes on", type(err).__name__, err)
    if isinstance(model, MemoryReport):
        text = str(model.memory_report(tuple(data.input_shape), int(cfg.data.get("batch_size", 1))))
        log.info("model memory at %s: %s", "x".join(map(str, data.input_shape)), text)
        if writer is not None:
            writer.add_text("model/memory_report", text, 0)
    if info.is_main:  # every check passed: the run's record may now be (re)written
        write_run_record(output_dir, cfg)
    finished = False
    try:
        summary = trainer.fit()
        if info.enabled and trainer.trained:  # the peak of the busiest rank
            trainer.peak_memory_bytes = max_over_ranks(trainer.peak_memory_bytes, info, device)
            for key in ("val", "callbacks", "reserved", "autotune"):
                value = max_over_ranks(trainer.other_peaks.get(key, -1), info, device)
                if value >= 0:
                    trainer.other_peaks[key] = value
            summary = trainer.write_summary()
        finished = True
    finally:
        if writer is not None:
            writer.close()
        if info.enabled:
            del trainer  # its DDP wrapper freed while the group lives: see end_process_group
            end_process_group(synchronize=finished)
    log.info(
        "done: %d epochs, best %s = %s at epoch %s, peak memory %s (%s), median step %.3f s",
        summary["epochs_completed"],
        summary["best_metric"]["name"],
        summary["best_metric"]["value"],
        summary["best_metric"]["epoch"],
        summary["peak_memory"],
        summary["memory_method"],
        summary["step_time_s"] or float("nan"),
    )
    return summary
