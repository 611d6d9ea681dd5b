"""Benchmark revseg's memory and speed against the alternatives, side by side in one invocation.

    python scripts/bench.py                  # the full benchmark -> docs/benchmarks/
    python scripts/bench.py --quick          # tiny sizes, a couple of minutes (CI) -> outputs/bench_quick/
    python scripts/bench.py --sections c --depths 1,2 --impls revseg,plain --quick
    python scripts/bench.py --sections e     # the zoo only, merged into docs/benchmarks/
    python scripts/bench.py --sections f     # the full field of view (the headline)

Every configuration runs in a fresh process (this script with ``--child <json>``), so no
allocator state, cache or leaked tensor of one configuration affects the next. Each process
measures one training step after a warm-up with :class:`revseg.memory.PeakMemoryMeter` (CUDA:
``max_memory_allocated``; CPU: the tensor tracker) and the median time of ``--steps`` further
steps (CUDA when present, else CPU). Sections:

a. prev_unet with memory saving on and off, and unet_baseline, at the same inputs; beside the
   measured peak, the planner's prediction (:mod:`revseg.memory.plan`);
b. prev_unet encoder depth 1..4 at one input, memory saving on and off (plain autograd shows the
   growth a non-reversible net of the same depth would have), unet_baseline beside;
c. one reversible sequence of PRevUNet blocks (F = G = GN-LReLU-Conv3d on C/2 channels), depth
   1..8, implemented with revseg, memcnn (InvertibleModuleWrapper + AdditiveCoupling), revlib
   (ReversibleSequential), torch.utils.checkpoint (use_reentrant=False, one checkpoint per block)
   and plain autograd; peak memory in states (one state = B*C*D*H*W*4 bytes) and time relative to
   plain. The peers come from the ``bench`` extra (``pip install -e ".[bench]"``); a missing one
   is skipped with a note;
d. hyperbolic_blr, when ``configs/model/hyperbolic_blr.yaml`` exists;
e. the zoo: every BraTS-like model config (the ``model`` config group, ``in_channels: 4``) at one
   input, memory saving on and off (unet_baseline: checkpointing on and off), every
   ``downsample`` kind, depth 1 and 4 where the config has ``encoder_depth`` /
   ``decoder_depth``; peak, planned peak, step time and the ratios side by side. On the CPU
   every design runs :data:`ZOO_SMALL` channels where it takes them (``--zoo-default-channels``:
   the configs' own);
f. the headline, :mod:`revseg.bench.fov`: prev_unet (depth 1 and 4, chunks off and auto),
   unet_baseline plain, with checkpointing and with 4 encoder blocks, and hybrid_revnet, measured
   at ``--fov-sizes`` and planned at ``--fov-predict`` (default 160x192x160), with its goals.

A run of some sections keeps the other sections' results already in ``--out/results.json``
(``--fresh`` drops them) and rewrites the report from both.

Results: ``README.md`` (tables, goals), ``results.json`` and PNG plots (if matplotlib is
installed) in ``--out``.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

from revseg.bench import fov

REPO = Path(__file__).resolve().parents[1]
PEERS = ("memcnn", "revlib")
IMPLS = ("plain", "checkpoint", "memcnn", "revlib", "revseg")
# --quick: tiny variants of the models (the same code paths, seconds per configuration)
QUICK_UNET = ["model.channels=[8,16,24]", "model.norm_groups=2"]
QUICK_HYP = ["model.layers=[1,2,1]"]
# section e on the CPU: the zoo's default channels include revnet_unet with batch pooling, whose
# every level holds the full volume at up to 480 channels (hours per step here), so every design
# that accepts it runs this one smaller setting instead (a design whose channels follow another
# rule keeps its defaults, with a note)
ZOO_SMALL = ["model.channels=[16,32,64,128]", "model.norm_groups=4"]
ZOO_DEPTHS = (1, 4)
# the planner's categories that memory saving and depth act on (not parameters, gradients,
# optimizer state, batch)
ACTIVATIONS = ("reversible states", "non-reversible activations", "workspace")


# ============================================================================================
# child: one configuration in its own process


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, steps: int, device) -> list[float]:
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def run_net(spec: dict[str, Any]) -> dict[str, Any]:
    """A training step of a model from the config: ``spec["overrides"]``, ``spec["size"]``."""
    import torch

    from revseg.config import build
    from revseg.memory import PeakMemoryMeter
    from revseg.memory.plan import CATEGORIES, compose_train_config, step_model_from_config

    size = list(spec["size"])
    if spec.get("video"):  # (T, H, W) of a video data config
        shape = [f"data.frames={size[0]}", f"data.size=[{size[1]},{size[2]}]"]
    else:
        shape = [f"data.crop_size={size}", "data.patch_size=null"]
    cfg = compose_train_config([*spec["overrides"], *shape])
    device = _device()
    torch.manual_seed(0)
    model = build(cfg.model, "model")
    planned, plan_failure, activation_peak = None, None, None
    if spec.get("plan", True):
        try:  # plan_from_config's plan, and from the same trace the activations' own peak
            step_model = step_model_from_config(cfg, model, size)
            planned = step_model.checked_plan(size)
            live = step_model.live(math.prod(size))[[CATEGORIES.index(k) for k in ACTIVATIONS]]
            activation_peak = int(round(live.sum(axis=0).max()))
        except Exception as err:  # noqa: BLE001 - a planner failure is a note, not a lost run
            if spec.get("plan_only"):
                raise
            plan_failure = f"{type(err).__name__}: {err}".splitlines()[0]
    if spec.get("plan_only"):
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

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()

    step()  # warm-up; makes the optimizer state
    meter = PeakMemoryMeter(device)
    optimizer.zero_grad(set_to_none=True)
    static = [*model.parameters(), image, label]
    static += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    with meter.measure(static=static) as m:
        step()
    times = _timed(step, spec["steps"], device)
    return {
        "peak_bytes": m.peak_bytes,
        "planned_peak_bytes": planned.peak_bytes if planned else None,
        "plan": planned.as_dict() if planned else None,
        "planned_activation_peak_bytes": activation_peak,
        "plan_failure": plan_failure,
        "baseline_bytes": m.baseline_bytes,
        "memory_method": meter.method,
        "rss_peak_bytes": m.rss_peak_bytes,
        "params": sum(p.numel() for p in model.parameters()),
        "voxels": batch * math.prod(size),
        "step_times": times,
        "step_time_s": statistics.median(times) if times else None,
    }


class _Checkpointed:
    """Plain blocks, each under ``torch.utils.checkpoint`` (non-reentrant)."""

    @staticmethod
    def build(blocks):
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


def build_sequence(impl: str, depth: int, channels: int, norm_groups: int = 30):
    """One reversible sequence of PRevUNet blocks implemented by ``impl`` (see :data:`IMPLS`)."""
    import torch

    from revseg.models.prev_unet import reversible_level

    torch.manual_seed(0)
    seq = reversible_level(channels, depth, norm_groups, 0.01, memory_saving=(impl == "revseg"))
    blocks = list(seq.blocks)
    if impl in ("plain", "revseg"):
        return seq
    if impl == "checkpoint":
        return _Checkpointed.build(blocks)
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


def run_sequence(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward and backward of one sequence: ``spec["impl"]``, ``depth``, ``channels``, ``size``."""
    import torch

    from revseg.memory import PeakMemoryMeter

    device = _device()
    model = build_sequence(spec["impl"], spec["depth"], spec["channels"]).to(device).train()
    x = torch.randn(spec["batch"], spec["channels"], *spec["size"], device=device)
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
    times = _timed(step, spec["steps"], device)
    state = x.numel() * x.element_size()
    return {
        "peak_bytes": m.peak_bytes,
        "state_bytes": state,
        "states": m.peak_bytes / state,
        "memory_method": meter.method,
        "step_times": times,
        "step_time_s": statistics.median(times) if times else None,
    }


def child(spec: dict[str, Any]) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    result = run_net(spec) if spec["kind"] == "net" else run_sequence(spec)
    print("BENCH_RESULT " + json.dumps(result))


# ============================================================================================
# parent: the configurations, the runs, the report


def _sizes(args, cuda: bool) -> dict[str, Any]:
    if args.quick:  # tiny models too: the point is to exercise every path in seconds
        return {
            "a": [16],
            "b": 16,
            "c": 16,
            "c_channels": 8,
            "depths": [1, 2],
            "d": [(8, 16, 16)],
            "d_ranks": ["4"],
            "unet": QUICK_UNET,
            "hyperbolic": QUICK_HYP,
            "e": 16,
            "e_setting": QUICK_UNET,
            "f": [16],
            "f_predict": [],
        }
    if cuda:
        return {
            "e": 96,
            "e_setting": [],
            "a": [96, 128],
            "b": 128,
            "c": 64,
            "c_channels": 60,
            "depths": list(range(1, 9)),
            "d": [(32, 64, 64), (72, 120, 208), (72, 240, 424)],
            "d_ranks": ["4", "8", "null"],
            "f": [96, 128],
            "f_predict": [(160, 192, 160)],
        }
    return {
        "e": 32,
        "e_setting": ZOO_SMALL,
        "a": [64, 96],
        "b": 64,
        "c": 48,
        "c_channels": 60,
        "depths": list(range(1, 9)),
        "d": [(32, 64, 64), (64, 128, 128)],
        "d_ranks": ["4", "8"],
        "f": [64, 96],
        "f_predict": [(160, 192, 160)],
    }


def make_specs(args, cuda: bool) -> list[dict[str, Any]]:
    sizes = _sizes(args, cuda)
    if args.size:
        sizes["c"] = args.size
    if args.sizes:
        sizes["a"] = [int(v) for v in args.sizes.split(",")]
    if args.depth_size:
        sizes["b"] = args.depth_size
    if args.video_sizes:
        sizes["d"] = [tuple(int(v) for v in t.split("x")) for t in args.video_sizes.split(",")]
    if args.ranks:
        sizes["d_ranks"] = args.ranks.split(",")
    if args.depths:
        sizes["depths"] = [int(d) for d in args.depths.split(",")]
    if args.zoo_size:
        sizes["e"] = args.zoo_size
    if args.zoo_default_channels:
        sizes["e_setting"] = []
    if args.fov_sizes is not None:
        sizes["f"] = [int(v) for v in args.fov_sizes.split(",") if v]
    if args.fov_predict is not None:
        sizes["f_predict"] = [
            tuple(int(v) for v in t.split("x")) for t in args.fov_predict.split(",") if t
        ]
    steps = args.steps
    unet, hyp = sizes.get("unet", []), sizes.get("hyperbolic", [])
    specs: list[dict[str, Any]] = []

    def net(section, label, overrides, size, n_steps=steps, **extra):
        specs.append(
            {
                "kind": "net",
                "section": section,
                "label": label,
                "overrides": overrides,
                "size": [size] * 3,
                "steps": n_steps,
                "threads": args.threads,
                **extra,
            }
        )

    if "a" in args.sections and not args.predict_only:
        for s in sizes["a"]:
            net("a", "prev_unet", ["model=prev_unet", *unet], s)
            net(
                "a",
                "prev_unet (memory saving off)",
                ["model=prev_unet", "model.memory_saving=false", *unet],
                s,
            )
            net("a", "unet_baseline", ["model=unet_baseline", *unet], s)
    if "b" in args.sections and not args.predict_only:
        s = sizes["b"]
        for d in (1, 2, 3, 4) if not args.quick else (1, 2):
            for ms in (True, False) if not args.quick else (True,):
                label = f"prev_unet depth {d}" + ("" if ms else " (memory saving off)")
                overrides = ["model=prev_unet", f"model.encoder_depth={d}", *unet]
                overrides += [] if ms else ["model.memory_saving=false"]
                net("b", label, overrides, s, n_steps=min(steps, 1), depth=d, memory_saving=ms)
        if not args.quick:
            net("b", "unet_baseline", ["model=unet_baseline", *unet], s, n_steps=min(steps, 1))
    for text in filter(None, args.predict.split(",")):
        shape = [int(v) for v in text.split("x")] if "x" in text else [int(text)] * 3
        if "a" in args.sections:
            for label, overrides in (
                ("prev_unet", ["model=prev_unet"]),
                ("unet_baseline", ["model=unet_baseline"]),
            ):
                net("a", label, [*overrides, *unet], 0, plan_only=True)
                specs[-1]["size"] = shape
        if "b" in args.sections:
            for d in (1, 2, 3, 4):
                overrides = ["model=prev_unet", f"model.encoder_depth={d}", *unet]
                net(
                    "b",
                    f"prev_unet depth {d}",
                    overrides,
                    0,
                    plan_only=True,
                    depth=d,
                    memory_saving=True,
                )
                specs[-1]["size"] = shape
    if "c" in args.sections:
        impls = args.impls.split(",") if args.impls else list(IMPLS)
        for d in sizes["depths"]:
            for impl in impls:
                specs.append(
                    {
                        "kind": "sequence",
                        "section": "c",
                        "label": impl,
                        "impl": impl,
                        "depth": d,
                        "channels": args.channels or sizes["c_channels"],
                        "batch": 1,
                        "size": [sizes["c"]] * 3,
                        "steps": steps,
                        "threads": args.threads,
                    }
                )
    if "d" in args.sections and (REPO / "configs" / "model" / "hyperbolic_blr.yaml").exists():
        base = ["model=hyperbolic_blr", "data=synthetic_video", *hyp]
        for rank in sizes["d_ranks"]:
            for thw in sizes["d"]:
                label = f"hyperbolic_blr rank {rank}"
                net("d", label, [*base, f"model.rank={rank}"], 0, video=True, rank=rank, layers=27)
                specs[-1]["size"] = list(thw)
        layers = "[2,4,2]" if hyp else "[6,8,8,8,8,8,8]"
        deep = [*base, "model.rank=4", f"model.layers={layers}"]
        net("d", "hyperbolic_blr rank 4, doubled depth", deep, 0, video=True, rank="4", layers=54)
        specs[-1]["size"] = list(sizes["d"][-1])
    if "e" in args.sections and not args.predict_only:
        models = args.models.split(",") if args.models else None
        for design in zoo_designs(sizes["e_setting"], models):
            for variant in design.pop("variants"):
                net("e", variant.pop("label"), variant.pop("overrides"), sizes["e"], **variant)
                specs[-1].update(design)
    if "f" in args.sections:
        specs += fov.specs(sizes["f"], sizes["f_predict"], steps, args.threads, bool(args.quick))
    return specs


def _zoo_setting(name: str, setting: list[str]) -> tuple[list[str], str | None]:
    """The overrides of ``setting`` that model ``name`` has keys for and builds with; a note when
    it rejects them (it keeps its defaults)."""
    from revseg.config import build
    from revseg.memory.plan import compose_train_config

    model = compose_train_config([f"model={name}"]).model
    own = [o for o in setting if o.split("=", 1)[0].removeprefix("model.") in model]
    if not own:
        return [], None
    try:
        build(compose_train_config([f"model={name}", *own]).model, "model")
    except Exception as err:  # noqa: BLE001 - any refusal: the design keeps its own channels
        channels = list(model.channels) if "channels" in model else "?"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return [], f"{name} keeps its default channels {channels} ({' '.join(own)}: {reason})"
    return own, None


def zoo_designs(setting: list[str], models: list[str] | None = None) -> list[dict[str, Any]]:
    """Section e: every BraTS-like model config (``in_channels: 4``) and its variants.

    The config group is the registry (:func:`revseg.config.group_options`); what varies comes from
    each config's own keys: ``memory_saving`` (on, then off: the reference) or ``checkpointing``
    (off: the reference, then on), every kind of a ``downsample`` key (the model module's
    ``DOWNSAMPLE_KINDS``), and depths :data:`ZOO_DEPTHS` where ``encoder_depth`` /
    ``decoder_depth`` exist (both set). Video models (``in_channels`` 3) are section d's.
    """
    import importlib

    from revseg.config import group_options
    from revseg.memory.plan import compose_train_config

    options = group_options("model")
    unknown = sorted(set(models or ()) - set(options))
    if unknown:
        raise SystemExit(
            f"--models: unknown {', '.join(unknown)}; choose from {', '.join(options)}"
        )
    designs = []
    for name in options:
        model = compose_train_config([f"model={name}"]).model
        if models and name not in models or model.get("in_channels") != 4:
            continue
        own, note = _zoo_setting(name, setting)
        kinds: list[str | None] = [None]
        if "downsample" in model:
            module = importlib.import_module(str(model._target_).rsplit(".", 1)[0])
            kinds = list(getattr(module, "DOWNSAMPLE_KINDS", [model.downsample]))
        depth_keys = [k for k in ("encoder_depth", "decoder_depth") if k in model]
        depths: list[int | None] = list(ZOO_DEPTHS) if depth_keys else [None]
        switch = next((k for k in ("memory_saving", "checkpointing") if k in model), None)
        savings: list[bool | None] = [True, False] if switch else [None]
        variants = []
        for kind in kinds:
            for depth in depths:
                for saving in savings:
                    overrides = [f"model={name}", *own]
                    label = name
                    if kind is not None:
                        overrides.append(f"model.downsample={kind}")
                        label += f", {kind}"
                    if depth is not None:
                        overrides += [f"model.{k}={depth}" for k in depth_keys]
                        label += f", depth {depth}"
                    if switch:
                        overrides.append(f"model.{switch}={str(saving).lower()}")
                    if switch == "memory_saving" and not saving:
                        label += " (memory saving off)"
                    if switch == "checkpointing" and saving:
                        label += " (checkpointing)"
                    variants.append(
                        {
                            "label": label,
                            "overrides": overrides,
                            "setting": kind or "",
                            "depth": depth,
                            "saving": saving,
                        }
                    )
        designs.append(
            {
                "design": name,
                "switch": switch,
                "zoo_setting": own,
                "zoo_note": note,
                "variants": variants,
            }
        )
    return designs


def run_spec(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh process; its result, or ``{"error": ...}``."""
    if (
        spec["kind"] == "sequence"
        and spec["impl"] in PEERS
        and not importlib.util.find_spec(spec["impl"])
    ):
        return {"skipped": f"{spec['impl']} not installed (pip install -e '.[bench]')"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
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


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ------------------------------------------------------------------------------------ report


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f}"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ok(r: dict[str, Any]) -> bool:
    return "error" not in r and "skipped" not in r


def _plan_error(res: dict[str, Any]) -> str:
    """The planner's error against the measured peak, as a table cell."""
    if not _ok(res) or not res.get("planned_peak_bytes"):
        return "–"
    return f"{100 * (res['planned_peak_bytes'] / res['peak_bytes'] - 1):+.2f}%"


def _goal(rows: list[list[str]], name: str, target: str, value: float | None, ok: bool | None):
    verdict = "–" if ok is None else ("met" if ok else "**missed**")
    rows.append([name, target, _fmt(value, 3), verdict])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _status(r: dict[str, Any]) -> str:
    return r.get("skipped") or ("error: " + r["error"][:120] if "error" in r else "")


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the goal values."""
    m = meta["machine"]
    v = m["versions"]
    lines = [
        "# revseg benchmarks: memory and speed",
        "",
        f"Made by `{meta['command']}` on {meta['date']} in {meta['wall_s']:.0f} s.",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, "
        f"{m.get('ram_gib', '?')} GiB RAM; device: **{m['device']}**; {m['platform']}; "
        f"{meta['threads']} torch thread(s) per configuration",
        f"- versions: Python {m['python']}, torch {v['torch']}, revseg {v['revseg']}, "
        f"memcnn {v['memcnn']}, revlib {v['revlib']}",
        f"- 1-minute load average: {_fmt(meta['load_start'])} at the start, "
        f"{_fmt(meta['load_end'])} at the end (other jobs share the machine; times are noisy, "
        "memory figures are deterministic)",
        f"- memory: `PeakMemoryMeter` ({meta['memory_method']}) of one training step after a "
        "warm-up step: every tensor live at the peak (parameters, gradients, optimizer state, "
        "input); time: median of the following steps in the same process; one fresh process per "
        "configuration",
        "",
    ]
    if meta.get("note"):
        lines.insert(-1, f"- note: {meta['note']}")
    for run in meta.get("runs", []):
        lines.insert(
            -1,
            f"- section {', '.join(run['sections'])} from a later run: `{run['command']}` on "
            f"{run['date']} in {run.get('wall_s', 0):.0f} s, 1-minute load average "
            f"{_fmt(run['load_start'])} at the start, {_fmt(run.get('load_end'))} at the end; "
            f"device {run['device']}, {run['threads']} torch thread(s) per configuration"
            + (f"; note: {run['note']}" if run.get("note") else ""),
        )
    head = len(lines)
    goals: list[list[str]] = []
    values: dict[str, Any] = {}
    by: dict[str, list] = {}
    predicted = [
        r
        for r in results
        if r["spec"].get("plan_only") and r["spec"]["section"] != "f" and _ok(r["result"])
    ]
    for r in results:
        if not r["spec"].get("plan_only"):
            by.setdefault(r["spec"]["section"], []).append(r)

    if "a" in by:
        lines += [
            "## a. Partially reversible U-Net vs the baseline",
            "",
            "Training step (Adam, Dice loss, batch 1) of the full models at the same input. "
            "`planned` is `scripts/memory_plan.py`'s prediction for the same config.",
            "",
        ]
        rows = []
        sizes = sorted({r["spec"]["size"][0] for r in by["a"]})
        for r in by["a"]:
            res = r["result"]
            rows.append(
                [
                    "x".join(map(str, r["spec"]["size"])),
                    r["spec"]["label"],
                    f"{res['params']:,}" if _ok(res) else _status(res),
                    _mib(res.get("peak_bytes")),
                    _mib(res.get("planned_peak_bytes")),
                    _plan_error(res),
                    _fmt(res["peak_bytes"] / res["voxels"], 0) if _ok(res) else "–",
                    _fmt(res.get("step_time_s")),
                ]
            )
        lines += _table(
            [
                "input",
                "model",
                "params",
                "peak MiB",
                "planned MiB",
                "plan error",
                "bytes/voxel",
                "median step s",
            ],
            rows,
        )
        lines.append("")
        for s in sizes:
            get = {r["spec"]["label"]: r["result"] for r in by["a"] if r["spec"]["size"][0] == s}
            rev, off, base = (
                get.get("prev_unet"),
                get.get("prev_unet (memory saving off)"),
                get.get("unet_baseline"),
            )
            if rev and base and _ok(rev) and _ok(base):
                ratio = rev["peak_bytes"] / base["peak_bytes"]
                values[f"a_peak_ratio_{s}"] = ratio
                _goal(
                    goals,
                    f"a. peak reversible / baseline at {s}³",
                    "<= 0.45 (paper 0.62)",
                    ratio,
                    ratio <= 0.45,
                )
            if rev and off and _ok(rev) and _ok(off):
                ratio = rev["step_time_s"] / off["step_time_s"]
                values[f"a_time_ratio_{s}"] = ratio
                _goal(
                    goals,
                    f"a. step time memory saving on / off at {s}³",
                    "<= 1.35 (paper 1.5)",
                    ratio,
                    ratio <= 1.35,
                )
                ratio = rev["peak_bytes"] / off["peak_bytes"]
                values[f"a_peak_on_off_{s}"] = ratio
                _goal(goals, f"a. peak memory saving on / off at {s}³", "(info)", ratio, None)
            if rev and base and _ok(rev) and _ok(base):
                ratio = rev["step_time_s"] / base["step_time_s"]
                _goal(
                    goals,
                    f"a. step time reversible / baseline at {s}³",
                    "(info; paper 1.5)",
                    ratio,
                    None,
                )
        errors = [
            abs(r["result"]["planned_peak_bytes"] / r["result"]["peak_bytes"] - 1)
            for sec in ("a", "b", "d")
            for r in by.get(sec, [])
            if _ok(r["result"]) and r["result"].get("planned_peak_bytes")
        ]
        if errors:
            values["plan_max_abs_error"] = max(errors)
            _goal(
                goals,
                "planner |error| vs measured (a, b, d)",
                "<= 0.15",
                max(errors),
                max(errors) <= 0.15,
            )

    if "b" in by:
        s = by["b"][0]["spec"]["size"][0]
        lines += [
            f"## b. Encoder depth at {s}³",
            "",
            "`model.encoder_depth` = reversible blocks per encoder sequence (decoder depth 1). "
            "Memory saving off is plain autograd on the same net: the growth a non-reversible net "
            "of that depth has.",
            "",
        ]
        rows, first = [], {}
        for r in by["b"]:
            res, spec = r["result"], r["spec"]
            key = spec.get("memory_saving")
            if _ok(res) and spec.get("depth") == 1:
                first[key] = res["peak_bytes"]
            rel = res["peak_bytes"] / first[key] if _ok(res) and key in first else None
            rows.append(
                [
                    spec["label"],
                    f"{res['params']:,}" if _ok(res) else _status(res),
                    _mib(res.get("peak_bytes")),
                    _fmt(rel, 3),
                    _mib(res.get("planned_peak_bytes")),
                    _plan_error(res),
                    _fmt(res.get("step_time_s")),
                ]
            )
            if spec.get("depth") == 4 and rel is not None:
                values[f"b_depth4_over_1_{'on' if key else 'off'}"] = rel
                if key:
                    _goal(
                        goals,
                        "b. peak depth 4 / depth 1 (memory saving)",
                        "<= 1.03 (paper 1.029)",
                        rel,
                        rel <= 1.03,
                    )
                else:
                    _goal(goals, "b. peak depth 4 / depth 1, plain autograd", "(info)", rel, None)
        lines += _table(
            ["model", "params", "peak MiB", "vs depth 1", "planned MiB", "plan error", "step s"],
            rows,
        )
        lines.append("")

    if "c" in by:
        spec0 = by["c"][0]["spec"]
        s, c = spec0["size"][0], spec0["channels"]
        state = next((r["result"]["state_bytes"] for r in by["c"] if _ok(r["result"])), None)
        lines += [
            f"## c. One reversible sequence, {s}³, C = {c}",
            "",
            "Blocks of PRevUNet's top level: additive coupling, F = G = GroupNorm-LeakyReLU-"
            f"Conv3d(C/2, C/2, 3). Forward + backward of `seq(x).square().mean()`, x requiring "
            f"grad. Peak memory in **states** (one state = B*C*D*H*W*4 bytes = "
            f"{_mib(state)} MiB; the input itself is one), time relative to plain autograd at "
            "the same depth.",
            "",
        ]
        impls = list(dict.fromkeys(r["spec"]["impl"] for r in by["c"]))
        depths = sorted({r["spec"]["depth"] for r in by["c"]})
        get = {(r["spec"]["impl"], r["spec"]["depth"]): r["result"] for r in by["c"]}
        mem_rows, time_rows = [], []
        for d in depths:
            plain = get.get(("plain", d))
            mem_rows.append(
                [d]
                + [
                    _fmt(get[i, d].get("states")) if _ok(get[i, d]) else _status(get[i, d]) or "–"
                    for i in impls
                ]
            )
            row = [d]
            for i in impls:
                r = get[i, d]
                if _ok(r) and plain and _ok(plain):
                    row.append(
                        f"{r['step_time_s'] / plain['step_time_s']:.2f} ({r['step_time_s']:.2f} s)"
                    )
                else:
                    row.append(_status(r) or "–")
            time_rows.append(row)
        lines += ["Peak memory (states):", ""] + _table(["depth", *impls], mem_rows)
        lines += ["", "Step time relative to plain (seconds):", ""] + _table(
            ["depth", *impls], time_rows
        )
        lines.append("")
        if "memcnn" in impls and meta["memory_method"] == "cpu_tensor_tracker":
            lines += [
                "memcnn frees each block's input with `storage().resize_(0)`, outside the "
                "dispatcher: the CPU tracker does not see those frees, so memcnn's CPU figures "
                "are upper bounds (its growth of one state per block here is most likely that); "
                "CUDA's `max_memory_allocated` sees them.",
                "",
            ]
        skipped = {r["result"]["skipped"] for r in by["c"] if "skipped" in r["result"]}
        lines += [f"Skipped: {s}." for s in sorted(skipped)]
        rs = [get["revseg", d] for d in depths if ("revseg", d) in get and _ok(get["revseg", d])]
        if rs:
            worst = max(r["states"] for r in rs)
            values["c_revseg_max_states"] = worst
            below = all(
                get["revseg", d]["states"] < get[i, d]["states"]
                for d in depths
                for i in impls
                if i != "revseg" and (i, d) in get and _ok(get[i, d]) and _ok(get["revseg", d])
            )
            values["c_revseg_below_every_peer"] = below
            _goal(
                goals,
                "c. revseg peak, every depth (states)"
                + ("; below every peer at every depth" if below else "; NOT below every peer"),
                "<= 7, below every peer",
                worst,
                worst <= 7 and below,
            )
            for peer, target in (("checkpoint", 1.05), ("memcnn", 0.8), ("revlib", 0.6)):
                pairs = [
                    (get["revseg", d], get[peer, d])
                    for d in depths
                    if (peer, d) in get
                    and _ok(get[peer, d])
                    and _ok(get.get(("revseg", d), {"error": 1}))
                ]
                if not pairs:
                    continue
                # summed over depths: the total time of the depth sweep, less noisy than one depth
                ratio = sum(a["step_time_s"] for a, _ in pairs) / sum(
                    b["step_time_s"] for _, b in pairs
                )
                values[f"c_time_vs_{peer}"] = ratio
                _goal(
                    goals,
                    f"c. revseg time / {peer} time (summed over depths)",
                    f"<= {target}",
                    ratio,
                    ratio <= target,
                )
                peer_min = min(b["states"] for _, b in pairs)
                values[f"c_states_min_{peer}"] = peer_min
            lines.append("")

    if "d" in by:
        lines += [
            "## d. hyperbolic_blr",
            "",
            "Fully reversible hyperbolic network (Peters et al.), video input (B, 3, T, H, W), "
            "Dice loss, Adam. Rank `null` = full n x n kernels.",
            "",
        ]
        rows = []
        for r in by["d"]:
            res = r["result"]
            rows.append(
                [
                    "x".join(map(str, r["spec"]["size"])),
                    r["spec"]["label"],
                    f"{res['params']:,}" if _ok(res) else _status(res),
                    _mib(res.get("peak_bytes")),
                    _mib(res.get("planned_peak_bytes")),
                    _plan_error(res),
                    _fmt(res["peak_bytes"] / res["voxels"], 0) if _ok(res) else "–",
                    _fmt(res.get("step_time_s")),
                ]
            )
        header = ["T x H x W", "model", "params", "peak MiB", "planned MiB", "plan error"]
        lines += _table([*header, "bytes/voxel", "step s"], rows) + [""]
        deep = [r for r in by["d"] if r["spec"].get("layers") == 54 and _ok(r["result"])]
        ref = [
            r
            for r in by["d"]
            if deep
            and r["spec"].get("layers") == 27
            and r["spec"].get("rank") == "4"
            and r["spec"]["size"] == deep[0]["spec"]["size"]
            and _ok(r["result"])
        ]
        if deep and ref:
            ratio = deep[0]["result"]["peak_bytes"] / ref[0]["result"]["peak_bytes"]
            values["d_doubled_depth_ratio"] = ratio
            _goal(
                goals, "d. hyperbolic_blr peak, 54 / 27 layers", "flat (params only)", ratio, None
            )

    if "e" in by:
        lines += zoo_report(by["e"], values)

    if any(r["spec"]["section"] == "f" for r in results):
        fov_lines, fov_goals = fov.report(results)
        lines[head:head] = fov_lines  # the headline, right after the goals
        for name, target, value, met in fov_goals:
            _goal(goals, name, target, value, met)
            values[name] = value

    if predicted:
        lines += [
            "## Predicted by the planner at sizes too large for this machine",
            "",
            "`scripts/memory_plan.py` for the same configs (tensor bytes, what "
            "`max_memory_allocated` counts; cuDNN workspaces not included). Not measured here: "
            "the planner's error against measurement is in the tables above.",
            "",
        ]
        rows = [
            [
                "x".join(map(str, r["spec"]["size"])),
                r["spec"]["label"],
                f"{r['result']['params']:,}",
                _mib(r["result"]["planned_peak_bytes"]),
                _fmt(r["result"]["planned_peak_bytes"] / r["result"]["voxels"], 0),
            ]
            for r in predicted
        ]
        lines += _table(["input", "model", "params", "planned MiB", "bytes/voxel"], rows) + [""]
        get = {
            (r["spec"]["section"], r["spec"]["label"], tuple(r["spec"]["size"])): r["result"][
                "planned_peak_bytes"
            ]
            for r in predicted
        }
        for shape in dict.fromkeys(tuple(r["spec"]["size"]) for r in predicted):
            name = "x".join(map(str, shape))
            rev, base = get.get(("a", "prev_unet", shape)), get.get(("a", "unet_baseline", shape))
            if rev and base:
                ratio = rev / base
                values[f"a_planned_peak_ratio_{name}"] = ratio
                _goal(
                    goals,
                    f"a. peak reversible / baseline at {name} (planner)",
                    "<= 0.45 (paper 0.62)",
                    ratio,
                    ratio <= 0.45,
                )
            d1, d4 = (
                get.get(("b", "prev_unet depth 1", shape)),
                get.get(("b", "prev_unet depth 4", shape)),
            )
            if d1 and d4:
                ratio = d4 / d1
                values[f"b_planned_depth4_over_1_{name}"] = ratio
                _goal(
                    goals,
                    f"b. peak depth 4 / depth 1 at {name} (planner)",
                    "<= 1.03 (paper 1.029)",
                    ratio,
                    ratio <= 1.03,
                )

    lines = (
        lines[:head]
        + ["## Goals", ""]
        + _table(["goal", "target", "measured", ""], goals)
        + [""]
        + lines[head:]
    )
    plots = meta.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines), values


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    x, y = (r.get(key) if r and _ok(r) else None for r in (a, b))
    return x / y if x and y else None


def _zoo_key(spec: dict[str, Any]) -> tuple:
    return spec["design"], spec["setting"], spec["depth"], spec["saving"]


def zoo_report(runs: list[dict[str, Any]], values: dict[str, Any]) -> list[str]:
    """Section e's Markdown: a line per design (the ratios side by side), then every
    configuration; the ratios go into ``values``."""
    size = "x".join(map(str, runs[0]["spec"]["size"]))
    get = {_zoo_key(r["spec"]): r["result"] for r in runs}
    depths = sorted({r["spec"]["depth"] for r in runs if r["spec"]["depth"] is not None})
    lo, hi = (depths[0], depths[-1]) if depths else (None, None)
    setting = next((r["spec"]["zoo_setting"] for r in runs if r["spec"]["zoo_setting"]), [])
    lines = [
        f"## e. The reversible zoo at {size}",
        "",
        "Every BraTS-like model config in `configs/model/` (`in_channels: 4`; the video model is "
        "section d), one training step (Adam, Dice loss, batch 1) at the same input. "
        + (
            f"Channels: `{' '.join(setting)}` for every design that takes them (the default "
            "channels include revnet_unet with batch pooling, whose every level holds the full "
            "volume at up to 480 channels: far too slow on a CPU)"
            if setting
            else "Every design at its config's default channels"
        )
        + "; compare the parameter counts. `off` is the same model with `memory_saving=false` "
        "(plain autograd on the same modules and parameters); for unet_baseline, saving is "
        "`checkpointing=true` (torch.utils.checkpoint per block) and `off` is the plain "
        f"baseline. Depth = `encoder_depth` = `decoder_depth` (blocks per sequence), {lo} and "
        f"{hi}. `activations` = the peak over the step of the planner's activation categories alone "
        "(reversible states, other activations, workspace; not parameters, gradients, optimizer "
        "state, batch): the part memory saving and depth act on, while parameters, gradients "
        "and Adam's moments grow with depth whatever the design.",
        "",
    ]
    groups = list(dict.fromkeys((r["spec"]["design"], r["spec"]["setting"]) for r in runs))
    rows = []
    for design, kind in groups:
        spec = next(
            r["spec"] for r in runs if (r["spec"]["design"], r["spec"]["setting"]) == (design, kind)
        )
        on_value = True if spec["switch"] else None
        base = lo if spec["depth"] is not None else None
        on, off = get.get((design, kind, base, on_value)), get.get((design, kind, base, False))
        deep_on = get.get((design, kind, hi, on_value)) if base is not None else None
        deep_off = get.get((design, kind, hi, False)) if base is not None else None
        ratios = {
            "peak_on_off": _ratio(on, off, "peak_bytes"),
            "activations_on_off": _ratio(on, off, "planned_activation_peak_bytes"),
            "time_on_off": _ratio(on, off, "step_time_s"),
            f"peak_depth{hi}_over_{lo}_on": _ratio(deep_on, on, "peak_bytes"),
            f"activations_depth{hi}_over_{lo}_on": _ratio(
                deep_on, on, "planned_activation_peak_bytes"
            ),
            f"activations_depth{hi}_over_{lo}_off": _ratio(
                deep_off, off, "planned_activation_peak_bytes"
            ),
        }
        name = design + (f"_{kind}" if kind else "")
        values.update({f"e_{name}_{k}": v for k, v in ratios.items() if v is not None})
        on = on or {"error": "not run"}
        cells = [_fmt(v, 3) for v in ratios.values()]
        rows.append(
            [
                design,
                kind or "–",
                {"memory_saving": "reversible", "checkpointing": "checkpointing"}.get(
                    spec["switch"], "–"
                ),
                f"{on['params']:,}" if _ok(on) else _status(on),
                _mib(on.get("peak_bytes")),
                _mib(on.get("planned_peak_bytes")),
                _mib(on.get("planned_activation_peak_bytes")),
                *cells[:2],
                _fmt(on.get("step_time_s")),
                *cells[2:],
            ]
        )
    header = ["design", "downsample", "saving by", "params", "peak MiB", "planned MiB"]
    header += ["activations MiB", "peak / off", "activations / off", "step s", "time / off"]
    header += [f"peak depth {hi} / {lo}", f"activations depth {hi} / {lo}", "same, off"]
    lines += [
        f"Saving on, depth {lo}; ratios to the same model with saving off (`/ off`) and of depth "
        f"{hi} to depth {lo} (saving on, then off):",
        "",
    ]
    lines += _table(header, rows) + [""]

    rows = []
    for r in runs:
        spec, res = r["spec"], r["result"]
        on_value = True if spec["switch"] else None
        off = get.get((spec["design"], spec["setting"], spec["depth"], False))
        first = get.get((spec["design"], spec["setting"], lo, spec["saving"]))
        saving = {True: "on", False: "off", None: "–"}[spec["saving"]]
        if spec["switch"] == "checkpointing" and spec["saving"]:
            saving = "checkpointing"
        vs_off = spec["saving"] == on_value and spec["switch"]
        rows.append(
            [
                spec["design"],
                spec["setting"] or "–",
                spec["depth"] or "–",
                saving,
                f"{res['params']:,}" if _ok(res) else _status(res),
                _mib(res.get("peak_bytes")),
                _mib(res.get("planned_peak_bytes")),
                _plan_error(res),
                _mib(res.get("planned_activation_peak_bytes")),
                _fmt(_ratio(res, off, "peak_bytes"), 3) if vs_off else "–",
                _fmt(_ratio(res, first, "peak_bytes"), 3) if spec["depth"] != lo else "–",
                _fmt(res.get("step_time_s")),
                _fmt(_ratio(res, off, "step_time_s"), 3) if vs_off else "–",
            ]
        )
    header = ["design", "downsample", "depth", "saving", "params", "peak MiB", "planned MiB"]
    header += ["plan error", "activations MiB", "peak / off", f"peak / depth {lo}", "step s"]
    header += ["time / off"]
    lines += ["Every configuration:", ""] + _table(header, rows) + [""]
    notes = list(dict.fromkeys(r["spec"]["zoo_note"] for r in runs if r["spec"].get("zoo_note")))
    notes += [
        f"planner failed for {r['spec']['label']}: {r['result']['plan_failure']}"
        for r in runs
        if r["result"].get("plan_failure")
    ]
    loads = [r["load"] for r in runs if r.get("load") is not None]
    if loads:
        notes.append(
            f"1-minute load average after each configuration: {min(loads):.2f} to "
            f"{max(loads):.2f} (times are noisy; memory figures are not)"
        )
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines


def plots(results: list[dict[str, Any]], out: Path) -> list[str]:
    """PNG plots (memory vs depth, memory vs field of view); none without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    results = [r for r in results if not r["spec"].get("plan_only")]
    seq = [r for r in results if r["spec"]["section"] == "c" and _ok(r["result"])]
    if seq:
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in dict.fromkeys(r["spec"]["impl"] for r in seq):
            pts = sorted(
                (r["spec"]["depth"], r["result"]["states"])
                for r in seq
                if r["spec"]["impl"] == impl
            )
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(
            xlabel="blocks in the sequence",
            ylabel="peak memory (states)",
            title="c. one reversible sequence",
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory_vs_depth_sequence.png", dpi=110)
        plt.close(fig)
        made.append("memory_vs_depth_sequence.png")
    depth = [r for r in results if r["spec"]["section"] == "b" and _ok(r["result"])]
    if depth:
        fig, ax = plt.subplots(figsize=(6, 4))
        for ms, label in ((True, "prev_unet"), (False, "prev_unet, memory saving off")):
            pts = sorted(
                (r["spec"]["depth"], r["result"]["peak_bytes"] / 2**20)
                for r in depth
                if r["spec"].get("memory_saving") is ms
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        for r in depth:
            if r["spec"]["label"] == "unet_baseline":
                ax.axhline(
                    r["result"]["peak_bytes"] / 2**20, color="gray", ls="--", label="unet_baseline"
                )
        ax.set(
            xlabel="encoder depth (blocks per sequence)",
            ylabel="peak memory (MiB)",
            title=f"b. encoder depth at {depth[0]['spec']['size'][0]}³",
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory_vs_depth_unet.png", dpi=110)
        plt.close(fig)
        made.append("memory_vs_depth_unet.png")
    fov = [r for r in results if r["spec"]["section"] in ("a", "d") and _ok(r["result"])]
    if len({r["spec"]["size"][0] for r in fov}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(r["spec"]["label"] for r in fov):
            pts = sorted(
                (r["result"]["voxels"] / 1e6, r["result"]["peak_bytes"] / 2**20)
                for r in fov
                if r["spec"]["label"] == label
            )
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(
            xlabel="input voxels (millions)",
            ylabel="peak memory (MiB)",
            title="a. memory vs field of view",
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory_vs_fov.png", dpi=110)
        plt.close(fig)
        made.append("memory_vs_fov.png")
    zoo = [r for r in results if r["spec"]["section"] == "e" and _ok(r["result"])]
    if zoo:
        groups = list(dict.fromkeys((r["spec"]["design"], r["spec"]["setting"]) for r in zoo))
        depths = sorted({r["spec"]["depth"] for r in zoo if r["spec"]["depth"] is not None})
        lo = depths[0] if depths else None
        # a design without depth keys (unet_baseline) is drawn as depth 1
        get = {
            (*_zoo_key(r["spec"])[:2], r["spec"]["depth"] or lo, r["spec"]["saving"]): r["result"][
                "peak_bytes"
            ]
            / 2**20
            for r in zoo
        }
        bars = list(dict.fromkeys(k[2:] for k in get))
        fig, ax = plt.subplots(figsize=(7, 1 + 0.25 * len(groups) * len(bars)))
        height = 0.8 / len(bars)
        for j, (depth, saving) in enumerate(bars):
            name = "saving " + {True: "on", False: "off", None: "–"}[saving]
            ys = [i + j * height for i in range(len(groups))]
            xs = [get.get((d, k, depth, saving), 0) for d, k in groups]
            ax.barh(ys, xs, height, label=name + (f", depth {depth}" if depth else ""))
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(groups))])
        ax.set_yticklabels([d + (f"\n{k}" if k else "") for d, k in groups], fontsize=8)
        ax.invert_yaxis()
        ax.set(
            xlabel="peak memory (MiB)",
            title=f"e. the zoo at {zoo[0]['spec']['size'][0]}³ (unet_baseline: checkpointing)",
        )
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "memory_zoo.png", dpi=110)
        plt.close(fig)
        made.append("memory_zoo.png")
    return made


def write_report(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """``README.md``, ``results.json`` (with the goal values) and the plots in ``out``."""
    meta["plots"] = plots(results, out)
    text, values = report(results, meta)
    (out / "README.md").write_text(text + "\n")
    payload = {"meta": meta, "goals": values, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out / 'README.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a couple of minutes)")
    parser.add_argument(
        "--sections", default="abcdef", help="any of a, b, c, d, e, f (default: abcdef)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--depths", help="section c depths, e.g. 1,2,4")
    parser.add_argument("--impls", help=f"section c implementations (default: {','.join(IMPLS)})")
    parser.add_argument("--size", type=int, help="section c cube side")
    parser.add_argument("--sizes", help="section a cube sides, e.g. 64,96")
    parser.add_argument("--depth-size", type=int, help="section b cube side")
    parser.add_argument("--video-sizes", help="section d T x H x W sizes, e.g. 32x64x64,72x240x424")
    parser.add_argument("--ranks", help="section d block ranks, e.g. 4,8,null")
    parser.add_argument(
        "--predict",
        default="",
        help="section a/b sizes only predicted by the planner (too large to run here), e.g. 128,160x192x160",
    )
    parser.add_argument("--channels", type=int, help="section c channels C")
    parser.add_argument("--fov-sizes", help="section f measured cube sides, e.g. 64,96")
    parser.add_argument(
        "--fov-predict", help="section f sizes only planned, e.g. 160x192x160 (the default)"
    )
    parser.add_argument("--models", help="section e model configs (default: every BraTS-like one)")
    parser.add_argument("--zoo-size", type=int, help="section e cube side")
    parser.add_argument(
        "--zoo-default-channels",
        action="store_true",
        help="section e with each config's own channels (default on CUDA; on CPU: "
        + " ".join(ZOO_SMALL)
        + ")",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: docs/benchmarks, or outputs/bench_quick with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per configuration (default: 1 on CPU, steadier on a shared machine)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument(
        "--predict-only", action="store_true", help="only the --predict sizes of sections a, b"
    )
    parser.add_argument(
        "--report-from", type=Path, help="rewrite the report from a results.json (no runs)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="drop the other sections' results in --out (default: keep them, replace only the "
        "sections run)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def merge_previous(
    out: Path, specs: list[dict[str, Any]], run: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The results in ``out/results.json`` that this run does not replace, and their meta.

    A run replaces the measured (or the planner-only) results of the sections it runs; the rest
    are kept, with the meta of the run that made them, and ``run`` is recorded in its ``runs``.
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
    replaced = {(s["section"], bool(s.get("plan_only"))) for s in specs}
    kept = [
        r for r in old if (r["spec"]["section"], bool(r["spec"].get("plan_only"))) not in replaced
    ]
    if not kept:
        return [], None
    sections = {s[0] for s in replaced}
    runs = [r for r in meta.get("runs", []) if not set(r["sections"]) <= sections]
    meta = {**meta, "runs": [*runs, run]}
    meta.pop("plots", None)
    return kept, meta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if args.threads is None and not cuda:
        args.threads = 1
    out = args.out or (REPO / ("outputs/bench_quick" if args.quick else "docs/benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        write_report(saved["results"], saved["meta"], out)
        return 0
    specs = make_specs(args, cuda)
    load_start, start = _load(), time.perf_counter()
    command = "python scripts/bench.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    meta = {
        "command": command,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_start": load_start,
        "machine": machine_info(),
        "memory_method": "cuda_max_memory_allocated" if cuda else "cpu_tensor_tracker",
        "threads": args.threads or torch.get_num_threads(),
    }
    # this run, as recorded beside the kept results of earlier runs
    run = {
        "sections": "".join(sorted({s["section"] for s in specs})),
        **{k: meta[k] for k in ("command", "date", "load_start", "memory_method", "threads")},
        "device": meta["machine"]["device"],
    }
    kept, kept_meta = ([], None) if args.fresh else merge_previous(out, specs, run)
    if kept_meta is not None:
        print(f"keeping {len(kept)} results of other sections from {out / 'results.json'}")
        meta = kept_meta
    results: list[dict[str, Any]] = []
    for i, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        res = run_spec(spec, args.timeout)
        extra = f" depth {spec['depth']}" if spec["kind"] == "sequence" else ""
        size = "x".join(map(str, spec["size"]))
        summary = (
            f"peak {_mib(res.get('peak_bytes'))} MiB, planned {_mib(res.get('planned_peak_bytes'))}"
            f" MiB, step {_fmt(res.get('step_time_s'))} s"
            if _ok(res)
            else _status(res)
        )
        print(
            f"[{i}/{len(specs)}] {spec['section']}. {spec['label']}{extra} {size}: {summary} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        results.append({"spec": spec, "result": res, "load": _load()})
        run.update(wall_s=time.perf_counter() - start, load_end=_load())
        if kept_meta is None:
            meta.update(wall_s=run["wall_s"], load_end=run["load_end"])
        # saved after every configuration: an interrupted run keeps what it measured
        payload = {"meta": meta, "results": [*kept, *results]}
        (out / "results.json").write_text(json.dumps(payload, indent=1))
    write_report([*kept, *results], meta, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
