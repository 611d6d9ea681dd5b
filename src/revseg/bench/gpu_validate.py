"""``revseg-gpu-validate`` (and ``python scripts/gpu_validate.py``): what revseg claims, checked on
the GPU at hand, in one command of at most about 8 minutes, with a JSON and a Markdown report.

Sections (each ``ok``, ``FAIL`` or ``skip`` with its figures):

1. **environment**: torch, CUDA, cuDNN, the GPU, and the TF32 flags (PyTorch's default and
   revseg's, ``trainer.tf32``);
2. **exactness**: float64 gradients with memory saving against plain autograd on the device:
   prev_unet without and with slabs (``model.chunks``), unet_baseline with checkpointing;
3. **channels_last**: prev_unet's gradients with the model and the input channels-last against
   contiguous (float64, and float32 without TF32);
4. **precision by depth**: a reversible level's reconstruction error ``|inverse(f(x)) - x|`` and
   its gradient error against a float64 reference, with memory saving and with plain autograd,
   for depth 1, 2, 4, 8 under fp32, TF32 (on the CPU emulated: the convolutions' inputs rounded to
   TF32's 10-bit mantissa), bf16 and fp16;
5. **full field of view**: one training step (Adam, after a warm-up, each in its own process) of
   prev_unet fp32/bf16/fp16, bf16 with low-precision states, depth 4, slabs off, and unet_baseline
   with checkpointing (1 and 4 encoder blocks), at 160x192x160: the measured
   ``max_memory_allocated`` and ``max_memory_reserved`` beside the planner's predicted
   allocation and its bound (traced, computed and the estimated cuDNN/slack allowance; the check
   fails when the measured allocation exceeds the bound by more than 2 %), and the step time;
6. **resume**: two epochs against one epoch and a resume, on the device: the same weights bit
   for bit (``trainer.deterministic=true``);
7. **ddp**: two gloo processes on the one device, each with half the batch in
   DistributedDataParallel, and on a GPU a one-process NCCL group, against one process with the
   whole batch (float64);
8. **compile**: ``torch.compile`` (inductor) against eager: the same gradients, and the chains'
   memory saving kept.

``--dry-run`` runs everything at small sizes on the CPU (no GPU needed: CI runs it); where a
check needs CUDA it says ``skip``. The exit status is 1 when any check failed.

On a machine lent for a short time::

    python scripts/gpu_validate.py --out docs/benchmarks/gpu
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from revseg.cli import run_main
from revseg.cli.doctor import _ddp_gradients, _tiny_unet

__all__ = ["FULL_FOV", "Section", "main", "run", "validate"]

FULL_FOV = (160, 192, 160)
DRY_FOV = (32, 32, 32)
GRAD_TOLERANCE = 1e-6  # float64, memory saving vs plain autograd (docs/architecture.md)
FP32_TOLERANCE = 1e-4  # float32 without TF32 (gradients, relative)
LOSS_SCALE = 4096.0
F64 = torch.float64
PLAN_SLACK = 1.02  # measured max_memory_allocated may exceed the plan's bound by this much
DEPTHS = (1, 2, 4, 8)
MODES = ("fp32", "tf32", "bf16", "fp16")


class Skip(Exception):
    """A check this machine cannot run (``skip``, not a failure)."""


@dataclass
class Section:
    """One section of the report."""

    name: str
    status: str = "ok"
    seconds: float = 0.0
    detail: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Settings:
    device: torch.device
    dry_run: bool
    fov: tuple[int, int, int]
    deadline: float
    compile_backend: str
    precision_size: tuple[int, int] | None = None  # channels, cube side of precision_by_depth

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float64 (0 vs 0 gives 0)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _max_rel(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    return max(rel_err(a, b) for a, b in zip(xs, ys, strict=True))


# --------------------------------------------------------------------------------------------
# the sections


def environment(s: Settings) -> Section:
    from revseg.device import set_tf32, tf32_flags

    sec = Section("environment")
    default = tf32_flags()
    set_tf32(False)
    row: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(s.device) if s.cuda else "cpu",
        "tf32_torch_default": default,
        "tf32_revseg_default": tf32_flags(),
    }
    if s.cuda:
        props = torch.cuda.get_device_properties(s.device)
        row["memory_gib"] = round(props.total_memory / 2**30, 2)
        row["capability"] = f"{props.major}.{props.minor}"
        row["multiprocessors"] = props.multi_processor_count
    sec.rows.append(row)
    sec.detail = f"{row['device']}, torch {row['torch']}, TF32 default {default}"
    return sec


def _tiny_baseline(checkpointing: bool) -> nn.Module:
    from revseg.models.unet_baseline import UNetBaseline

    torch.manual_seed(0)
    return UNetBaseline(channels=(8, 16), norm_groups=2, checkpointing=checkpointing)


def _grads(model: nn.Module, x: torch.Tensor, layout=torch.contiguous_format) -> list[torch.Tensor]:
    """Gradients of a nonlinear loss: the input's, then every parameter's. The loss is a mean
    times 4096, so that fp16 gradients neither overflow (a sum's did at depth 8) nor underflow
    (relative errors do not depend on the scale)."""
    if layout != torch.contiguous_format:
        model = model.to(memory_format=layout)
    xi = x.clone(memory_format=layout).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(xi)
    ((y.pow(2) + y.sin()).mean() * LOSS_SCALE).backward()
    return [xi.grad, *(p.grad for p in model.parameters())]


def exactness(s: Settings) -> Section:
    sec = Section("exactness")
    x = torch.randn(1, 4, 16, 16, 16, dtype=torch.float64, device=s.device)
    cases: list[tuple[str, Callable[[bool], nn.Module]]] = [
        ("prev_unet, whole volume", lambda saving: _tiny_unet(saving, F64, s.device, chunks=None)),
        ("prev_unet, slabs (chunks=3)", lambda saving: _tiny_unet(saving, F64, s.device, chunks=3)),
        ("unet_baseline, checkpointing", lambda saving: _tiny_baseline(saving).to(s.device, F64)),
    ]
    for label, make in cases:
        got = _grads(make(True), x)
        want = _grads(make(False), x)
        err = _max_rel(got, want)
        sec.rows.append({"model": label, "max_rel_grad_error": err, "tolerance": GRAD_TOLERANCE})
        if not err < GRAD_TOLERANCE:
            sec.status = "FAIL"
    sec.detail = "float64, memory saving vs plain autograd: " + ", ".join(
        f"{r['model']} {r['max_rel_grad_error']:.1e}" for r in sec.rows
    )
    return sec


def channels_last(s: Settings) -> Section:
    from revseg.device import set_tf32

    set_tf32(False)
    sec = Section("channels_last")
    for dtype, tol in ((torch.float64, GRAD_TOLERANCE), (torch.float32, FP32_TOLERANCE)):
        for chunks in (None, 3):
            model = _tiny_unet(True, dtype, s.device, chunks=chunks)
            x = torch.randn(1, 4, 16, 16, 16, dtype=dtype, device=s.device)
            want = _grads(copy.deepcopy(model), x)
            got = _grads(model, x, torch.channels_last_3d)
            err = _max_rel(got, want)
            sec.rows.append(
                {"dtype": str(dtype), "chunks": chunks, "max_rel_grad_error": err, "tolerance": tol}
            )
            if not err < tol:
                sec.status = "FAIL"
    sec.detail = "prev_unet channels-last vs contiguous: " + ", ".join(
        f"{r['dtype'][6:]} chunks={r['chunks']} {r['max_rel_grad_error']:.1e}" for r in sec.rows
    )
    if not s.cuda:
        sec.detail += " (CPU: the convolutions return contiguous gradients; the GPU is the test)"
    return sec


def _to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to TF32 (10 mantissa bits, round to nearest, ties away), as float32."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view_as(t)


class EmulatedTF32(torch.utils._python_dispatch.TorchDispatchMode):
    """Convolutions as TF32 runs them on the CPU: float32 inputs rounded to TF32, float32 sums."""

    CONVS = ("convolution.default", "convolution_backward.default")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).removeprefix("aten.") in self.CONVS:
            args = tuple(
                _to_tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                for a in args
            )
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _precision(mode: str, device: torch.device) -> Iterator[None]:
    """fp32 (IEEE), tf32 (the GPU's; emulated on the CPU), bf16 or fp16 autocast."""
    from revseg.device import autocast_context, set_tf32

    set_tf32(mode == "tf32")
    try:
        if mode == "tf32" and device.type != "cuda":
            with EmulatedTF32():
                yield
        elif mode in ("bf16", "fp16"):
            with autocast_context(device, mode):
                yield
        else:
            yield
    finally:
        set_tf32(False)


def precision_by_depth(s: Settings) -> Section:
    """Reconstruction and gradient errors against float64, for the engine and for autograd."""
    sec = Section("precision_by_depth")
    channels, side = s.precision_size or ((32, 32) if s.cuda else (16, 12))
    try:
        _errors_by_depth(s, sec, channels, side)
    except Skip as why:  # keep the rows measured so far
        sec.status, sec.detail = "skip", f"{why}; {len(sec.rows)} rows measured"
        return sec
    worst = {m: max(r["engine_param_grad_rel"] for r in sec.rows if r["mode"] == m) for m in MODES}
    sec.detail = (
        f"{channels} channels, {side}^3; worst parameter-gradient error vs float64 by mode: "
        + ", ".join(f"{m} {v:.1e}" for m, v in worst.items())
        + ("" if s.cuda else " (tf32 emulated)")
    )
    return sec


def _errors_by_depth(s: Settings, sec: Section, channels: int, side: int) -> None:
    from revseg.models.prev_unet import reversible_level

    for depth in DEPTHS:
        torch.manual_seed(depth)
        ref = reversible_level(channels, depth, 4, 0.01, memory_saving=False).double()
        ref = ref.to(s.device)
        x64 = torch.randn(1, channels, side, side, side, dtype=torch.float64, device=s.device)
        want = _grads(ref, x64)
        for mode in MODES:
            if s.left() < 60:
                raise Skip(f"out of time at depth {depth}, {mode}")
            row: dict[str, Any] = {"depth": depth, "mode": mode}
            for saving in (True, False):
                seq = copy.deepcopy(ref).float()
                seq.memory_saving = saving
                x = x64.float()
                with _precision(mode, s.device):
                    got = _grads(seq, x)
                    if saving:
                        with torch.no_grad():
                            rec = seq.inverse(seq(x))
                        row["reconstruction_max_abs"] = float((rec - x).abs().max())
                key = "engine" if saving else "autograd"
                row[f"{key}_input_grad_rel"] = rel_err(got[0], want[0])
                row[f"{key}_param_grad_rel"] = _max_rel(got[1:], want[1:])
            finite = all(math.isfinite(v) for v in row.values() if isinstance(v, float))
            # fp32: memory saving may add rounding, not more (deep levels are ill-conditioned:
            # autograd's own error vs float64 grows with depth too)
            worse = mode == "fp32" and any(
                row[f"engine_{g}_grad_rel"] > 4 * row[f"autograd_{g}_grad_rel"] + 1e-6
                for g in ("input", "param")
            )
            if not finite or worse:
                sec.status = "FAIL"
            sec.rows.append(row)


FOV_CONFIGS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("prev_unet", ("model=prev_unet",), "fp32"),
    ("prev_unet", ("model=prev_unet",), "bf16"),
    ("prev_unet", ("model=prev_unet",), "fp16"),
    ("prev_unet, bf16 states", ("model=prev_unet", "model.state_dtype=autocast"), "bf16"),
    ("prev_unet depth 4", ("model=prev_unet", "model.encoder_depth=4"), "fp32"),
    ("prev_unet, slabs off", ("model=prev_unet", "model.chunks=null"), "fp32"),
    ("unet_baseline, checkpointing", ("model=unet_baseline", "model.checkpointing=true"), "fp32"),
    ("unet_baseline, checkpointing", ("model=unet_baseline", "model.checkpointing=true"), "bf16"),
    (
        "unet_baseline 4 blocks, checkpointing",
        ("model=unet_baseline", "model.encoder_blocks=4", "model.checkpointing=true"),
        "fp32",
    ),
    # the rest of the step-time table of docs/benchmarks/speed.md
    ("prev_unet depth 4", ("model=prev_unet", "model.encoder_depth=4"), "bf16"),
    (
        "unet_baseline 4 blocks, checkpointing",
        ("model=unet_baseline", "model.encoder_blocks=4", "model.checkpointing=true"),
        "bf16",
    ),
)


def full_fov(s: Settings) -> Section:
    """One step per configuration in a fresh process (the benchmark's runner)."""
    from revseg.bench.runner import run_spec
    from revseg.bench.specs import NetSpec
    from revseg.memory.trace import CONTEXT

    sec = Section("full_fov")
    configs = FOV_CONFIGS
    # dry run: small models, three of them; no fp16 (CPU fp16 convolutions are about 80x slower)
    tiny = ("model.channels=[8,16,24]", "model.norm_groups=2") if s.dry_run else ()
    if s.dry_run:
        configs = (FOV_CONFIGS[0], FOV_CONFIGS[1], FOV_CONFIGS[6])
    device = "cuda" if s.cuda else "cpu"
    for label, overrides, precision in configs:
        if s.left() < 30:  # not run: reported, not failed
            sec.rows.append({"model": label, "precision": precision, "error": "out of time"})
            sec.status = "skip" if sec.status == "ok" else sec.status
            continue
        spec = NetSpec(
            section="gpu",
            label=label,
            overrides=[
                *overrides,
                *tiny,
                f"trainer.precision={precision}",
                f"trainer.device={device}",
            ],
            size=list(s.fov),
            steps=2,
            threads=None,
        )
        result = run_spec(spec, timeout=min(240.0, s.left() - 20))
        row = {"model": label, "precision": precision}
        if "error" in result:
            row["error"] = result["error"]
            sec.status = "FAIL"
        else:
            plan, peak = result.get("plan") or {}, result["peak_bytes"]
            planned = plan.get("allocated_bytes")
            # what the plan says max_memory_allocated stays under: all but the CUDA context
            bound = plan.get("total_bytes", 0) - plan.get("allowance", {}).get(CONTEXT, 0)
            row.update(
                allocated_bytes=peak,
                reserved_bytes=result.get("reserved_bytes"),
                planned_bytes=planned,
                planned_bound_bytes=bound or None,
                planned_over_measured=planned / peak if planned else None,
                step_time_s=result.get("step_time_s"),
                memory_method=result.get("memory_method"),
            )
            if not planned or peak > PLAN_SLACK * bound:
                row["error"] = "measured above the plan's bound" if planned else "no plan"
                sec.status = "FAIL"
        sec.rows.append(row)
    ok = [r for r in sec.rows if "allocated_bytes" in r]
    sec.detail = f"{'x'.join(map(str, s.fov))}: " + ", ".join(
        f"{r['model']} {r['precision']} {_mib(r['allocated_bytes'])} MiB" for r in ok
    )
    return sec


def resume(s: Settings) -> Section:
    """Two epochs in one go against one epoch and a resume, on the device, bit for bit."""
    from revseg.config import compose_config
    from revseg.data.synthetic import make_synthetic_brats
    from revseg.training.checkpoint import load_checkpoint
    from revseg.training.trainer import train

    sec = Section("resume")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_synthetic_brats(root, num_cases=4, shape=(24, 24, 24), seed=0)
        common = [
            "model.channels=[8,16,24]",
            "model.norm_groups=2",
            "data.num_cases=4",
            "data.volume_shape=[24,24,24]",
            "data.crop_size=[16,16,16]",
            f"data.root={root}",
            "trainer.progress_bar=false",
            "metrics.hd95=false",
            "trainer.plan_memory=false",
            "trainer.deterministic=true",
            f"trainer.device={s.device.type}",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "~logger",
        ]

        def run_to(epochs: int, out: str, *extra: str) -> None:
            cfg = compose_config(
                "train",
                [*common, f"trainer.max_epochs={epochs}", f"paths.output_dir={tmp}/{out}", *extra],
            )
            train(cfg)

        run_to(2, "a")
        run_to(1, "b")
        run_to(2, "b", "trainer.resume=true")
        a = load_checkpoint(Path(tmp) / "a/checkpoints/last.pt")["model"]
        b = load_checkpoint(Path(tmp) / "b/checkpoints/last.pt")["model"]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    sec.rows.append({"tensors": len(a), "differing": differ})
    if differ:
        sec.status = "FAIL"
    sec.detail = f"{len(a) - len(differ)} of {len(a)} weight tensors equal after 1 epoch + resume"
    return sec


def ddp(s: Settings) -> Section:
    """revseg-doctor's DDP check: two gloo processes on the one device, and on a GPU also a
    one-process NCCL group (a one-GPU node), against one process on the combined batch."""
    sec = Section("ddp")
    runs = [("gloo", 2)] + ([("nccl", 1)] if s.cuda else [])
    for backend, processes in runs:
        err = _ddp_gradients(s.device, backend, processes)
        sec.rows.append({"backend": backend, "processes": processes, "max_rel_grad_error": err})
        if not err < GRAD_TOLERANCE:
            sec.status = "FAIL"
    sec.detail = f"DDP on {s.device.type} vs one process (float64): " + ", ".join(
        f"{r['processes']} {r['backend']} {r['max_rel_grad_error']:.1e}" for r in sec.rows
    )
    return sec


@contextlib.contextmanager
def _no_measure() -> Iterator[None]:
    yield None


def compiled(s: Settings) -> Section:
    from revseg.memory import PeakMemoryMeter
    from revseg.memory.measure import SavedTensorsCounter

    sec = Section("compile")
    torch._dynamo.reset()
    side = 32 if s.cuda else 16
    x = torch.randn(1, 4, side, side, side, device=s.device)
    results = {}
    for name in ("eager", s.compile_backend):
        model = _tiny_unet(True, torch.float32, s.device, chunks=None)
        run = model if name == "eager" else torch.compile(model, backend=name)
        _grads(run, x)  # warm-up (compiles)
        model.zero_grad(set_to_none=True)
        meter = PeakMemoryMeter(s.device) if s.cuda else None
        with meter.measure(static=[*model.parameters(), x]) if meter else _no_measure() as m:
            with SavedTensorsCounter(exclude=list(model.parameters())) as saved:
                y = run(x)
                loss = (y.pow(2) + y.sin()).mean() * LOSS_SCALE
            loss.backward()
            del y, loss
        grads = [p.grad for p in model.parameters()]
        results[name] = (grads, saved.bytes, m.peak_bytes if m is not None else None)
    err = _max_rel(results[s.compile_backend][0], results["eager"][0])
    row = {
        "backend": s.compile_backend,
        "max_rel_grad_error": err,
        "saved_bytes_eager": results["eager"][1],
        "saved_bytes_compiled": results[s.compile_backend][1],
        "peak_bytes_eager": results["eager"][2],
        "peak_bytes_compiled": results[s.compile_backend][2],
    }
    sec.rows.append(row)
    if not err < FP32_TOLERANCE:
        sec.status = "FAIL"
    sec.detail = (
        f"{s.compile_backend} vs eager: gradients {err:.1e}, saved for backward "
        f"{row['saved_bytes_compiled']} vs {row['saved_bytes_eager']} bytes"
    )
    return sec


SECTIONS: tuple[Callable[[Settings], Section], ...] = (
    environment,
    exactness,
    channels_last,
    precision_by_depth,
    full_fov,
    resume,
    ddp,
    compiled,
)


# --------------------------------------------------------------------------------------------
# the report


def validate(s: Settings, names: set[str] | None = None) -> list[Section]:
    """Run the sections (or those in ``names``); a failure is recorded, never raised."""
    sections = []
    for fn in SECTIONS:
        start = time.monotonic()
        name = fn.__name__
        if names and name not in names:
            continue
        try:
            sec = fn(s)
        except Skip as why:
            sec = Section(name, "skip", detail=str(why))
        except Exception as err:  # noqa: BLE001 - one failed check must not lose the others
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            sec = Section(name, "FAIL", detail=last.splitlines()[0][:300])
        sec.name = name
        sec.seconds = round(time.monotonic() - start, 1)
        print(f"{sec.status:4} {name}: {sec.detail} ({sec.seconds} s)", flush=True)
        sections.append(sec)
    return sections


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3g}"
    return "" if v is None else str(v)


def markdown(sections: list[Section], meta: dict[str, Any]) -> str:
    lines = [
        f"# GPU validation: {meta['device']}, {meta['date']}",
        "",
        f"`{meta['command']}` ({'dry run on the CPU: small sizes' if meta['dry_run'] else 'GPU'}"
        f"; {meta['seconds']:.0f} s). Made by `revseg.bench.gpu_validate`; the figures are in the "
        "JSON file of the same name.",
        "",
        "| section | status | seconds | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.status} | {s.seconds} | {s.detail} |" for s in sections]
    for sec in sections:
        if not sec.rows or sec.name == "environment":
            continue
        lines += ["", f"## {sec.name}", ""]
        rows = sec.rows
        if sec.name == "full_fov":
            rows = [
                {
                    "model": r["model"],
                    "precision": r["precision"],
                    "allocated MiB": _mib(r.get("allocated_bytes")),
                    "reserved MiB": _mib(r.get("reserved_bytes")),
                    "planned MiB": _mib(r.get("planned_bytes")),
                    "plan's bound MiB": _mib(r.get("planned_bound_bytes")),
                    "planned / allocated": r.get("planned_over_measured"),
                    "step s": r.get("step_time_s"),
                    "error": r.get("error", ""),
                }
                for r in rows
            ]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    env = next((s.rows[0] for s in sections if s.name == "environment" and s.rows), None)
    if env:
        lines += ["", "## environment", "", "```", json.dumps(env, indent=2), "```"]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="revseg-gpu-validate", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="small sizes on the CPU (CI)")
    parser.add_argument("--out", default="docs/benchmarks/gpu", help="report folder")
    parser.add_argument("--fov", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting checks after")
    parser.add_argument("--only", nargs="*", default=None, help="these sections only")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--precision-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("CHANNELS", "SIDE"),
        help="precision_by_depth's level (default 32 channels, 32^3; dry run 16, 12^3)",
    )
    args = parser.parse_args(argv)
    names = {fn.__name__ for fn in SECTIONS}
    if args.only and not set(args.only) <= names:
        parser.error(
            f"--only: unknown section(s) {sorted(set(args.only) - names)}; {sorted(names)}"
        )
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here: run it on a GPU, or with --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    fov = tuple(args.fov) if args.fov else (DRY_FOV if args.dry_run else FULL_FOV)
    start = time.monotonic()
    settings = Settings(
        device,
        args.dry_run,
        fov,
        start + args.budget_s,
        args.compile_backend,
        tuple(args.precision_size) if args.precision_size else None,
    )
    sections = validate(settings, set(args.only) if args.only else None)
    env = next((s.rows[0] for s in sections if s.name == "environment" and s.rows), {})
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": env.get("device", str(device)),
        "dry_run": args.dry_run,
        "command": "revseg-gpu-validate " + " ".join(argv),
        "seconds": time.monotonic() - start,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}_{_slug(meta['device'])}" + ("_dry-run" if args.dry_run else "")
    report = {"meta": meta, "sections": [asdict(s) for s in sections]}
    for path, text in (
        (out / f"{stem}.json", json.dumps(report, indent=1) + "\n"),
        (out / f"{stem}.md", markdown(sections, meta)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    failed = [s.name for s in sections if s.status == "FAIL"]
    print(f"report: {out / stem}.md; {'FAILED: ' + ', '.join(failed) if failed else 'all passed'}")
    return 1 if failed else 0


def run() -> None:
    run_main(main, own_help=True)  # argparse's --help


if __name__ == "__main__":
    run()
