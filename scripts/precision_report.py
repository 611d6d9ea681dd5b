"""Mixed precision and reversible blocks: how exact are reconstruction and gradients, by depth?

    python scripts/precision_report.py [--size 32] [--depths 1,2,4,8] [--out docs/precision.md]

For the partially reversible U-Net (the paper's channels) under autocast (bf16, fp16) with the
states between reversible blocks in float32 (``model.state_dtype=float32``, the default) and in
the autocast dtype (``model.state_dtype=autocast``) it measures, per encoder/decoder depth:
- the reconstruction error of the worst reversible sequence, ``|inverse(forward(x)) - x| / |x|``
  with the forward run under autocast (what the memory-saving backward relies on);
- the gradient error of memory saving against plain autograd at the same precision and state
  dtype (what reversibility adds), and of each against float32 plain autograd (what the precision
  costs anyway).
Writes a markdown table (and prints it).
"""

from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch

from revseg.models.prev_unet import PartiallyReversibleUNet
from revseg.nn.reversible import ReversibleSequence, states_in


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def grads(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(x).float()
    torch.nn.functional.binary_cross_entropy_with_logits(out, y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def conv3d_bf16_weight_grad_error() -> float:
    """Relative error of a bf16-autocast conv3d weight gradient on a 2x2x2 input (CPU)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(180, 180, 3, padding=1, bias=False)
    x = torch.randn(1, 180, 2, 2, 2)
    found = []
    for enabled in (False, True):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = conv(x)
        out.float().pow(2).sum().backward()
        found.append(conv.weight.grad.clone())
    return rel(found[1], found[0])


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(size: int, depth: int, channels: list[int], precisions: list[str]) -> list[tuple]:
    """Rows ``(depth, precision, states, reconstruction, saving vs plain, saving vs fp32,
    plain vs fp32)`` for one depth."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, size, size, size)
    y = (torch.rand(1, 3, size, size, size) > 0.8).float()
    rows = []
    reference = None
    for name in ["fp32", *[p for p in precisions if p != "fp32"]]:
        dtype = DTYPES[name]
        for states in ("float32", "autocast"):
            if dtype is None and states == "autocast":
                continue  # no autocast: the same as float32 states
            torch.manual_seed(0)
            model = PartiallyReversibleUNet(
                channels=channels, encoder_depth=depth, decoder_depth=depth, state_dtype=states
            )
            plain = copy.deepcopy(model)
            plain.memory_saving = False
            if reference is None:
                reference = grads(plain, x, y, None)
            inputs: dict[ReversibleSequence, torch.Tensor] = {}
            hooks = [
                s.register_forward_pre_hook(
                    lambda m, a, store=inputs: store.__setitem__(m, a[0].detach())
                )
                for s in model.reversible_sequences()
            ]
            ctx = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
            with torch.no_grad(), ctx:
                model(x)
                errors = []
                for s, xi in inputs.items():
                    start = s(xi)  # the states as the sequence keeps them
                    errors.append(rel(s.inverse(start.clone()), states_in(xi, states)))
            for h in hooks:
                h.remove()
            g_saving = grads(model, x, y, dtype)
            g_plain = grads(plain, x, y, dtype)
            rows.append(
                (
                    depth,
                    name,
                    states if dtype is not None else "–",
                    max(errors),
                    rel(g_saving, g_plain),
                    rel(g_saving, reference),
                    rel(g_plain, reference),
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--depths", default="1,2,4,8")
    parser.add_argument("--channels", type=int, nargs=5, default=[60, 120, 240, 360, 480])
    parser.add_argument(
        "--precisions",
        default="fp32,bf16,fp16",
        help="fp32 is always measured (the reference); fp16 convolutions are very slow on CPU",
    )
    parser.add_argument("--out", default="docs/precision.md")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    precisions = args.precisions.split(",")
    if not set(precisions) <= set(DTYPES):
        parser.error(f"--precisions: expected a list of {', '.join(DTYPES)}")
    rows = [row for depth in depths for row in measure(args.size, depth, args.channels, precisions)]
    bug = conv3d_bf16_weight_grad_error()
    lines = [
        "# Mixed precision with reversible blocks\n",
        f"`python scripts/precision_report.py --size {args.size} --depths {args.depths} "
        f"--precisions {args.precisions}`: "
        f"prev_unet (channels {args.channels}, encoder and decoder depth as in the first column), "
        f"one {args.size}³ input, CPU autocast, torch {torch.__version__}, {platform.machine()}. "
        "Relative errors (L2 norm ratios); `states`: `model.state_dtype`.\n",
        "| depth | precision | states | reconstruction error, worst sequence "
        "| grads: memory saving vs plain, same precision | grads: memory saving vs fp32 plain "
        "| grads: plain vs fp32 plain |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {d} | {n} | {st} | {r:.2e} | {a:.2e} | {b:.2e} | {c:.2e} |"
            for d, n, st, r, a, b, c in rows
        ],
        "",
        "With float32 states the reconstruction is exact to float32 rounding of the sums, but the",
        "blocks recompute F and G from reconstructed inputs cast to bf16/fp16 again, so a last-bit",
        "difference can move a value to the next low-precision step: the error is not the float32",
        "one and grows with depth. Memory saving's gradient error stays well below what the low",
        "precision costs against float32 anyway (last column). Where fp32's memory-saving",
        "error exceeds float32 rounding (depth 4 and 8 here), it is rounding amplified by the",
        "reconstruction through ill-conditioned tiny levels: in float64 the same model's",
        "memory-saving gradients equal plain autograd's to 6e-16. Low-precision states add the",
        "rounding of every block's sum to 8 (bf16) or 11 (fp16) mantissa bits to the",
        "reconstruction; the memory they save and the demo's Dice with them are in",
        "docs/benchmarks (section g) and the README.",
        "",
        "A torch defect, worked around: on CPU, bf16 autocast gives wrong conv3d weight gradients",
        "when the input is 2x2x2 voxels (the bottom level of a 5-level U-Net at 32³):",
        "Conv3d(180, 180, 3) on a (1, 180, 2, 2, 2) input, weight-gradient error vs fp32 = "
        f"{bug:.2f}",
        "(fp16, other sizes and 1x1x1 kernels are fine). revseg runs convolutions of inputs with a",
        "spatial size of 2 in float32 on the CPU under bf16 (`revseg.nn.blocks.conv_in_float32`).",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
