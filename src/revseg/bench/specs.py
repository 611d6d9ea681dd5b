"""The benchmark's configurations: one :class:`NetSpec` or :class:`SequenceSpec` per process.

A spec is what one fresh process measures (:mod:`revseg.bench.runner`); its :meth:`~NetSpec.as_dict`
is what ``results.json`` records beside the result, and what :mod:`revseg.bench.report` reads.
:func:`make_specs` makes the specs of sections a-f from the command line's options:

a. prev_unet with memory saving on and off, and unet_baseline, at the same inputs;
b. prev_unet encoder depth 1..4 at one input, memory saving on and off, unet_baseline beside;
c. one reversible sequence of PRevUNet blocks, depth 1..8, in every implementation of
   :data:`IMPLS` (revseg, the peers memcnn and revlib, checkpointing, plain autograd);
d. hyperbolic_blr on video, per block rank and at doubled depth;
e. the zoo (:func:`zoo_designs`): every BraTS-like model config and its variants;
f. the full field of view, :mod:`revseg.bench.fov`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "IMPLS",
    "PEERS",
    "QUICK_HYP",
    "QUICK_UNET",
    "ZOO_DEPTHS",
    "ZOO_SMALL",
    "NetSpec",
    "SequenceSpec",
    "Sizes",
    "gib",
    "make_specs",
    "ok",
    "result_value",
    "size_name",
    "spec_from_dict",
    "zoo_designs",
    "zoo_key",
]

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


@dataclass
class NetSpec:
    """A training step (Adam, the config's loss) of a model from the ``train`` config.

    Attributes:
        section: ``"a"`` to ``"g"``.
        label: the row's name in the report.
        overrides: ``train.py`` overrides that make the model.
        size: ``(D, H, W)``, or ``(T, H, W)`` of a video data config (``video``).
        steps: timed steps after the warm-up.
        threads: torch threads of the process (``None``: torch's default).
        plan_only: only the planner's prediction (a size too large to run).
        video: ``size`` is ``(T, H, W)`` of a video data config.
        depth, memory_saving: section b's encoder depth and switch.
        rank, layers: section d's block rank and number of layers.
        setting, saving, design, switch, zoo_setting, zoo_note: section e's downsample kind,
            saving on/off, model config, the key that switches saving, the channels it runs and
            why not the common ones (see :func:`zoo_designs`).
    """

    section: str
    label: str
    overrides: list[str]
    size: list[int]
    steps: int
    threads: int | None
    plan_only: bool = False
    video: bool = False
    depth: int | None = None
    memory_saving: bool | None = None
    rank: str | None = None
    layers: int | None = None
    setting: str | None = None
    saving: bool | None = None
    design: str | None = None
    switch: str | None = None
    zoo_setting: list[str] = field(default_factory=list)
    zoo_note: str | None = None
    kind: str = field(default="net", init=False)

    def as_dict(self) -> dict[str, Any]:
        """The record in ``results.json``: the common keys, then those this section uses."""
        out = {k: getattr(self, k) for k in _NET_COMMON}
        if self.plan_only:
            out["plan_only"] = True
        if self.section == "e":
            out.update({k: getattr(self, k) for k in _ZOO_KEYS})
            return out
        for k in ("video", "depth", "memory_saving", "rank", "layers"):
            if getattr(self, k) not in (None, False):
                out[k] = getattr(self, k)
        if self.section == "b" and self.depth is not None:  # memory saving off is recorded too
            out["memory_saving"] = self.memory_saving
        return out


_NET_COMMON = ("kind", "section", "label", "overrides", "size", "steps", "threads")
_ZOO_KEYS = ("setting", "depth", "saving", "design", "switch", "zoo_setting", "zoo_note")


@dataclass
class SequenceSpec:
    """Forward and backward of one reversible sequence (section c) in implementation ``impl``."""

    label: str
    impl: str
    depth: int
    channels: int
    batch: int
    size: list[int]
    steps: int
    threads: int | None
    section: str = "c"
    kind: str = field(default="sequence", init=False)

    def as_dict(self) -> dict[str, Any]:
        """The record in ``results.json``."""
        keys = ("kind", "section", "label", "impl", "depth", "channels", "batch", "size")
        return {**{k: getattr(self, k) for k in keys}, "steps": self.steps, "threads": self.threads}


def spec_from_dict(data: dict[str, Any]) -> NetSpec | SequenceSpec:
    """The spec a ``results.json`` record (or the child's argument) describes."""
    cls = SequenceSpec if data.get("kind") == "sequence" else NetSpec
    names = {f.name for f in fields(cls) if f.init}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Sizes:
    """Input sizes and settings per section (cube sides unless said)."""

    a: list[int]
    b: int
    c: int
    c_channels: int
    depths: list[int]
    d: list[tuple[int, int, int]]  # (T, H, W)
    d_ranks: list[str]
    e: int
    e_setting: list[str]
    f: list[int]
    f_predict: list[tuple[int, int, int]]
    unet: list[str] = field(default_factory=list)  # overrides of every U-Net (tiny variants)
    hyperbolic: list[str] = field(default_factory=list)


# --quick: tiny models too, the point is to exercise every path in seconds
QUICK = Sizes(a=[16], b=16, c=16, c_channels=8, depths=[1, 2], d=[(8, 16, 16)], d_ranks=["4"],
              e=16, e_setting=QUICK_UNET, f=[16], f_predict=[], unet=QUICK_UNET,
              hyperbolic=QUICK_HYP)  # fmt: skip
CUDA = Sizes(a=[96, 128], b=128, c=64, c_channels=60, depths=list(range(1, 9)),
             d=[(32, 64, 64), (72, 120, 208), (72, 240, 424)], d_ranks=["4", "8", "null"],
             e=96, e_setting=[], f=[96, 128], f_predict=[(160, 192, 160)])  # fmt: skip
CPU = Sizes(a=[64, 96], b=64, c=48, c_channels=60, depths=list(range(1, 9)),
            d=[(32, 64, 64), (64, 128, 128)], d_ranks=["4", "8"], e=32, e_setting=ZOO_SMALL,
            f=[64, 96], f_predict=[(160, 192, 160)])  # fmt: skip


def _sides(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in t.split("x")) for t in text.split(",") if t]


def sizes_from_args(args: argparse.Namespace, cuda: bool) -> Sizes:
    """The preset (``--quick``, CUDA or CPU) with the command line's sizes over it."""
    s = replace(QUICK if args.quick else CUDA if cuda else CPU)
    if args.size:
        s.c = args.size
    if args.sizes:
        s.a = [int(v) for v in args.sizes.split(",")]
    if args.depth_size:
        s.b = args.depth_size
    if args.video_sizes:
        s.d = _shapes(args.video_sizes)
    if args.ranks:
        s.d_ranks = args.ranks.split(",")
    if args.depths:
        s.depths = [int(d) for d in args.depths.split(",")]
    if args.zoo_size:
        s.e = args.zoo_size
    if args.zoo_default_channels:
        s.e_setting = []
    if args.fov_sizes is not None:
        s.f = [int(v) for v in args.fov_sizes.split(",") if v]
    if args.fov_predict is not None:
        s.f_predict = _shapes(args.fov_predict)
    return s


def make_specs(args: argparse.Namespace, cuda: bool) -> list[NetSpec | SequenceSpec]:
    """The specs of ``args.sections`` (the options of ``scripts/bench.py``), in running order."""
    from revseg.config import CONFIG_DIR

    sizes = sizes_from_args(args, cuda)
    steps, threads, unet, hyp = args.steps, args.threads, sizes.unet, sizes.hyperbolic
    specs: list[NetSpec | SequenceSpec] = []

    def net(section: str, label: str, overrides: list[str], size: list[int], **extra) -> None:
        extra.setdefault("steps", steps)
        specs.append(NetSpec(section, label, overrides, size, threads=threads, **extra))

    if "a" in args.sections and not args.predict_only:
        for s in sizes.a:
            net("a", "prev_unet", ["model=prev_unet", *unet], [s] * 3)
            off = ["model=prev_unet", "model.memory_saving=false", *unet]
            net("a", "prev_unet (memory saving off)", off, [s] * 3)
            net("a", "unet_baseline", ["model=unet_baseline", *unet], [s] * 3)
    if "b" in args.sections and not args.predict_only:
        for d in (1, 2, 3, 4) if not args.quick else (1, 2):
            for ms in (True, False) if not args.quick else (True,):
                label = f"prev_unet depth {d}" + ("" if ms else " (memory saving off)")
                overrides = ["model=prev_unet", f"model.encoder_depth={d}", *unet]
                overrides += [] if ms else ["model.memory_saving=false"]
                net("b", label, overrides, [sizes.b] * 3, steps=min(steps, 1), depth=d,
                    memory_saving=ms)  # fmt: skip
        if not args.quick:
            base = ["model=unet_baseline", *unet]
            net("b", "unet_baseline", base, [sizes.b] * 3, steps=min(steps, 1))
    for text in filter(None, args.predict.split(",")):
        shape = [int(v) for v in text.split("x")] if "x" in text else [int(text)] * 3
        if "a" in args.sections:
            for name in ("prev_unet", "unet_baseline"):
                net("a", name, [f"model={name}", *unet], shape, plan_only=True)
        if "b" in args.sections:
            for d in (1, 2, 3, 4):
                overrides = ["model=prev_unet", f"model.encoder_depth={d}", *unet]
                net("b", f"prev_unet depth {d}", overrides, shape, plan_only=True, depth=d,
                    memory_saving=True)  # fmt: skip
    if "c" in args.sections:
        for d in sizes.depths:
            for impl in args.impls.split(",") if args.impls else IMPLS:
                channels = args.channels or sizes.c_channels
                specs.append(
                    SequenceSpec(impl, impl, d, channels, 1, [sizes.c] * 3, steps, threads)
                )
    if "d" in args.sections and (CONFIG_DIR / "model" / "hyperbolic_blr.yaml").exists():
        base = ["model=hyperbolic_blr", "data=synthetic_video", *hyp]
        for rank in sizes.d_ranks:
            for thw in sizes.d:
                net("d", f"hyperbolic_blr rank {rank}", [*base, f"model.rank={rank}"], list(thw),
                    video=True, rank=rank, layers=27)  # fmt: skip
        layers = "[2,4,2]" if hyp else "[6,8,8,8,8,8,8]"
        deep = [*base, "model.rank=4", f"model.layers={layers}"]
        net("d", "hyperbolic_blr rank 4, doubled depth", deep, list(sizes.d[-1]), video=True,
            rank="4", layers=54)  # fmt: skip
    if "e" in args.sections and not args.predict_only:
        models = args.models.split(",") if args.models else None
        for variant in zoo_designs(sizes.e_setting, models):
            specs.append(replace(variant, size=[sizes.e] * 3, steps=steps, threads=threads))
    if "f" in args.sections:
        from revseg.bench import fov

        specs += fov.specs(sizes.f, sizes.f_predict, steps, threads, bool(args.quick))
    if "g" in args.sections:
        from revseg.bench import precision

        labels = args.precision_configs.split(";") if args.precision_configs else None
        precisions = args.precisions.split(",") if args.precisions else None
        sides = sizes.f if args.precision_sizes is None else _sides(args.precision_sizes)
        specs += precision.specs(
            sides, sizes.f_predict, steps, threads, bool(args.quick), labels=labels,
            precisions=precisions,
        )  # fmt: skip
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


def zoo_designs(setting: list[str], models: list[str] | None = None) -> list[NetSpec]:
    """Section e: every BraTS-like model config (``in_channels: 4``) and its variants, as specs
    without size, steps and threads (:func:`make_specs` sets them).

    The config group is the registry (:func:`revseg.config.group_options`); what varies comes from
    each config's own keys: ``memory_saving`` (on, then off: the reference) or ``checkpointing``
    (off: the reference, then on), every kind of a ``downsample`` key (the model module's
    ``DOWNSAMPLE_KINDS``), and depths :data:`ZOO_DEPTHS` where ``encoder_depth`` /
    ``decoder_depth`` exist (both set). Video models (``in_channels`` 3) are section d's.

    Raises:
        SystemExit: a name in ``models`` is not a model config.
    """
    from revseg.config import group_options
    from revseg.memory.plan import compose_train_config

    options = group_options("model")
    unknown = sorted(set(models or ()) - set(options))
    if unknown:
        raise SystemExit(
            f"--models: unknown {', '.join(unknown)}; choose from {', '.join(options)}"
        )
    variants = []
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
                    spec = NetSpec("e", label, overrides, [], 0, None, setting=kind or "",
                                   depth=depth, saving=saving, design=name, switch=switch,
                                   zoo_setting=own, zoo_note=note)  # fmt: skip
                    variants.append(spec)
    return variants


# --------------------------------------------------------------------------------------------
# the records results.json holds: ``{"spec": spec.as_dict(), "result": {...}}``


def size_name(size: Sequence[int]) -> str:
    """``"160x192x160"``: a size as the reports name it."""
    return "x".join(map(str, size))


def size_title(size: Sequence[int]) -> str:
    """``"96³"`` for a cube, else :func:`size_name`'s ``"160x192x160"``."""
    return f"{size[0]}³" if len(set(size)) == 1 else size_name(size)


def three_sides(values: Sequence[int]) -> list[int]:
    """A script's ``--size``, one side (a cube) or three (D H W), as three sides.

    Raises:
        ValueError: for another number of values.
    """
    if len(values) not in (1, 3):
        raise ValueError("--size takes one side or three (D H W)")
    return list(values) * 3 if len(values) == 1 else list(values)


def gib(n: float | None) -> str:
    """Bytes as GiB with two decimals, ``–`` for none."""
    return "–" if n is None else f"{n / 2**30:.2f}"


def result_value(res: dict[str, Any] | None, key: str) -> float | None:
    """A result's ``"peak"`` (measured, else planned bytes) or ``"time"`` (median step
    seconds); ``None`` for a missing, failed or skipped one."""
    if not res or not ok(res):
        return None
    if key == "time":
        return res.get("step_time_s")
    return res.get("peak_bytes", res.get("planned_peak_bytes"))


def ok(r: dict[str, Any]) -> bool:
    """A result that ran (neither an error nor skipped)."""
    return "error" not in r and "skipped" not in r


def zoo_key(spec: dict[str, Any]) -> tuple:
    """A zoo configuration: design, downsample kind, depth, saving."""
    return spec["design"], spec["setting"], spec["depth"], spec["saving"]
