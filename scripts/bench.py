"""Benchmark revseg's memory and speed against the alternatives, side by side in one invocation.

    python scripts/bench.py                  # the full benchmark -> docs/benchmarks/
    python scripts/bench.py --quick          # tiny sizes, minutes (CI) -> outputs/bench_quick/
    python scripts/bench.py --sections c --depths 1,2 --impls revseg,plain --quick
    python scripts/bench.py --sections e     # the zoo only, merged into docs/benchmarks/
    python scripts/bench.py --sections f     # the full field of view (the headline)

Every configuration runs in a fresh process (:mod:`revseg.bench.runner`), so no allocator
state, cache or leaked tensor of one configuration affects the next. Each process measures one
training step after a warm-up with :class:`revseg.memory.PeakMemoryMeter` (CUDA:
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
   at ``--fov-sizes`` and planned at ``--fov-predict`` (default 160x192x160), with its goals;
g. mixed precision, :mod:`revseg.bench.precision`: fp32, bf16 and fp16 (``--precisions``) side
   by side for prev_unet (depth 1 and 4, float32 and low-precision states), unet_baseline (plain,
   checkpointing, 4 encoder blocks; float32 and low-precision GroupNorm), hybrid_revnet and
   hyperbolic_blr, measured at ``--precision-sizes`` (default: ``--fov-sizes``) with the
   machine's autocast rules and planned at ``--fov-predict`` with CUDA's; a run of some sizes or
   configs (``--precision-configs``) keeps the results of the others.

A run of some sections keeps the other sections' results already in ``--out/results.json``
(``--fresh`` drops them) and rewrites the report from both.

Results: ``README.md`` (tables, goals), ``results.json`` and PNG plots (if matplotlib is
installed) in ``--out``; ``--report-from results.json`` makes them again from a results file,
running nothing. This script is the command line; the benchmark is :mod:`revseg.bench` (specs,
runner, report with the goals as data, plots).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from revseg.bench.specs import IMPLS, ZOO_SMALL, make_specs, spec_from_dict

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a couple of minutes)")
    parser.add_argument(
        "--sections", default="abcdefg", help="any of a, b, c, d, e, f, g (default: abcdefg)"
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
        help="section a/b sizes only predicted by the planner (too large to run here), "
        "e.g. 128,160x192x160",
    )
    parser.add_argument("--channels", type=int, help="section c channels C")
    parser.add_argument("--fov-sizes", help="section f measured cube sides, e.g. 64,96")
    parser.add_argument(
        "--fov-predict", help="section f sizes only planned, e.g. 160x192x160 (the default)"
    )
    parser.add_argument(
        "--precision-sizes",
        help="section g measured cube sides, e.g. 64,96 (default: --fov-sizes; '' for none)",
    )
    parser.add_argument(
        "--precision-configs",
        help="section g configs by label, ';'-separated (default: all, see revseg.bench.precision)",
    )
    parser.add_argument("--precisions", help="section g precisions, e.g. fp32,bf16 (default: all)")
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


def main(argv: list[str] | None = None) -> int:
    from revseg.bench import report, runner

    args = build_parser().parse_args(argv)
    if args.child:  # one configuration, as the runner's child (python -m revseg.bench.runner)
        runner.child(spec_from_dict(json.loads(args.child)))
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if args.threads is None and not cuda:
        args.threads = 1
    out = args.out or (REPO / ("outputs/bench_quick" if args.quick else "docs/benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    if args.report_from:
        report.regenerate(args.report_from, out)
        return 0
    specs = make_specs(args, cuda)
    command = "python scripts/bench.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    meta = runner.new_meta(command, args.threads or torch.get_num_threads(), cuda)
    results, meta = runner.run_specs(specs, out, meta, args.timeout, fresh=args.fresh)
    report.write_report(results, meta, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
