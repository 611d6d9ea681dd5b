"""Profile one training step (revseg.step.TrainStep, as the trainer runs it) of several models at
one input size, with torch.profiler: the time of each labelled phase (forward and loss, backward,
the reversible chains' backward, the fused half steps, the optimizer), of each kind of kernel
(convolutions, their backward, normalisation, resampling, copies ...) and of the busiest kernels.

    python scripts/profile_step.py --size 96 --out docs/benchmarks/profile
    python scripts/profile_step.py --size 160 192 160 --out docs/benchmarks/profile
    python scripts/profile_step.py --size 64 \\
        --configs "model=prev_unet" "model=unet_baseline model.checkpointing=true"

Each configuration runs in this process after one warm-up step; the machine's load is recorded.
Times are CPU times on this machine unless CUDA is present (then CUDA kernel times too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

DEFAULT_CONFIGS = (
    "model=prev_unet",
    "model=unet_baseline model.checkpointing=true",
)
# kinds of kernels (aten op names), for "where the time goes"; the first match wins
KINDS = (
    ("convolution backward", ("convolution_backward",)),
    (
        "convolution (forward, recomputation, transposed)",
        ("mkldnn_convolution", "slow_conv3d", "_convolution", "slow_conv_transpose3d"),
    ),
    ("1x1x1 convolution as GEMM", ("bmm", "baddbmm", "addmm", "aten::mm", "matmul")),
    ("normalisation", ("group_norm", "var_mean")),
    ("resampling (pooling, upsampling)", ("max_pool3d", "upsample_trilinear3d")),
    ("activation", ("leaky_relu",)),
    ("copies and fills", ("copy_", "fill_", "zero_", "clone")),
    ("optimizer", ("_foreach", "adam")),
)
PHASES = (
    "step: forward and loss",
    "step: backward",
    "reversible chain: backward",
    "fused half step: whole volume",
    "fused half step: slabs",
    "step: optimizer",
)


def kind_of(op: str) -> str:
    for kind, needles in KINDS:
        if any(n in op for n in needles):
            return kind
    return "other elementwise and reductions"


def profile_config(overrides: list[str], size: list[int], device: torch.device) -> dict:
    from revseg.config import build
    from revseg.memory.plan import compose_train_config
    from revseg.step import TrainStep

    crop = ",".join(str(s) for s in size)
    cfg = compose_train_config([*overrides, f"data.crop_size=[{crop}]"])
    torch.manual_seed(0)
    model = build(cfg.model, "model").to(device).train()
    optimizer = build(cfg.optimizer, "optimizer")(params=model.parameters())
    loss_fn = build(cfg.loss, "loss")
    image = torch.randn(1, int(cfg.model.in_channels), *size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        label = (torch.rand_like(model(image)) > 0.5).float()
    step = TrainStep(model, optimizer, lambda out, y, _m: loss_fn(out, y), device=device)
    step([(image, label, None)])  # warm-up: the optimizer state, allocator, kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step([(image, label, None)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    aten = [e for e in events if e.key.startswith("aten::")]
    kinds: dict[str, float] = {}
    for e in aten:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
    kernels = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "overrides": overrides,
        "wall_s": wall,
        "phases_s": phases,
        "kinds_s": kinds,
        "forward_gflop": flops.get_total_flops() / 1e9,
        "kernels": [
            {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
            for e in kernels
        ],
    }


def markdown(results: list[dict], meta: dict) -> str:
    from revseg.bench.specs import size_title

    lines = [
        f"# One training step profiled at {size_title(meta['size'])}",
        "",
        f"`{meta['command']}`, {meta['date']}, {meta['device']}, {meta['threads']} threads, load "
        f"average {meta['load_before']:.2f} before and {meta['load_after']:.2f} after. One Adam "
        "step (batch 1, the config's loss) after a warm-up step, under torch.profiler (which slows "
        "small ops; use the ratios, not the absolute times). Phases are revseg's labels "
        "(record_function); a phase's time includes the phases inside it.",
        "",
        "| phase | " + " | ".join(" ".join(r["overrides"]) for r in results) + " |",
        "|---|" + "---|" * len(results),
        "| wall time of the step | " + " | ".join(f"{r['wall_s']:.2f} s" for r in results) + " |",
        "| forward GFLOP (torch.utils.flop_counter; the architecture's work) | "
        + " | ".join(f"{r['forward_gflop']:.1f}" for r in results)
        + " |",
    ]
    for phase in PHASES:
        values = [r["phases_s"].get(phase) for r in results]
        if any(v is not None for v in values):
            cells = " | ".join("" if v is None else f"{v:.2f} s" for v in values)
            lines.append(f"| {phase} | {cells} |")
    lines += [
        "",
        "## Self CPU time by kind of kernel",
        "",
        "| kind | " + " | ".join(" ".join(r["overrides"]) for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    names = [k for k, _ in KINDS] + ["other elementwise and reductions"]
    for kind in names:
        cells = " | ".join(f"{r['kinds_s'].get(kind, 0.0):.2f} s" for r in results)
        lines.append(f"| {kind} | {cells} |")
    totals = " | ".join(f"{sum(r['kinds_s'].values()):.2f} s" for r in results)
    lines.append(f"| all aten kernels | {totals} |")
    for r in results:
        lines += [
            "",
            f"## Busiest kernels: {' '.join(r['overrides'])}",
            "",
            "| op | self CPU s | calls |",
            "|---|---|---|",
        ]
        lines += [f"| `{k['op']}` | {k['self_cpu_s']:.2f} | {k['calls']} |" for k in r["kernels"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=int, nargs="+", default=[96], help="cube side, or D H W, of the input"
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="folder for profile_<size>.md/.json")
    args = parser.parse_args(argv)
    from revseg.bench.specs import size_title, three_sides

    try:
        size = three_sides(args.size)
    except ValueError as err:
        parser.error(str(err))
    stem = f"profile_{size_title(size).removesuffix('³')}"  # profile_96, profile_160x192x160
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()[0]
    results = [profile_config(c.split(), size, device) for c in args.configs]
    meta = {
        "size": size,
        "command": "python scripts/profile_step.py " + " ".join(argv),
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU",
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    text = markdown(results, meta)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
