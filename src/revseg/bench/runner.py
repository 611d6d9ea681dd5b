"""The benchmark's runner: every spec in a fresh process, the results saved as they come.

Every configuration runs in its own process (``python -m revseg.bench.runner <spec json>``), so no
allocator state, cache or leaked tensor of one configuration affects the next. Each process
measures one training step after a warm-up with :class:`revseg.memory.PeakMemoryMeter` (CUDA:
``max_memory_allocated``; CPU: the tensor tracker) and the median time of ``steps`` further steps
(CUDA when present, else CPU), and prints its result as one ``BENCH_RESULT <json>`` line.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from revseg.bench.specs import IMPLS, PEERS, NetSpec, SequenceSpec, spec_from_dict

__all__ = [
    "ACTIVATIONS",
    "build_sequence",
    "machine_info",
    "merge_previous",
    "run_net",
    "run_sequence",
    "run_spec",
    "run_specs",
]

# the planner's categories that memory saving and depth act on (not parameters, gradients,
# optimizer state, batch)
ACTIVATIONS = ("reversible states", "non-reversible activations", "workspace")
_MARK = "BENCH_RESULT "


# ============================================================================================
# child: one configuration in its own process


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _timed(step: Callable[[], None], steps: int, device) -> list[float]:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def run_net(spec: NetSpec) -> dict[str, Any]:
    """A training step of a model from the config; beside the measured peak, the planner's."""
    import torch

    from revseg.config import build, trainer_config
    from revseg.device import set_tf32
    from revseg.memory import PeakMemoryMeter
    from revseg.memory.plan import CATEGORIES, compose_train_config, step_model_from_config
    from revseg.step import TrainStep

    size = list(spec.size)
    if spec.video:  # (T, H, W) of a video data config
        shape = [f"data.frames={size[0]}", f"data.size=[{size[1]},{size[2]}]"]
    else:
        shape = [f"data.crop_size={size}", "data.patch_size=null"]
    cfg = compose_train_config([*spec.overrides, *shape])
    device = _device()
    trainer = trainer_config(cfg)
    set_tf32(trainer.tf32)  # as train() sets it
    torch.manual_seed(0)
    model = build(cfg.model, "model")
    planned, plan_failure, activation_peak = None, None, None
    try:  # plan_from_config's plan, and from the same trace the activations' own peak
        step_model = step_model_from_config(cfg, model, size)
        planned = step_model.checked_plan(size)
        live = step_model.live(math.prod(size))[[CATEGORIES.index(k) for k in ACTIVATIONS]]
        activation_peak = int(round(live.sum(axis=0).max()))
    except Exception as err:  # noqa: BLE001 - a planner failure is a note, not a lost run
        if spec.plan_only:
            raise
        plan_failure = f"{type(err).__name__}: {err}".splitlines()[0]
    if spec.plan_only:
        return {
            "planned_peak_bytes": planned.peak_bytes,
            "plan": planned.as_dict(),
            "params": planned.params,
            "voxels": planned.voxels,
        }
    model = model.to(device).train()
    optimizer = build(cfg.optimizer, "optimizer")(params=model.parameters())
    loss_fn = build(cfg.loss, "loss")
    batch = int(cfg.data.get("batch_size", 1) or 1)
    image = torch.randn(batch, int(cfg.model.in_channels), *size, device=device)
    with torch.no_grad():
        label = (torch.rand_like(model(image)) > 0.5).float()

    precision = trainer.precision
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    train_step = TrainStep(  # the trainer's step: autocast for bf16/fp16, a scaler for fp16
        model,
        optimizer,
        lambda logits, target, _mask: loss_fn(logits, target),
        device=device,
        precision=precision,
        scaler=scaler,
    )

    def step() -> None:
        train_step([(image, label, None)])

    step()  # warm-up; makes the optimizer state
    meter = PeakMemoryMeter(device)
    optimizer.zero_grad(set_to_none=True)
    static = [*model.parameters(), image, label]
    static += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    with meter.measure(static=static) as m:
        step()
    times = _timed(step, spec.steps, device)
    return {
        "peak_bytes": m.peak_bytes,
        "planned_peak_bytes": planned.peak_bytes if planned else None,
        "plan": planned.as_dict() if planned else None,
        "planned_activation_peak_bytes": activation_peak,
        "plan_failure": plan_failure,
        "reserved_bytes": m.reserved_bytes,
        "baseline_bytes": m.baseline_bytes,
        "memory_method": meter.method,
        "rss_peak_bytes": m.rss_peak_bytes,
        "params": sum(p.numel() for p in model.parameters()),
        "voxels": batch * math.prod(size),
        "step_times": times,
        "step_time_s": statistics.median(times) if times else None,
        "precision": precision,
    }


def _checkpointed(blocks):
    """Plain blocks, each under ``torch.utils.checkpoint`` (non-reentrant)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(blocks)

        def forward(self, x):
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=False)
            return x

    return Checkpointed()


def build_sequence(impl: str, depth: int, channels: int, norm_groups: int | None = None):
    """One reversible sequence of PRevUNet blocks implemented by ``impl`` (see :data:`IMPLS`).

    ``norm_groups`` None: the authors' 30 groups, or one per channel of a half narrower than 30
    channels (the quick run's 8 channels: halves of 4).

    Raises:
        ValueError: an unknown implementation.
    """
    import torch

    from revseg.models.prev_unet import reversible_level

    torch.manual_seed(0)
    if norm_groups is None:
        norm_groups = min(30, channels // 2)
    seq = reversible_level(channels, depth, norm_groups, 0.01, memory_saving=(impl == "revseg"))
    blocks = list(seq.blocks)
    if impl in ("plain", "revseg"):
        return seq
    if impl == "checkpoint":
        return _checkpointed(blocks)
    if impl == "memcnn":
        import memcnn

        return torch.nn.Sequential(
            *[
                memcnn.InvertibleModuleWrapper(
                    memcnn.AdditiveCoupling(b.f, b.g), keep_input=False, keep_input_inverse=False
                )
                for b in blocks
            ]
        )
    if impl == "revlib":
        import revlib

        return revlib.ReversibleSequential(*[m for b in blocks for m in (b.f, b.g)], split_dim=1)
    raise ValueError(f"unknown implementation {impl!r}; choose one of {', '.join(IMPLS)}")


def run_sequence(spec: SequenceSpec) -> dict[str, Any]:
    """Forward and backward of one sequence: peak memory in states, step time."""
    import torch

    from revseg.memory import PeakMemoryMeter

    device = _device()
    model = build_sequence(spec.impl, spec.depth, spec.channels).to(device).train()
    x = torch.randn(spec.batch, spec.channels, *spec.size, device=device)
    x.requires_grad_(True)
    params = list(model.parameters())

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        model(x).square().mean().backward()

    step()  # warm-up
    meter = PeakMemoryMeter(device)
    x.grad = None
    for p in params:
        p.grad = None
    with meter.measure(static=[*params, x]) as m:
        step()
    times = _timed(step, spec.steps, device)
    state = x.numel() * x.element_size()
    return {
        "peak_bytes": m.peak_bytes,
        "state_bytes": state,
        "states": m.peak_bytes / state,
        "memory_method": meter.method,
        "step_times": times,
        "step_time_s": statistics.median(times) if times else None,
    }


def child(spec: NetSpec | SequenceSpec) -> None:
    """Run ``spec`` here and print its result as one ``BENCH_RESULT <json>`` line."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(spec.threads or torch.get_num_threads())
    result = run_sequence(spec) if isinstance(spec, SequenceSpec) else run_net(spec)
    print(_MARK + json.dumps(result))


# ============================================================================================
# parent: a fresh process per spec


def run_spec(spec: NetSpec | SequenceSpec, timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh process; its result, ``{"error": ...}`` or, for a peer
    that is not installed, ``{"skipped": ...}``."""
    if isinstance(spec, SequenceSpec) and spec.impl in PEERS:
        if not importlib.util.find_spec(spec.impl):
            return {"skipped": f"{spec.impl} not installed (pip install -e '.[bench]')"}
    cmd = [sys.executable, "-m", "revseg.bench.runner", json.dumps(spec.as_dict())]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """CPU, cores, device, versions and platform, as the report's header shows them."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "versions": {n: _version(n) for n in ("torch", "revseg", "memcnn", "revlib", "matplotlib")},
        "platform": platform.platform(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# sections whose runs replace earlier results only for the configurations and sizes they run
# (section g measures its slowest sizes for a few configurations in a run of their own)
_BY_CONFIG = ("g",)


def _replaces(section: str, plan_only: Any, size: Sequence[int], label: str) -> tuple:
    key = (section, bool(plan_only))
    return (*key, tuple(size), label) if section in _BY_CONFIG else key


def merge_previous(
    out: Path, specs: Sequence[NetSpec | SequenceSpec], run: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The results in ``out/results.json`` that this run does not replace, and their meta.

    A run replaces the measured (or the planner-only) results of the sections it runs (of
    section g: of the configurations and sizes it runs); the rest are kept, with the meta of the
    run that made them, and ``run`` is recorded in its ``runs``.
    ``([], None)`` when nothing is kept.
    """
    path = out / "results.json"
    if not path.exists():
        return [], None
    try:
        saved = json.loads(path.read_text())
        old, meta = saved["results"], saved["meta"]
    except (ValueError, KeyError, TypeError):
        return [], None
    replaced = {
        _replaces(s.section, getattr(s, "plan_only", False), s.size, s.label) for s in specs
    }
    kept = [
        r
        for r in old
        if _replaces(
            r["spec"]["section"], r["spec"].get("plan_only"), r["spec"]["size"], r["spec"]["label"]
        )
        not in replaced
    ]
    if not kept:
        return [], None
    # an earlier run's record goes only where this run replaced all it measured: every kind
    # (measured, planned) of results its sections had, and no section measured by configuration
    old_kinds = {(r["spec"]["section"], bool(r["spec"].get("plan_only"))) for r in old}
    run_kinds = {key[:2] for key in replaced}
    sections = {
        sec
        for sec, _ in run_kinds
        if sec not in _BY_CONFIG and {k for k in old_kinds if k[0] == sec} <= run_kinds
    }
    runs = [r for r in meta.get("runs", []) if not set(r["sections"]) <= sections]
    meta = {**meta, "runs": [*runs, run]}
    meta.pop("plots", None)
    return kept, meta


def new_meta(command: str, threads: int, cuda: bool) -> dict[str, Any]:
    """The meta of a run starting now (``wall_s`` and ``load_end`` are added as it goes)."""
    return {
        "command": command,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_start": load_average(),
        "machine": machine_info(),
        "memory_method": "cuda_max_memory_allocated" if cuda else "cpu_tensor_tracker",
        "threads": threads,
    }


def _summary(res: dict[str, Any]) -> str:
    from revseg.bench.report import fmt, mib, status
    from revseg.bench.specs import ok

    if not ok(res):
        return status(res)
    return (
        f"peak {mib(res.get('peak_bytes'))} MiB, planned {mib(res.get('planned_peak_bytes'))}"
        f" MiB, step {fmt(res.get('step_time_s'))} s"
    )


def run_specs(
    specs: Sequence[NetSpec | SequenceSpec],
    out: Path,
    meta: dict[str, Any],
    timeout: float,
    fresh: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every spec, print a line each and save ``out/results.json`` after each one (an
    interrupted run keeps what it measured); the results of the other sections already in
    ``out`` are kept unless ``fresh``. Returns all the results and the meta to report them with.
    """
    start = time.perf_counter()
    # this run, as recorded beside the kept results of earlier runs
    run = {
        "sections": "".join(sorted({s.section for s in specs})),
        **{k: meta[k] for k in ("command", "date", "load_start", "memory_method", "threads")},
        "device": meta["machine"]["device"],
    }
    kept, kept_meta = ([], None) if fresh else merge_previous(out, specs, run)
    if kept_meta is not None:
        print(f"keeping {len(kept)} results of other sections from {out / 'results.json'}")
        meta = kept_meta
    results: list[dict[str, Any]] = []
    for i, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        res = run_spec(spec, timeout)
        extra = f" depth {spec.depth}" if isinstance(spec, SequenceSpec) else ""
        size = "x".join(map(str, spec.size))
        print(
            f"[{i}/{len(specs)}] {spec.section}. {spec.label}{extra} {size}: {_summary(res)} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        results.append({"spec": spec.as_dict(), "result": res, "load": load_average()})
        run.update(wall_s=time.perf_counter() - start, load_end=load_average())
        if kept_meta is None:
            meta.update(wall_s=run["wall_s"], load_end=run["load_end"])
        payload = {"meta": meta, "results": [*kept, *results]}
        (out / "results.json").write_text(json.dumps(payload, indent=1))
    return [*kept, *results], meta


if __name__ == "__main__":  # the child: python -m revseg.bench.runner '<spec json>'
    child(spec_from_dict(json.loads(sys.argv[1])))
