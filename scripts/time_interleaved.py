"""Step time of configurations side by side: fresh processes, interleaved, several repeats.

    python scripts/time_interleaved.py --size 64 --repeats 3 --steps 2 \\
        --config "prev_unet=model=prev_unet trainer.precision=bf16" \\
        --config "ckpt=model=unet_baseline model.checkpointing=true trainer.precision=bf16" \\
        --out docs/benchmarks/timing/bf16_64.md

Each repeat runs every configuration once, in the order given, each in a fresh process
(:func:`revseg.bench.runner.run_spec`: one warm-up step, then ``--steps`` timed steps, the median
kept), so that a slow phase of a shared machine hits every configuration alike. Reports the
median of the repeats' medians per configuration, every configuration's ratio to the first, the
1-minute load average before and after each process, and writes Markdown (``--out``) and JSON
beside it. Memory figures are in the benchmark proper (``scripts/bench.py``); this is for time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

from revseg.bench.runner import load_average, machine_info, run_spec
from revseg.bench.specs import NetSpec, gib, size_title, three_sides


def parse_config(text: str) -> tuple[str, list[str]]:
    label, sep, overrides = text.partition("=")
    if not sep or not overrides.strip():
        raise SystemExit(f"--config {text!r}: expected LABEL=OVERRIDES")
    return label, overrides.split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="LABEL=OVERRIDES")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[64], help="cube side, or D H W of the input"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, required=True, help="Markdown report (JSON beside it)")
    args = parser.parse_args(argv)
    try:
        size = three_sides(args.size)
    except ValueError as err:
        parser.error(str(err))
    configs = [parse_config(c) for c in args.config]
    started = datetime.datetime.now().isoformat(timespec="seconds")
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for repeat in range(args.repeats):
        for label, overrides in configs:
            spec = NetSpec("t", label, overrides, size, args.steps, args.threads)
            before = load_average()
            result = run_spec(spec, args.timeout)
            after = load_average()
            if "error" in result:
                raise SystemExit(f"{label}: {result['error']}")
            runs[label].append(
                {
                    "step_time_s": result["step_time_s"],
                    "peak_bytes": result.get("peak_bytes"),
                    "load": [before, after],
                }
            )
            print(f"[{repeat + 1}/{args.repeats}] {label}: {result['step_time_s']:.2f} s "
                  f"(load {before:.2f} -> {after:.2f})", flush=True)  # fmt: skip
    medians = {label: statistics.median(r["step_time_s"] for r in rs) for label, rs in runs.items()}
    first = configs[0][0]
    command = "python scripts/time_interleaved.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    loads = [v for rs in runs.values() for r in rs for v in r["load"] if v is not None]
    info = machine_info()
    lines = [
        f"# Step time, interleaved: {size_title(size)}, {args.repeats} repeats",
        "",
        f"`{command}` on {started}; {info['device']}, torch {info['versions']['torch']}, "
        f"{args.threads or 'default'} torch thread(s) per process, one warm-up and "
        f"{args.steps} timed steps per process; 1-minute load average "
        f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f}. Peak: the measured peak "
        "tensor memory of the step (PeakMemoryMeter; the same in every repeat).",
        "",
        f"| config | overrides | step s per repeat | median | / {first} | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for label, overrides in configs:
        times = ", ".join(f"{r['step_time_s']:.2f}" for r in runs[label])
        peaks = [r["peak_bytes"] for r in runs[label] if r.get("peak_bytes")]
        peak = gib(max(peaks, default=None))
        lines.append(
            f"| {label} | `{' '.join(overrides)}` | {times} | {medians[label]:.2f} | "
            f"{medians[label] / medians[first]:.3f} | {peak} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    record = {"command": command, "started": started, "size": size, "machine": info,
              "runs": runs, "medians": medians}  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
