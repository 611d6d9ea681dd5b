"""Numerical error of reversible parts: the SNR of reconstructed activations, and a monitor.

Hascoet, Febvre, Ariki, Takiguchi: "Reversible designs for extreme memory reduction of deep
neural networks" (section 4.1.1, Figures 10-14). A memory-saving backward does not see the
activations of the forward; it rebuilds them from the output through the chain of inverses, and
rounding makes the rebuilt ``x_hat = x + eps_x`` noisy. For every layer the signal-to-noise ratio
(eq. 17) and the relative error of what the backward works with are::

    snr = |x|^2 / |x - x_hat|^2   (reported as 10 log10 snr dB),   rel = |x - x_hat| / |x|

so ``rel = 10^(-snr_dB / 20)``: 1e-3 is 60 dB, float32 couplings give about 1e-7. One inverse
divides the SNR by ``alpha = snr_in / snr_out`` (eq. 18), measured by adding Gaussian noise of a
known SNR to a layer's output and inverting it, next to the paper's closed form where the layer
has one (``snr_alpha()`` of the invertible LeakyReLU and batch norm, eq. 32c and 26d; 1 for
invertible pooling and the Haar transform, which only move or rotate the numbers).

:func:`analyze_reconstruction` walks ``model.modules()`` for reversible parts (sequences of blocks
with ``inverse``, layer-wise invertible chains, leapfrog stacks), captures their real inputs in
one forward, runs each part block by block, rebuilds every block input from the last output
only and, inside couplings whose F or G is a layer-wise chain (the hybrid block), rebuilds the
layer inputs as their backward does. Running and batch statistics, the RNG and the train/eval
flags are left as they were. :class:`ReconstructionMonitor` logs the worst error during training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from revseg.nn.invertible import BatchPooling3d, ChannelPooling3d, InverseOf
from revseg.nn.leapfrog import LeapfrogStack
from revseg.nn.reversible import AdditiveCoupling, Step, recomputing, reversible_parts
from revseg.training.callbacks import Callback

if TYPE_CHECKING:
    from revseg.training.contracts import TrainerView

__all__ = [
    "LayerRecord",
    "ReconstructionMonitor",
    "SNRReport",
    "analyze_reconstruction",
    "relative_error",
    "reversible_parts",
    "snr_db",
]

log = logging.getLogger(__name__)

# the input or output of one block, as the analysis compares them: one tensor, or the leapfrog
# pair (Y_{j-1}, Y_j); a tuple, never changed in place (the engine's ChainState is a list it may)
Activations = tuple[torch.Tensor, ...]


def _as_activations(x: torch.Tensor | Activations) -> Activations:
    return (x,) if torch.is_tensor(x) else tuple(x)


def _energy(state: Activations) -> float:
    return sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in state)


def _error_energy(x: Activations, x_hat: Activations) -> float:
    return sum(
        float(torch.linalg.vector_norm(a.to(b.device) - b, dtype=torch.float64)) ** 2
        for a, b in zip(x, x_hat)
    )


def snr_db(x: torch.Tensor | Activations, x_hat: torch.Tensor | Activations) -> float:
    """``10 log10(|x|^2 / |x - x_hat|^2)``; ``inf`` for an exact reconstruction."""
    x, x_hat = _as_activations(x), _as_activations(x_hat)
    noise, signal = _error_energy(x, x_hat), _energy(x)
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def relative_error(x: torch.Tensor | Activations, x_hat: torch.Tensor | Activations) -> float:
    """``|x - x_hat| / |x|`` (0 for an exact reconstruction)."""
    x, x_hat = _as_activations(x), _as_activations(x_hat)
    return math.sqrt(_error_energy(x, x_hat) / max(_energy(x), 1e-300))


# --------------------------------------------------------------------------------------------
# the reversible parts of a model, as chains of probed blocks


@dataclass
class _ProbedBlock:
    """One block (or one layer of a coupling's F or G) of a reversible part, as the analysis
    probes it: ``forward`` and ``inverse`` are plain functions on :data:`Activations`, wrapping
    the module or, for a leapfrog stack, the engine's :class:`~revseg.nn.reversible.Step`."""

    name: str
    kind: str
    forward: Callable[[Activations], Activations]
    inverse: Callable[[Activations], Activations]
    closed_form: Callable[[], float | None] = lambda: None  # noqa: E731
    # a coupling's F and G when they are layer-wise invertible chains: ("f" | "g", chain)
    chains: list[tuple[str, nn.Module]] = field(default_factory=list)
    split: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def _items(module: nn.Module) -> list[nn.Module] | None:
    """The blocks (or layers) of an invertible sequence, ``None`` if ``module`` is not one."""
    if not callable(getattr(module, "inverse", None)):
        return None
    for attr in ("blocks", "layers"):
        items = getattr(module, attr, None)
        if isinstance(items, nn.ModuleList) and len(items) > 0:
            if all(callable(getattr(m, "inverse", None)) for m in items):
                return list(items)
    return None


def _kind(module: nn.Module) -> str:
    if isinstance(module, InverseOf):
        return f"InverseOf({_kind(module.module)})"
    return type(module).__name__


def _closed_form(module: nn.Module) -> float | None:
    """The paper's alpha for the layer's current statistics, where one exists."""
    alpha = getattr(module, "snr_alpha", None)
    if callable(alpha):
        return float(alpha())
    inner = module.module if isinstance(module, InverseOf) else module
    return 1.0 if isinstance(inner, (ChannelPooling3d, BatchPooling3d)) else None


def _is_chain(module: nn.Module) -> bool:
    return isinstance(getattr(module, "layers", None), nn.ModuleList) and _items(module) is not None


def _module_block(name: str, module: nn.Module) -> _ProbedBlock:
    chains = []
    if isinstance(module, AdditiveCoupling):
        chains = [
            (key, getattr(module, key)) for key in ("f", "g") if _is_chain(getattr(module, key))
        ]
    return _ProbedBlock(
        name,
        _kind(module),
        lambda s: (module(s[0]),),
        lambda s: (module.inverse(s[0]),),
        lambda: _closed_form(module),
        chains,
        module.split if chains else None,
    )


def _leapfrog_blocks(stack: LeapfrogStack) -> list[_ProbedBlock]:
    """One block per Haar transform and per leapfrog layer, on the pair ``(Y_{j-1}, Y_j)``: the
    engine's own steps (:meth:`LeapfrogStack.steps`, after the start pair), named by level."""
    blocks = []
    engine_steps = iter(stack.steps()[1:])
    for i, (kind, level) in enumerate(zip(stack.transforms, stack.levels)):
        if kind is not None:
            step = next(engine_steps)  # orthonormal: alpha = 1
            name, label = f"levels.{i}.{kind}", f"haar {kind}"
            blocks.append(_ProbedBlock(name, label, *_on_tuples(step), lambda: 1.0))
        for j in range(len(level)):
            step = next(engine_steps)
            blocks.append(_ProbedBlock(f"levels.{i}.{j}", "leapfrog layer", *_on_tuples(step)))
    return blocks


_TupleFn = Callable[[Activations], Activations]


def _on_tuples(step: Step) -> tuple[_TupleFn, _TupleFn]:
    """An engine step's forward and inverse as functions on tuples (the engine's are lists)."""
    return (lambda s: tuple(step.forward(list(s)))), (lambda s: tuple(step.inverse(list(s))))


def _part_blocks(module: nn.Module) -> list[_ProbedBlock]:
    if isinstance(module, LeapfrogStack):
        return _leapfrog_blocks(module)
    attr = "blocks" if isinstance(getattr(module, "blocks", None), nn.ModuleList) else "layers"
    return [_module_block(f"{attr}.{i}", m) for i, m in enumerate(_items(module) or [])]


# --------------------------------------------------------------------------------------------
# the report


@dataclass
class LayerRecord:
    """The rebuilt input of one block (``level="block"``: from the part's chain of inverses) or
    of one layer inside a block's F or G (``level="layer"``: from the layer-wise inverses).

    ``alpha`` is the measured SNR reduction of this block's (layer's) inverse, ``closed_form``
    the paper's value where one exists; both ``None`` when not measured.
    """

    part: str
    position: int
    name: str
    kind: str
    level: str
    snr_db: float
    rel_error: float
    alpha: float | None = None
    closed_form: float | None = None


@dataclass
class SNRReport:
    """The per-layer records of every reversible part, from :func:`analyze_reconstruction`."""

    dtype: str
    mode: str
    noise_snr_db: float
    trials: int
    layers: list[LayerRecord]

    def worst_by_part(self) -> dict[str, float]:
        """The largest relative error of each part."""
        worst: dict[str, float] = {}
        for r in self.layers:
            worst[r.part] = max(worst.get(r.part, 0.0), r.rel_error)
        return worst

    def kinds(self) -> list[dict[str, Any]]:
        """Per layer type: count, mean measured alpha (linear and dB), mean closed form, worst
        SNR of the inputs it rebuilds."""
        out = []
        for kind in dict.fromkeys(r.kind for r in self.layers):
            rows = [r for r in self.layers if r.kind == kind]
            alphas = [r.alpha for r in rows if r.alpha is not None]
            closed = [r.closed_form for r in rows if r.closed_form is not None]
            alpha = statistics.fmean(alphas) if alphas else None
            out.append(
                {
                    "kind": kind,
                    "count": len(rows),
                    "alpha": alpha,
                    "alpha_std": statistics.pstdev(alphas) if alphas else None,
                    "alpha_db": 10 * math.log10(alpha) if alpha else None,
                    "closed_form": statistics.fmean(closed) if closed else None,
                    "min_snr_db": min(r.snr_db for r in rows),
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (an exact reconstruction's infinite SNR becomes ``None``)."""

        def finite(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "dtype": self.dtype,
            "mode": self.mode,
            "noise_snr_db": self.noise_snr_db,
            "trials": self.trials,
            "worst_rel_error_by_part": self.worst_by_part(),
            "layers": [{k: finite(v) for k, v in asdict(r).items()} for r in self.layers],
            "kinds": [{k: finite(v) for k, v in row.items()} for row in self.kinds()],
        }


# --------------------------------------------------------------------------------------------
# the analysis


@contextlib.contextmanager
def _untouched(model: nn.Module, mode: str | None) -> Iterator[None]:
    """Run with ``model`` in ``mode`` ("train" / "eval" / None = as is); afterwards its buffers
    (running statistics), stored batch statistics, train/eval flags and the RNG are as before."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    stats = [(m, m.batch_stats) for m in model.modules() if hasattr(m, "batch_stats")]
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted({b.device for b in (*model.parameters(), *model.buffers())}, key=str)
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        try:
            if mode is not None:
                model.train(mode == "train")
            yield
        finally:
            with torch.no_grad():
                for buf, value in buffers:
                    buf.copy_(value)
            for module, value in stats:
                module.batch_stats = value
            for module, value in flags:
                module.training = value


def _capture(model: nn.Module, x: torch.Tensor, parts: list[tuple[str, nn.Module]]) -> dict:
    """The first input each part receives in one forward of ``model`` on ``x``, by name."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        seen.setdefault(module, args[0].detach())

    handles = [module.register_forward_pre_hook(hook) for _, module in parts]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {  # a leapfrog stack starts from the pair (Y_{-1}, Y_0) = (Y_0, Y_0)
        name: (seen[m], seen[m]) if isinstance(m, LeapfrogStack) else (seen[m],)
        for name, m in parts
        if m in seen
    }


class _Noise:
    """Gaussian output noise of a known SNR from a private generator (no global RNG draws)."""

    def __init__(self, snr_db_value: float, trials: int, seed: int) -> None:
        self.snr = 10 ** (snr_db_value / 10)
        self.trials = trials
        self.seed = seed
        self.generator: torch.Generator | None = None

    def alpha(self, x: Activations, forward: Callable, inverse: Callable) -> float | None:
        """Mean of ``snr_in / snr_out`` over the draws (forward runs on the clean input first)."""
        y = forward(x)
        signal, total = _energy(y), 0.0
        if signal == 0 or self.trials < 1:
            return None
        if self.generator is None:  # one device for the whole analysis
            self.generator = torch.Generator(y[0].device).manual_seed(self.seed)
        for _ in range(self.trials):
            eps = [
                torch.randn(t.shape, generator=self.generator, device=t.device, dtype=t.dtype)
                for t in y
            ]
            scale = math.sqrt(signal / self.snr / _energy(tuple(eps)))
            noise = _error_energy(x, inverse(tuple(t + scale * e for t, e in zip(y, eps))))
            total += math.inf if noise == 0 else (_energy(x) / noise) / self.snr
        return total / self.trials


class _ForwardStates:
    """The input of every block of a chain, served last first, without holding them all.

    The forward keeps every ``stride``-th state (``stride = ceil(sqrt(N))`` for ``N`` blocks);
    the states between two kept ones are recomputed, a segment at a time, when the reverse walk
    reaches them. About ``2 sqrt(N)`` states are held at once instead of ``N``, on the chain's
    own device (nothing is copied to host memory), for one extra forward of each block. Index
    ``N`` is the chain's output.
    """

    def __init__(self, blocks: list[_ProbedBlock], x0: Activations) -> None:
        self.blocks = blocks
        self.n = len(blocks)
        self.stride = max(1, math.isqrt(max(self.n - 1, 0)) + 1)
        self.kept: dict[int, Activations] = {0: x0}
        self.segment: dict[int, Activations] = {}
        state = x0
        for k, block in enumerate(blocks, start=1):
            state = block.forward(state)
            if k % self.stride == 0 or k == self.n:
                self.kept[k] = state

    def __getitem__(self, k: int) -> Activations:
        if k in self.kept:
            return self.kept[k]
        if k not in self.segment:
            start = k - k % self.stride
            self.segment = {}  # frees the previous segment before this one is computed
            state = self.kept[start]
            for j in range(start + 1, min(start + self.stride, self.n)):
                state = self.blocks[j - 1].forward(state)
                self.segment[j] = state
        return self.segment[k]


def _chain_walk(chain: nn.Module, x_true: torch.Tensor, x_used: torch.Tensor) -> Iterator:
    """``(index, layer, true input, rebuilt input)`` of each layer of a layer-wise chain inside
    a coupling, last layer first, as its backward rebuilds them: the output recomputed from the
    rebuilt chain input ``x_used``, then the layers' inverses (layer 0 receives ``x_used``)."""
    layers = [_module_block(f"layers.{i}", layer) for i, layer in enumerate(chain.layers)]
    true = _ForwardStates(layers[:-1], (x_true,))
    y = (chain(x_used),)
    for index in range(len(layers) - 1, -1, -1):
        y = (x_used,) if index == 0 else layers[index].inverse(y)
        yield index, layers[index], true[index], y


def _record(
    part: str,
    block: _ProbedBlock,
    name: str,
    level: str,
    x: Activations,
    x_hat: Activations,
    noise: _Noise | None,
) -> LayerRecord:
    """The record of one rebuilt input; ``alpha`` from noise on the output of ``block(x)``."""
    snr, rel = snr_db(x, x_hat), relative_error(x, x_hat)
    record = LayerRecord(part, 0, name, block.kind, level, snr, rel)
    if noise is not None:
        record.alpha = noise.alpha(x, block.forward, block.inverse)
        record.closed_form = block.closed_form()  # after the forward on the true input
    return record


def _analyze_part(part: str, module: nn.Module, x0: Activations, noise: _Noise | None) -> list:
    """Every block's rebuilt input from the part's output, and the layer inputs rebuilt inside
    couplings of layer-wise chains, in forward order. Alpha is measured after each rebuild, so
    that it never changes the batch statistics a later inverse uses."""
    blocks = _part_blocks(module)
    device = x0[0].device
    low = x0[0].dtype in (torch.float16, torch.bfloat16)
    if low and torch.is_autocast_enabled(device.type) and not isinstance(module, LeapfrogStack):
        x0 = (x0[0].float(),)  # sequences keep their states in float32 under autocast
    true = _ForwardStates(blocks, x0)
    keyed: list[tuple[tuple[int, int, int], LayerRecord]] = []
    out = true[len(blocks)]  # the backward starts from the part's output
    for k in range(len(blocks) - 1, -1, -1):
        block = blocks[k]
        rebuilt = block.inverse(out)
        record = _record(part, block, block.name, "block", true[k], rebuilt, noise)
        keyed.append(((k, 0, 0), record))
        for c, (key, chain) in enumerate(block.chains, start=1):
            # F acts on x2 (second half of the block input), G on y1 (first half of its output)
            src, used, half = (true[k], rebuilt, 1) if key == "f" else (true[k + 1], out, 0)
            x_true = block.split(src[0])[half]
            walk = _chain_walk(chain, x_true, block.split(used[0])[half])
            for i, sub, x, x_hat in walk:
                name = f"{block.name}.{key}.{sub.name}"
                keyed.append(((k, c, i), _record(part, sub, name, "layer", x, x_hat, noise)))
        out = rebuilt
    records = [record for _, record in sorted(keyed, key=lambda item: item[0])]
    for position, record in enumerate(records):
        record.position = position
    return records


def analyze_reconstruction(
    model: nn.Module,
    x: torch.Tensor,
    mode: str | None = "train",
    alpha: bool = True,
    noise_snr_db: float = 60.0,
    trials: int = 2,
    seed: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> SNRReport:
    """Reconstruction SNR of every layer of every reversible part of ``model`` on a real batch.

    Args:
        model: a revseg model (or any module holding reversible parts, see
            :func:`reversible_parts`), in the dtype to analyse (float32 is the training one).
        x: a real batch ``(B, C_in, D, H, W)`` on the model's device and dtype.
        mode: ``"train"`` rebuilds as the training backward does (batch statistics),
            ``"eval"`` with running statistics, ``None`` keeps the model's flags.
        alpha: also measure the SNR reduction ``alpha`` of each block and layer (costs
            ``trials`` extra inverses each).
        noise_snr_db: SNR of the Gaussian noise added to layer outputs to measure ``alpha``
            (small enough that the rounding of the inverse does not count, large enough that the
            noise rarely flips a LeakyReLU's sign: the paper's regime).
        trials: noise draws per layer (their alphas are averaged).
        seed: seed of the noise (a private generator: the global RNG is not used).
        autocast: a context (e.g. ``torch.autocast``) to run the model in, as training does.

    Raises:
        ValueError: if ``model`` has no reversible part or ``mode`` is unknown.
    """
    if mode not in ("train", "eval", None):
        raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
    parts = reversible_parts(model)
    if not parts:
        raise ValueError(f"{type(model).__name__} has no reversible parts to analyse")
    noise = _Noise(noise_snr_db, trials, seed) if alpha else None
    records: list[LayerRecord] = []
    with _untouched(model, mode), torch.no_grad(), autocast or contextlib.nullcontext():
        inputs = _capture(model, x, parts)  # a training forward (power iterations advance)
        with recomputing():  # from here on as in the backward: no state advances
            for name, module in parts:
                if name in inputs:  # a part the forward did not reach has nothing to rebuild
                    label = name or type(module).__name__
                    records += _analyze_part(label, module, inputs[name], noise)
    dtype = str(x.dtype).removeprefix("torch.")
    label = mode or ("train" if model.training else "eval")
    return SNRReport(dtype, label, noise_snr_db, trials if alpha else 0, records)


# --------------------------------------------------------------------------------------------
# the training callback


_STATE = ("last", "max", "max_part", "steps", "warned")  # what a resume restores


class ReconstructionMonitor(Callback):
    """Every ``every_n_steps`` steps, the worst relative reconstruction error of real batches.

    After an optimisation step, the current training batch (``on="train"``) or, after each
    validation, the first validation batch (``on="val"``) goes through
    :func:`analyze_reconstruction` in train mode (the training backward's conditions, under the
    trainer's precision): the largest ``|x - x_hat| / |x|`` over every rebuilt block and layer
    input of each reversible part is logged to TensorBoard as ``reconstruction/max_rel_error``
    (and ``reconstruction/<part>`` for up to ``max_logged_parts`` parts). The first value past
    ``threshold`` logs one warning naming the part. The training result is unchanged: no
    gradients, no RNG draws, running statistics restored.

    Args:
        every_n_steps: training steps between checks (``on="train"``).
        threshold: relative error that warns; ``1e-3`` is an SNR of 60 dB, ``-20 log10`` of it
            in general (float32 couplings give about 1e-7, long layer-wise chains far more).
        on: ``"train"`` (training batches) or ``"val"`` (the first validation batch).
        max_logged_parts: log each part's value when the model has at most this many parts.

    Raises:
        ValueError: for ``every_n_steps < 1``, ``threshold <= 0`` or an unknown ``on``.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        threshold: float = 1e-3,
        on: str = "train",
        max_logged_parts: int = 8,
    ) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if on not in ("train", "val"):
            raise ValueError(f"on must be 'train' or 'val', got {on!r}")
        self.every_n_steps = int(every_n_steps)
        self.threshold = float(threshold)
        self.on = on
        self.max_logged_parts = int(max_logged_parts)
        self.last: float | None = None
        self.max: float | None = None
        self.max_part: str | None = None
        self.steps = 0
        self.warned = False
        self.idle = False

    def on_train_start(self, trainer: TrainerView) -> None:
        self.idle = not reversible_parts(trainer.network)
        if self.idle:
            log.info("reconstruction monitor idle: no reversible parts in the model")

    def on_train_batch_end(self, trainer: TrainerView, batch: dict[str, Any], step: int) -> None:
        if self.on == "train" and not self.idle and step % self.every_n_steps == 0:
            self.check(trainer, batch["image"], step)

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        if self.on == "val" and not self.idle:
            with torch.random.fork_rng(devices=[]):  # the loader draws a base seed
                batch = next(iter(trainer.data.val_dataloader()))
            self.check(trainer, batch["image"], trainer.global_step)

    def check(self, trainer: TrainerView, image: torch.Tensor, step: int) -> float:
        """Measure on ``image`` now, log, warn once past the threshold; returns the worst error."""
        from revseg.device import autocast_context

        device = trainer.device
        autocast = autocast_context(device, getattr(trainer, "precision", "fp32"))
        report = analyze_reconstruction(
            trainer.network, image.to(device), mode="train", alpha=False, autocast=autocast
        )
        worst = report.worst_by_part()
        if not worst:  # the forward reached no reversible part
            return 0.0
        part, value = max(worst.items(), key=lambda item: item[1])
        self.last, self.steps = value, self.steps + 1
        if self.max is None or value > self.max:
            self.max, self.max_part = value, part
        writer = trainer.writer
        if writer is not None:
            writer.add_scalar("reconstruction/max_rel_error", value, step)
            if len(worst) <= self.max_logged_parts:
                for name, v in worst.items():
                    writer.add_scalar(f"reconstruction/{name}", v, step)
        if value > self.threshold and not self.warned:
            self.warned = True
            snr = -20 * math.log10(value)
            log.warning(
                "reconstruction error %.3g (|x - x_hat| / |x|, SNR %.1f dB) of %s at step %d "
                "exceeds threshold %.3g",
                *(value, snr, part, step, self.threshold),
            )
        return value

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in _STATE:
            setattr(self, key, state[key])

    def summary(self) -> dict[str, Any]:
        keys = ("last", "max", "steps")
        return {"reconstruction": {**{k: getattr(self, k) for k in keys}, "part": self.max_part}}
