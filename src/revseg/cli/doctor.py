"""``revseg-doctor`` (and ``python scripts/doctor.py``): check this machine before training on it.

The first command on a new GPU node or after installing another torch. Prints torch, CUDA,
cuDNN and NCCL versions and the devices, then on every device (the CPU always, each visible
GPU):

- a tiny partially reversible U-Net's gradients with memory saving against plain autograd
  (float64, contract 3 of docs/architecture.md: relative error < 1e-6);
- a short training step under the peak-memory meter (:mod:`revseg.memory.measure`);
- a forward and backward under bf16 and fp16 autocast (finite loss and gradients, reversible
  states kept float32);

then DistributedDataParallel on one device (the CPU, and the first GPU): two gloo processes
whose float64 gradients must equal one process's on the combined batch; and NCCL: a 2-process
all-reduce with two or more GPUs, a one-process DDP step with one GPU (so DDP can be checked on a
one-GPU node). Each check prints one line, ``ok``,
``skip`` (what this machine cannot run, e.g. CUDA on a CPU node) or ``FAIL``; every failure is
also one ``error:`` line on stderr, and the exit status is 1 when any check failed.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from revseg.cli import run_main

__all__ = ["Check", "checks", "main", "run"]

GRAD_TOLERANCE = (
    1e-6  # float64 gradients, memory saving vs plain autograd (docs/architecture.md, contract 3)
)


class Skip(Exception):
    """A check this machine cannot run (reported as ``skip``, not as a failure)."""


@dataclass
class Check:
    """One line of the report: ``name`` runs ``fn() -> detail`` (raises on failure)."""

    name: str
    fn: Callable[[], str]


def _tiny_unet(
    memory_saving: bool, dtype: torch.dtype, device: torch.device, **kwargs: Any
) -> torch.nn.Module:
    """A small prev_unet (``kwargs``: more of its arguments, e.g. ``chunks``), the same weights
    with and without memory saving."""
    from revseg.models.prev_unet import PartiallyReversibleUNet

    torch.manual_seed(0)
    model = PartiallyReversibleUNet(
        channels=(8, 16),
        encoder_depth=2,
        decoder_depth=2,
        norm_groups=2,
        memory_saving=memory_saving,
        **kwargs,
    )
    return model.to(device=device, dtype=dtype)


def _batch(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 8, 8, 8, generator=g, dtype=dtype)
    label = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.7).to(dtype)
    return image.to(device), label.to(device)


def _loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    from revseg.training.losses import RegionDiceLoss

    return RegionDiceLoss()(logits.float(), label.float())


def check_gradients(device: torch.device) -> str:
    """Memory-saving gradients equal plain autograd's (float64)."""
    saving = _tiny_unet(True, torch.float64, device)
    plain = _tiny_unet(False, torch.float64, device)
    image, label = _batch(device, torch.float64)
    grads = []
    for model in (saving, plain):
        _loss(model(image), label).backward()
        grads.append([p.grad for p in model.parameters()])
    worst = max(
        float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(*grads, strict=True)
    )
    if not worst < GRAD_TOLERANCE:
        raise AssertionError(
            f"memory-saving gradients differ from plain autograd: relative error {worst:.2e} "
            f"(limit {GRAD_TOLERANCE:.0e})"
        )
    return f"memory-saving gradients = plain autograd (float64, max relative error {worst:.1e})"


def check_training_step(device: torch.device) -> str:
    """One Adam step of the tiny U-Net under the peak-memory meter."""
    from revseg.memory.measure import PeakMemoryMeter, format_bytes
    from revseg.step import TrainStep

    model = _tiny_unet(True, torch.float32, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = TrainStep(model, optimizer, lambda logits, y, _mask: _loss(logits, y), device=device)
    image, label = _batch(device, torch.float32)
    meter = PeakMemoryMeter(device)
    with meter.measure(static=[list(model.parameters()), image, label]) as m:
        result = step([(image, label, None)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if result.skipped:
        raise AssertionError(f"training step skipped ({result.skipped}): loss {float(result.loss)}")
    if m.peak_bytes <= 0:
        raise AssertionError(f"the memory meter ({meter.method}) measured no memory")
    reserved = f", reserved {format_bytes(m.reserved_bytes)}" if m.reserved_bytes else ""
    return f"training step, peak {format_bytes(m.peak_bytes)} ({meter.method}){reserved}"


def check_autocast(device: torch.device, precision: str) -> str:
    """Forward and backward under autocast: finite loss and gradients, states float32."""
    from revseg.device import autocast_context

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise Skip(f"{device} does not support bf16")
    model = _tiny_unet(True, torch.float32, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    image, label = _batch(device, torch.float32)
    states: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: states.append(out.dtype))
        for m in model.modules()
        if type(m).__name__ == "ReversibleSequence"
    ]
    try:
        with autocast_context(device, precision):
            loss = _loss(model(image), label)
        scaler.scale(loss).backward()
    finally:
        for hook in hooks:
            hook.remove()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    if not torch.isfinite(loss) or bad:
        raise AssertionError(
            f"{precision} autocast: loss {float(loss)}, non-finite gradients {bad}"
        )
    if not states:
        raise AssertionError(f"{precision} autocast: no reversible sequence ran")
    if any(s != torch.float32 for s in states):
        raise AssertionError(f"{precision} autocast: reversible states in {set(states)}")
    return f"{precision} autocast forward/backward (finite, reversible states float32)"


def _all_reduce_worker(rank: int, init_file: str, world_size: int) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        value = torch.full((4,), float(rank + 1), device=f"cuda:{rank}")
        dist.all_reduce(value)
        expected = world_size * (world_size + 1) / 2
        if not torch.all(value == expected):
            raise AssertionError(f"rank {rank}: all-reduce gave {value.tolist()}, not {expected}")
    finally:
        dist.destroy_process_group()


def _ddp_worker(
    rank: int, init_file: str, world_size: int, device: str, backend: str, out: str
) -> None:
    """One rank of :func:`_ddp_gradients`: its share of the batch through the DDP-wrapped tiny
    U-Net (memory saving on); rank 0 saves the averaged gradients to ``out``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from revseg.training.distributed import end_process_group

    where = torch.device(device)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    finished = False
    try:
        model = _tiny_unet(True, torch.float64, where)
        ids = [where.index] if where.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        image, label = _batch(where, torch.float64)
        share = slice(rank * len(image) // world_size, (rank + 1) * len(image) // world_size)
        _loss(ddp(image[share]), label[share]).backward()
        if rank == 0:
            torch.save([p.grad.cpu() for p in model.parameters()], out)
        del ddp, model  # freed while the group lives: see end_process_group
        finished = True
    finally:
        end_process_group(synchronize=finished)


def _ddp_gradients(device: torch.device, backend: str, world_size: int) -> float:
    """``world_size`` DDP processes on ``device``: the worst relative error of their averaged
    gradients against one process's on the combined batch (float64)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        init, out = os.path.join(folder, "init"), os.path.join(folder, "grads.pt")
        args = (init, world_size, str(device), backend, out)
        mp.spawn(_ddp_worker, args=args, nprocs=world_size, join=True)
        ddp = torch.load(out, weights_only=True)
    model = _tiny_unet(True, torch.float64, device)
    image, label = _batch(device, torch.float64)
    _loss(model(image), label).backward()
    plain = [p.grad.cpu() for p in model.parameters()]
    return max(
        float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(ddp, plain, strict=True)
    )


def check_ddp(device: torch.device) -> str:
    """Two gloo processes on one device: DDP's gradients = one process's on the whole batch."""
    worst = _ddp_gradients(device, "gloo", 2)
    if not worst < GRAD_TOLERANCE:
        raise AssertionError(
            f"2-process DDP gradients differ from one process on the combined batch: relative "
            f"error {worst:.2e} (limit {GRAD_TOLERANCE:.0e})"
        )
    return f"2-process DDP on {device} (gloo) = 1 process (float64, max relative error {worst:.1e})"


def check_nccl() -> str:
    """A 2-process NCCL all-reduce on the first two GPUs; with one GPU a one-process NCCL group
    and a DDP step on it."""
    if not torch.cuda.is_available():
        raise Skip("CUDA not available")
    import torch.multiprocessing as mp

    if torch.cuda.device_count() == 1:
        worst = _ddp_gradients(torch.device("cuda", 0), "nccl", 1)
        if not worst < GRAD_TOLERANCE:
            raise AssertionError(f"1-process NCCL DDP gradients: relative error {worst:.2e}")
        return f"1-process NCCL DDP step on cuda:0 (one GPU; max relative error {worst:.1e})"
    with tempfile.TemporaryDirectory() as folder:
        init = os.path.join(folder, "init")
        mp.spawn(_all_reduce_worker, args=(init, 2), nprocs=2, join=True)
    return "2-process NCCL all-reduce on cuda:0 and cuda:1"


def versions() -> list[str]:
    """The software and devices, one line each."""
    cuda = torch.cuda.is_available()
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"CUDA {torch.version.cuda or 'none (a CPU build of torch)'}, "
        f"cuDNN {torch.backends.cudnn.version() if cuda else 'n/a'}, "
        f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if cuda else 'n/a'}",
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
    ]
    for index in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(index)
        lines.append(
            f"cuda:{index}: {p.name}, {p.total_memory / 2**30:.1f} GiB, "
            f"compute capability {p.major}.{p.minor}"
        )
    if not cuda:
        lines.append("cuda: no GPU visible (CUDA checks are skipped)")
    return lines


def checks() -> list[Check]:
    """Every check of this machine, the CPU first, then each visible GPU, then NCCL."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    out = []
    for device in devices:
        out += [
            Check(f"{device} gradients", lambda d=device: check_gradients(d)),
            Check(f"{device} training step", lambda d=device: check_training_step(d)),
            Check(f"{device} bf16", lambda d=device: check_autocast(d, "bf16")),
            Check(f"{device} fp16", lambda d=device: check_autocast(d, "fp16")),
        ]
        if device.index in (None, 0):  # DDP on one device: the CPU and the first GPU
            out.append(Check(f"{device} ddp", lambda d=device: check_ddp(d)))
    if not torch.cuda.is_available():
        out.append(Check("cuda", _skip("CUDA not available")))
    out.append(Check("nccl", check_nccl))
    return out


def _skip(reason: str) -> Callable[[], str]:
    def fn() -> str:
        raise Skip(reason)

    return fn


def main(argv: list[str]) -> int:
    """Print the report; returns 1 when a check failed (each failure one line on stderr)."""
    if argv:
        print("usage: revseg-doctor (no arguments)", file=sys.stderr)
        return 2
    for line in versions():
        print(line)
    failures = []
    for check in checks():
        try:
            detail = check.fn()
            status = "ok"
        except Skip as reason:
            status, detail = "skip", str(reason)
        except Exception as err:  # noqa: BLE001 - every failure is reported, then the next check
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            status, detail = (
                "FAIL",
                f"{type(err).__name__}: {first}" if first else type(err).__name__,
            )
            failures.append(f"{check.name}: {detail}")
        print(f"{status:<5} {check.name}: {detail}", flush=True)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    print(f"{len(failures)} check(s) failed" if failures else "all checks passed")
    return 1 if failures else 0


def run() -> None:
    """The ``revseg-doctor`` command (and ``python scripts/doctor.py``)."""
    run_main(main)
