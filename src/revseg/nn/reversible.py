"""Reversible blocks and the memory-saving autograd that makes their depth (almost) free.

Two ideas are kept apart, as in memcnn and revlib:

* :class:`AdditiveCoupling` is plain math. It splits the channels in two halves and computes
  (Gomez et al. 2017, "The Reversible Residual Network")::

      y1 = x1 + F(x2)        x2 = y2 - G(y1)
      y2 = x2 + G(y1)        x1 = y1 - F(x2)

  ``forward`` and ``inverse`` are ordinary differentiable module calls.

* One engine runs every memory-saving chain: :func:`run_chain` applies a list of :class:`Step`
  objects inside one :class:`torch.autograd.Function` that keeps only the chain's output state
  (memory O(1) in depth) and walks the steps from the end in backward, each step rebuilding its
  input and differentiating itself:

  - :class:`CouplingStep` (the blocks of :class:`ReversibleSequence`) runs ``G(y1)`` and
    ``F(x2)`` once each with grad enabled; those two calls *are* the inverse (they give ``x2``
    and ``x1``) and build the local graph that :func:`torch.autograd.grad` differentiates: one
    extra forward of F and G per block, the method's floor (about 4/3 of plain training time),
    instead of the inverse followed by a second forward (5/3). It works in place, in the saved
    output's and the incoming gradient's storage.
  - :class:`BlockStep` (the blocks of :class:`InvertibleSequence` and of layer-wise chains)
    steps any module with an ``inverse`` back with :func:`block_backward_step`: the block's own
    ``backward_step`` where it has one (hybrid blocks, invertible convolutions, layer-wise
    chains), else ``block.inverse`` followed by one recomputation with grad.
  - the leapfrog stack of the hyperbolic network (:mod:`revseg.nn.leapfrog`) is a chain of
    steps on the pair of states ``(Y_{j-1}, Y_j)``.

Parameter gradients leave the Function as outputs of their ``backward`` (the parameters are
Function inputs), so autograd accumulates them and DistributedDataParallel's hooks fire as usual;
nothing calls ``.backward()`` inside a backward pass.

Under autocast (mixed precision) the states between blocks are kept in float32 by default while
the blocks run in low precision (:func:`states_in`): each inverse subtracts exactly what the
forward added, to float32 rounding, but the recomputation casts the reconstructed input to
bf16/fp16 again, where a last-bit difference can move a value to the next low-precision step. So
the reconstruction and the gradients are not as exact as in float32 beyond a block or two, and
the error grows with depth (docs/precision.md; at depth 8, bf16: reconstruction 8e-4 and
gradients 2e-3 against plain autograd under the same autocast, which is itself 4e-2 from
float32). Low-precision states (``state_dtype="autocast"``) halve the bytes of every state at the
price of low-precision rounding in the inverses.

Recomputation sees the forward's random numbers (the RNG state before each call is stored and
restored) and the forward's autocast state, runs under :func:`recomputing`, and BatchNorm running
statistics (torch's and :class:`~revseg.nn.invertible.InvertibleBatchNorm3d`'s) are not updated a
second time.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.profiler import record_function

from revseg.nn import fused_step
from revseg.nn.blocks import FunctionModes

__all__ = [
    "AdditiveCoupling",
    "BlockStep",
    "CouplingStep",
    "InvertibleSequence",
    "ReversibleChain",
    "ReversibleSequence",
    "Step",
    "apply_invertible_sequence",
    "block_backward_step",
    "coupling_backward_step",
    "fork",
    "invertible_steps",
    "is_recomputing",
    "is_reversible_part",
    "recomputing",
    "reversible_parts",
    "run_chain",
    "states_in",
    "check_state_dtype",
    "STATE_DTYPES",
]


class AdditiveCoupling(nn.Module):
    """Additive coupling block on a channel split: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``.

    Args:
        f: module applied to the second channel half, shape-preserving ``(B, C/2, ...)``.
        g: module applied to the first output half, shape-preserving ``(B, C/2, ...)``.
        split_dim: the dimension split in two equal halves (1 = channels).
    """

    def __init__(self, f: nn.Module, g: nn.Module, split_dim: int = 1) -> None:
        super().__init__()
        self.f = f
        self.g = g
        self.split_dim = split_dim

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves ``(x1, x2)`` of ``x`` along ``split_dim`` (views, no copy).

        Raises:
            ValueError: for an odd size along ``split_dim``.
        """
        size = x.shape[self.split_dim]
        if size % 2:
            raise ValueError(
                f"AdditiveCoupling needs an even size along dim {self.split_dim}, got {size}"
            )
        x1, x2 = torch.chunk(x, 2, dim=self.split_dim)
        return x1, x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, ...) -> (B, C, ...)``."""
        x1, x2 = self.split(x)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat((y1, y2), dim=self.split_dim)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Reconstruct the input from the output: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``."""
        y1, y2 = self.split(y)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat((x1, x2), dim=self.split_dim)


# --------------------------------------------------------------------------------------------
# state that recomputation must reproduce: RNG, autocast, BatchNorm running statistics


class _RngState:
    """The CPU RNG state and, if used, the CUDA RNG state of the tensor's device."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda_device is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


class _AutocastState:
    """Autocast settings (and torch-function modes) at forward time, re-entered for
    recomputation."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None
        self.modes = FunctionModes()

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        if not self.enabled:
            autocast = torch.autocast(self.device_type, enabled=False)
        else:
            autocast = torch.autocast(self.device_type, dtype=self.dtype)
        with autocast, self.modes.restored():
            yield


@contextlib.contextmanager
def _frozen_batchnorm_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Keep BatchNorm running statistics exactly as they are while the forward is recomputed.

    torch's batch norms get their running buffers restored on exit; modules with a
    ``stats_frozen`` flag (:class:`~revseg.nn.invertible.InvertibleBatchNorm3d`) have it set
    for the duration, so they skip the update, and reset to its previous value.
    """
    saved = [
        (buf, buf.clone())
        for module in modules
        for bn in module.modules()
        if isinstance(bn, _BatchNorm) and bn.training and bn.track_running_stats
        for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        if buf is not None
    ]
    flagged = [m for module in modules for m in module.modules() if hasattr(m, "stats_frozen")]
    flags = [m.stats_frozen for m in flagged]
    for m in flagged:
        m.stats_frozen = True
    try:
        yield
    finally:
        for m, flag in zip(flagged, flags):
            m.stats_frozen = flag
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


STATE_DTYPES = ("float32", "autocast")


def check_state_dtype(state_dtype: str) -> str:
    """``state_dtype`` if it is one of :data:`STATE_DTYPES`.

    Raises:
        ValueError: naming the value and the choices.
    """
    if state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"state_dtype must be one of {', '.join(STATE_DTYPES)}, got {state_dtype!r}"
        )
    return state_dtype


def states_in(x: torch.Tensor, state_dtype: str = "float32") -> torch.Tensor:
    """``x`` in the dtype of the states between reversible blocks.

    Outside autocast: ``x`` as it is. Under autocast, ``"float32"`` (the default) keeps the
    states float32 while the blocks compute in low precision: the additive inverses are exact to
    float32 rounding and gradients equal plain autograd's under the same autocast.
    ``"autocast"`` keeps them in the autocast dtype (bf16 / fp16): half the bytes of every state
    and state gradient, at the price of rounding each block's sum to 8 (bf16) or 11 (fp16)
    mantissa bits, so reconstructed inputs differ from the forward's by that rounding, growing with
    depth (docs/precision.md gives the measured errors).
    """
    if not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        return x
    if state_dtype == "autocast":
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "revseg_recomputing", default=False
)


def is_recomputing() -> bool:
    """``True`` while a memory-saving backward reconstructs and recomputes blocks.

    Modules that update state in a training forward (the power iteration of
    :class:`~revseg.nn.lipschitz.SpectralNormConv3d`) check it, so that the recomputed forward
    sees the forward's state instead of advancing it a second time.
    """
    return _RECOMPUTING.get()


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the enclosed calls as a recomputation (see :func:`is_recomputing`)."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


# --------------------------------------------------------------------------------------------
# the memory-saving autograd


def _dense(t: torch.Tensor) -> bool:
    """``True`` for a tensor without gaps or overlaps, contiguous or channels-last (a gradient
    from a channels-last convolution is channels-last: ``trainer.channels_last``)."""
    if t.is_contiguous():
        return True
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return t.ndim in formats and t.is_contiguous(memory_format=formats[t.ndim])


def _sole_owner(t: torch.Tensor, holders: int = 3) -> bool:
    """``True`` when nothing but ``holders`` references refer to ``t``'s storage.

    Counts the storage's references (each tensor or view holds one, a saved tensor one, the
    storage's Python object one): the saved output of a Function is its own with 3 (the saved
    tensor, the detached tensor and the storage object); an incoming gradient with 2. Then
    nothing reads the storage after this backward (a second backward through the node fails on
    the saved tensor's version counter), so it may be overwritten. Only a dense tensor
    (contiguous or channels-last) qualifies. Without the private counter, never claims
    ownership.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or not _dense(t):
        return False
    try:
        return use_count(t.untyped_storage()._cdata) <= holders
    except (AttributeError, RuntimeError, TypeError):
        return False


def _python_refs(t: torch.Tensor) -> int:
    return sys.getrefcount(t)


class _GradientProbe(torch.autograd.Function):
    """Measures the Python references an incoming gradient has that nobody else holds."""

    refs: list[int] = []

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        # the same expression as at the top of _ChainFunction.backward, so the counts agree
        refs = [_python_refs(g) for g in grads]
        _GradientProbe.refs.append(refs[0])
        return grads[0]


@torch.compiler.disable  # counted as the eager chain's backward counts them
def _unheld_gradient_refs() -> int:
    """The references of a gradient held by autograd alone, as seen at the top of a backward
    (measured once: it depends on the Python and torch versions)."""
    if not _GradientProbe.refs:
        with torch.enable_grad():
            x = torch.zeros(2, requires_grad=True)
            _GradientProbe.apply(x).exp().sum().backward()
    return _GradientProbe.refs[0]


def _gradient_is_ours(grad: torch.Tensor, refs: int) -> bool:
    """``True`` when an incoming gradient may be overwritten: no other tensor shares its
    storage and no Python object refers to it (a gradient the user passed to ``backward`` is
    referenced by the caller's frames, a hook may have stored it). ``refs``: its
    :func:`_python_refs` at the top of the backward, where the probe measured them."""
    return refs <= _unheld_gradient_refs() and _sole_owner(grad, holders=2)


class _Fork(torch.autograd.Function):
    """Two uses of one tensor whose gradients are summed in place (see :func:`fork`)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        refs = [_python_refs(g) for g in grads]  # first, as in _GradientProbe.backward
        first, second = grads
        if first is None or second is None:
            return second if first is None else first
        for own, other, r in ((first, second, refs[0]), (second, first, refs[1])):
            if own.dtype == other.dtype and _gradient_is_ours(own, r):
                return own.add_(other)
        return first + second


@torch.compiler.disable  # its backward counts references to its gradients: eager only
def fork(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` for two consumers (a U-Net's skip and its downsampling), with their gradients summed
    in place into one of them where nothing else holds it.

    Autograd sums the gradients of a tensor used twice into a new buffer, so three gradients of
    its size are alive at once; at the top level of a full-field-of-view U-Net that is one
    state more than needed (about 1.2 GB at 160x192x160 with 60 channels). The values and the
    gradients are those of using ``x`` twice.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x, x
    return _Fork.apply(x)


def _unaliased(grads: Sequence[torch.Tensor | None], *buffers: torch.Tensor) -> list:
    """``grads``, with a copy of any that shares storage with a buffer overwritten later."""
    ptrs = {b.untyped_storage().data_ptr() for b in buffers}
    return [
        g.clone() if g is not None and g.untyped_storage().data_ptr() in ptrs else g for g in grads
    ]


def _half_step(
    fn: nn.Module,
    rng: _RngState | None,
    inp: torch.Tensor,
    params: list[nn.Parameter],
    upstream: torch.Tensor,
    target: torch.Tensor | None,
    grad_acc: torch.Tensor,
    chunks: int = 1,
) -> list[torch.Tensor | None]:
    """One half of a coupling's backward, for ``target = rebuilt + fn(inp)``, in place.

    Rebuilds ``target -= fn(inp)`` (unless ``target`` is ``None``: the half is known) and adds
    ``d fn/d inp^T upstream`` to ``grad_acc``; returns the gradients of ``params``. A
    GN -> LReLU -> Conv unit takes the fused step of :mod:`revseg.nn.fused_step` (two half-states
    of workspace, or a few slabs with ``chunks > 1``); any other module is evaluated once with
    grad under the forward's RNG state and differentiated with :func:`torch.autograd.grad`.
    """
    if fused_step.can_fuse(fn):
        return fused_step.half_step(fn, inp, upstream, target, grad_acc, chunks)
    leaf = inp.detach().requires_grad_(True)
    with rng.restored() if rng is not None else contextlib.nullcontext():
        out = fn(leaf)
    grads = torch.autograd.grad(out, [leaf, *params], upstream, allow_unused=True)
    del leaf  # the graph is gone: buffers may be overwritten from here on
    if target is not None:
        target.sub_(out.detach())
    del out
    if grads[0] is not None:
        grad_acc.add_(grads[0])
    return list(grads[1:])


def _add_forward(fn: nn.Module, inp: torch.Tensor, out: torch.Tensor, chunks: int) -> None:
    """``out += fn(inp)`` in place (slab by slab for a fused unit with ``chunks > 1``)."""
    if fused_step.can_fuse(fn):
        fused_step.add_forward(fn, inp, out, chunks)
    else:
        out.add_(fn(inp))


def _coupling_step(
    block: AdditiveCoupling,
    y: torch.Tensor,
    grad: torch.Tensor,
    known: torch.Tensor | None = None,
    rng_f: _RngState | None = None,
    rng_g: _RngState | None = None,
    chunks: int = 1,
) -> list[torch.Tensor | None]:
    """One coupling of a memory-saving backward, in place: ``grad`` becomes the gradient of the
    block's input and ``y`` the input itself (unless the input is ``known``: then ``y`` stays).

    Returns the gradients of F's then G's trainable parameters.
    """
    y1, y2 = block.split(y)
    dy1, dy2 = block.split(grad)
    f_params = [p for p in block.f.parameters() if p.requires_grad]
    g_params = [p for p in block.g.parameters() if p.requires_grad]
    rebuild = known is None
    # G: x2 = y2 - G(y1) into y2's storage; dL/dy1 += dG/dy1^T dy2
    g_grads = _half_step(block.g, rng_g, y1, g_params, dy2, y2 if rebuild else None, dy1, chunks)
    g_grads = _unaliased(g_grads, grad, y)  # before F overwrites those buffers
    # F: x1 = y1 - F(x2) into y1's storage; dL/dx2 = dy2 + dF/dx2^T dL/dy1
    x2 = y2 if rebuild else block.split(known)[1]
    f_grads = _half_step(block.f, rng_f, x2, f_params, dy1, y1 if rebuild else None, dy2, chunks)
    f_grads = _unaliased(f_grads, grad, y)
    return [*f_grads, *g_grads]


def coupling_backward_step(
    block: AdditiveCoupling,
    y: torch.Tensor,
    grad_y: torch.Tensor,
    x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """One coupling of a memory-saving backward, ``(x, dL/dx, grads of F's then G's params)``.

    :class:`CouplingStep`'s backward (:func:`_coupling_step`) on copies of ``y`` and
    ``grad_y``: ``G(y1)`` then ``F(x2)`` evaluated once each, reconstructing ``x2`` and ``x1``
    in place; a known input ``x`` is used instead of its reconstruction. For a coupling used as
    one block of an :class:`InvertibleSequence` (a ``backward_step``).
    """
    grad = grad_y.clone()
    with torch.enable_grad():
        if x is None:
            x = y.clone()
            grads = _coupling_step(block, x, grad)
        else:
            grads = _coupling_step(block, y, grad, known=x)
    return x, grad, grads


# --------------------------------------------------------------------------------------------
# any invertible block: its own backward step, or the inverse then one forward with grad


def _restored(rng: _RngState | None) -> contextlib.AbstractContextManager:
    return rng.restored() if rng is not None else contextlib.nullcontext()


def block_backward_step(
    block: nn.Module,
    y: torch.Tensor,
    grad_y: torch.Tensor,
    x: torch.Tensor | None = None,
    rng: _RngState | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """One block of a memory-saving backward: ``(x, dL/dx, grads of the block's parameters)``.

    Uses ``block.backward_step(y, grad_y, x)`` where the block has one (a fused reconstruction
    and differentiation, e.g. the hybrid block's two phases); otherwise reconstructs ``x =
    block.inverse(y)`` without grad (unless ``x``, the known input, is given), recomputes
    ``block(x)`` once with grad and differentiates it with :func:`torch.autograd.grad`.

    Args:
        block: a module with ``inverse`` (or ``backward_step``).
        y: the block's output, ``(B, C, *spatial)``.
        grad_y: ``dL/dy``, the shape of ``y``.
        x: the block's input if known (then not reconstructed).
        rng: the RNG state before the block's forward, restored for the inverse and for the
            recomputation (``None``: the current RNG).

    Returns:
        the (reconstructed) input, its gradient, and the gradients of the block's trainable
        parameters in ``block.parameters()`` order (``None`` for unused ones).
    """
    step = getattr(block, "backward_step", None)
    if step is not None:
        with _restored(rng):
            return step(y, grad_y, x)
    params = [p for p in block.parameters() if p.requires_grad]
    if x is None:
        with torch.no_grad(), _restored(rng):
            x = block.inverse(y)
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad(), _restored(rng):
        out = block(leaf)
    grads = torch.autograd.grad(out, [leaf, *params], grad_y, allow_unused=True)
    grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x)
    return x, grad_x, list(grads[1:])


# --------------------------------------------------------------------------------------------
# the engine: steps, and the one Function that drives any chain of them

ChainState = list[torch.Tensor]  # what the engine hands a Step: mutable, the step may free it


class Step:
    """One block of a reversible chain, as the memory-saving engine (:func:`run_chain`) runs it.

    A chain's state is a list of tensors (one tensor for couplings and invertible blocks, the
    pair ``(Y_{j-1}, Y_j)`` for the leapfrog stack of :mod:`revseg.nn.leapfrog`). A step object
    is made per forward call and keeps what its backward must reproduce (RNG states, the number
    of slabs).

    Subclasses implement:

    * :meth:`forward` ``(state) -> state``, without grad inside the engine's forward. A step
      with ``writes_state`` may overwrite the state it receives: the engine hands it a state of
      its own (a contiguous copy of the chain's input, where needed).
    * :meth:`backward` ``(state, grads) -> param grads``: given the lists of the step's output
      state and its gradient, which it owns, replaces their contents with the step's input state
      (reconstructed) and its gradient, and returns the gradients of :meth:`params` (``None``
      for unused ones). The gradients are the engine's own (an incoming gradient that anything
      else holds is copied first), so any step may overwrite them. It runs with grad enabled,
      under :func:`recomputing`, the forward's autocast state, and with the running statistics
      of ``module``'s batch norms frozen. Holding the tensors only in the lists lets a step free
      each one after its last use.
    * :meth:`inverse` ``(state) -> state``: the input state from the output state, plain math.

    Attributes:
        module: the module whose trainable parameters receive the step's gradients (``None``
            for steps without parameters).
        writes_state: the step overwrites the states it is given in place (the engine then hands
            it a state nothing else reads: the saved output if it is the sole owner, else a copy).
    """

    module: nn.Module | None = None
    writes_state: bool = False

    def params(self) -> list[nn.Parameter]:
        """The trainable parameters whose gradients :meth:`backward` returns, in its order."""
        if self.module is None:
            return []
        return [p for p in self.module.parameters() if p.requires_grad]

    def forward(self, state: ChainState) -> ChainState:
        raise NotImplementedError

    def backward(self, state: ChainState, grads: ChainState) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def inverse(self, state: ChainState) -> ChainState:
        raise NotImplementedError


class CouplingStep(Step):
    """An :class:`AdditiveCoupling` stepped in place: the forward adds ``F`` and ``G`` into the
    halves of the state, the backward evaluates ``G(y1)`` and ``F(x2)`` once each, rebuilding the
    input in the output's storage and accumulating the input gradient in the incoming one's
    (:func:`_coupling_step`); GN -> LReLU -> Conv units take the fused half step, in ``chunks``
    slabs (resolved per call at the block's half-state, see
    :func:`~revseg.nn.fused_step.resolve_chunks`)."""

    writes_state = True

    def __init__(
        self, block: AdditiveCoupling, preserve_rng_state: bool, chunks: int | str | None = None
    ) -> None:
        self.module = block
        self.preserve_rng_state = preserve_rng_state
        self.chunks = chunks
        self.rngs: list[_RngState | None] = [None, None]

    def params(self) -> list[nn.Parameter]:
        """F's trainable parameters, then G's."""
        return [
            p for fn in (self.module.f, self.module.g) for p in fn.parameters() if p.requires_grad
        ]

    def forward(self, state: ChainState) -> ChainState:
        block = self.module
        y = state[0]
        y1, y2 = block.split(y)
        self.chunks = fused_step.resolve_chunks(self.chunks, y1)
        for i, (fn, inp, out) in enumerate(((block.f, y2, y1), (block.g, y1, y2))):
            if self.preserve_rng_state:
                self.rngs[i] = _RngState(y.device)
            _add_forward(fn, inp, out, self.chunks)
        return state

    def backward(self, state: ChainState, grads: ChainState) -> list[torch.Tensor | None]:
        rng_f, rng_g = self.rngs
        return _coupling_step(self.module, state[0], grads[0], None, rng_f, rng_g, self.chunks)

    def inverse(self, state: ChainState) -> ChainState:
        return [self.module.inverse(state[0])]


class BlockStep(Step):
    """Any invertible block: its own ``backward_step`` where it has one, else the inverse and
    one recomputation with grad (:func:`block_backward_step`)."""

    def __init__(self, block: nn.Module, preserve_rng_state: bool) -> None:
        self.module = block
        self.preserve_rng_state = preserve_rng_state
        self.rng: _RngState | None = None

    def forward(self, state: ChainState) -> ChainState:
        if self.preserve_rng_state:
            self.rng = _RngState(state[0].device)
        return [self.module(state.pop())]

    def backward(self, state: ChainState, grads: ChainState) -> list[torch.Tensor | None]:
        x, grad_x, param_grads = block_backward_step(
            self.module, state.pop(), grads.pop(), rng=self.rng
        )
        state.append(x)
        grads.append(grad_x)
        return param_grads

    def inverse(self, state: ChainState) -> ChainState:
        return [self.module.inverse(state[0])]


def _storages(tensors: Sequence[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


class _ChainFunction(torch.autograd.Function):
    """Runs a chain of :class:`Step` objects keeping only the chain's output state.

    Inputs: the steps, the number of state tensors, the state tensors, then every trainable
    parameter of the steps in step order (so that their gradients are returned through
    autograd, and DistributedDataParallel's hooks fire as usual). Outputs: the final state.

    Backward walks the steps from the end. Where a step writes states in place, the saved output
    is used as its buffer when nothing else holds it (else one copy is made); the incoming
    gradient is used as the gradient buffer when no Python object or other tensor refers to it
    (a gradient the user passed to ``backward`` is copied and left unchanged). Reusing the saved
    output makes a second backward through the same graph (``retain_graph=True``) raise
    autograd's "modified by an inplace operation" error instead of computing from overwritten
    values.
    """

    @staticmethod
    def forward(ctx, steps, n_state, *tensors):  # type: ignore[override]
        state = list(tensors[:n_state])
        ctx.steps = steps
        ctx.n_state = n_state
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        ctx.autocast = _AutocastState(state[0].device.type)
        _unheld_gradient_refs()  # measured once, here rather than inside a backward
        inputs = _storages(state)
        for step in steps:
            if step.writes_state and not all(
                t.is_contiguous() and t.untyped_storage().data_ptr() not in inputs for t in state
            ):
                state = [t.clone(memory_format=torch.contiguous_format) for t in state]
            state = step.forward(state)
        ctx.save_for_backward(*state)
        return tuple(state) if len(state) > 1 else state[0]

    @staticmethod
    def backward(ctx, *grad_out):  # type: ignore[override]
        refs = [_python_refs(g) for g in grad_out]  # first, as in _GradientProbe.backward
        with record_function("reversible chain: backward"):
            state = [t.detach() for t in ctx.saved_tensors]
            steps = ctx.steps
            if any(step.writes_state for step in steps):
                state = [t if _sole_owner(t) else t.clone() for t in state]
            grads = [
                torch.zeros_like(t) if g is None else g if _gradient_is_ours(g, r) else g.clone()
                for t, g, r in zip(state, grad_out, refs)
            ]
            del grad_out
            param_grads: list[list[torch.Tensor | None]] = []  # per step, last step first
            for step in reversed(steps):
                module = [step.module] if step.module is not None else []
                # gradients are taken inside: the graph saved the BatchNorm buffers the exit
                # restores
                with (
                    torch.enable_grad(),
                    recomputing(),
                    ctx.autocast.context(),
                    _frozen_batchnorm_stats(module),
                ):
                    param_grads.append(step.backward(state, grads))
            del state
            n = ctx.n_state
            grad_in = [
                g if need else None for g, need in zip(grads, ctx.needs_input_grad[2 : 2 + n])
            ]
            del grads
            ordered = [g for step_grads in reversed(param_grads) for g in step_grads]
            return (None, None, *grad_in, *ordered)


@torch.compiler.disable
def run_chain(steps: Sequence[Step], *state: torch.Tensor) -> torch.Tensor | tuple:
    """The memory-saving forward of a chain: ``steps`` applied to ``state`` in one
    :class:`_ChainFunction` that keeps only the final state for backward (the tensor, or the
    tuple of tensors of a state with several).

    Eager under ``torch.compile`` (the compiled graphs end before the chain and start after it):
    the backward recomputes the forward eagerly, so a compiled forward would differ from its
    recomputation (inductor's random numbers differ from eager ones: a dropout in F or G
    reconstructed with a relative error of 1.05; its rounding differs too), would keep every
    slab's output alive, and would run the gradient probe inside a graph."""
    params = [p for step in steps for p in step.params()]
    return _ChainFunction.apply(tuple(steps), len(state), *state, *params)


class ReversibleChain(nn.Module):
    """What the sequences share: ``blocks`` applied in order, the ``memory_saving`` switch,
    ``preserve_rng_state``, :meth:`steps` for the engine and the block-by-block :meth:`inverse`.
    :func:`reversible_parts` finds a model's chains (and the leapfrog stack) by their
    ``inverse`` and ``memory_saving``."""

    blocks: nn.ModuleList
    memory_saving: bool
    preserve_rng_state: bool

    def steps(self) -> list[Step]:
        """The engine's steps, one per block, made fresh per call (steps keep per-call state)."""
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Reconstruct the sequence input from its output, block by block."""
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y


class ReversibleSequence(ReversibleChain):
    """A chain of reversible coupling blocks whose activation memory does not grow with depth.

    Args:
        blocks: the :class:`AdditiveCoupling` blocks, applied in order.
        memory_saving: ``True`` keeps only the sequence output for backward and reconstructs the
            blocks' inputs on the way back (:class:`CouplingStep` per block); ``False`` is plain
            autograd on the same modules (same parameters, outputs and gradients), the reference
            in tests and benchmarks.
        preserve_rng_state: store and restore the RNG state so that recomputation sees the same
            random numbers (needed for dropout inside F or G; costs a small copy per call).
            ``True`` by default, as in :func:`torch.utils.checkpoint.checkpoint`: the models,
            whose blocks hold no random ops, turn it off (``model.preserve_rng_state``).
        chunks: with memory saving, F and G units of GN -> LReLU -> Conv are computed (forward
            and backward) in this many slabs along the first spatial axis, so a half step's
            workspace is a fraction of a half-state: ``None``/``1`` (whole volume), an int, or
            ``"auto"`` (slabs of at most :data:`~revseg.nn.fused_step.SLAB_BYTES` of a
            half-state). Results equal the unchunked ones to rounding.
        state_dtype: under autocast, the dtype of the states between blocks (and of their
            gradients): ``"float32"`` (exact inverses) or ``"autocast"`` (half the bytes, inverses
            exact to the low precision's rounding only); see :func:`states_in`.

    Shapes: ``(B, C, *spatial) -> (B, C, *spatial)`` with ``C`` even.

    Raises:
        ValueError: for no blocks or a bad ``chunks``.
        TypeError: for blocks that are not couplings.
    """

    def __init__(
        self,
        blocks: Sequence[AdditiveCoupling],
        memory_saving: bool = True,
        preserve_rng_state: bool = True,
        chunks: int | str | None = None,
        state_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.state_dtype = check_state_dtype(state_dtype)
        if len(blocks) == 0:
            raise ValueError("ReversibleSequence needs at least one block")
        if not all(isinstance(b, AdditiveCoupling) for b in blocks):
            raise TypeError("ReversibleSequence blocks must be AdditiveCoupling modules")
        if chunks is not None and chunks != "auto":
            fused_step.resolve_chunks(chunks, torch.empty(1, 1, 1))  # check the value early
        self.blocks = nn.ModuleList(blocks)
        self.memory_saving = memory_saving
        self.preserve_rng_state = preserve_rng_state
        self.chunks = chunks

    def steps(self) -> list[Step]:
        """One :class:`CouplingStep` per block (fresh per call: steps keep per-call state)."""
        return [CouplingStep(b, self.preserve_rng_state, self.chunks) for b in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mixed precision: F and G compute in low precision, but the states they are added to
        # stay float32, so the additive inverse loses nothing to low-precision rounding
        x = states_in(x, self.state_dtype)
        if self.memory_saving and torch.is_grad_enabled():
            return run_chain(self.steps(), x)
        for block in self.blocks:
            x = block(x)
        return x


def invertible_steps(blocks: Sequence[nn.Module], preserve_rng_state: bool) -> list[Step]:
    """The engine's steps for invertible ``blocks``: a :class:`BlockStep` per block."""
    return [BlockStep(block, preserve_rng_state) for block in blocks]


def apply_invertible_sequence(
    x: torch.Tensor,
    blocks: Sequence[nn.Module],
    memory_saving: bool = True,
    preserve_rng_state: bool = True,
) -> torch.Tensor:
    """``blocks`` applied to ``x`` in order, as :class:`InvertibleSequence` runs them.

    States are float32 under autocast; with ``memory_saving`` and grad enabled the engine
    (:func:`run_chain`) keeps only the output, else plain autograd. For modules that hold their
    blocks under another name (:class:`~revseg.nn.invertible.LayerwiseInvertibleChain` keeps
    ``layers``), so that no module is registered twice.
    """
    x = states_in(x)
    if memory_saving and torch.is_grad_enabled():
        return run_chain(invertible_steps(blocks, preserve_rng_state), x)
    for block in blocks:
        x = block(x)
    return x


class InvertibleSequence(ReversibleChain):
    """A chain of invertible blocks whose activation memory does not grow with depth.

    Any module with a ``forward`` and an ``inverse`` (``block.inverse(block(x)) ~ x``) can be
    wrapped: additive couplings, hybrid blocks, invertible pooling, invertible residual blocks
    ``y = x + g(x)`` with a fixed-point inverse (:mod:`revseg.models.revup_unet`). With
    ``memory_saving=True`` the engine keeps only the sequence output and steps each block back
    with a :class:`BlockStep`: the block's own ``backward_step(y, grad_y, x=None) -> (x, grad_x,
    param_grads)`` where it has one (the hybrid block's two-phase backward), else
    ``block.inverse`` and one recomputation with grad (for plain couplings,
    :class:`ReversibleSequence` is the faster path, whose backward needs one forward only).
    Gradients are exact up to the inverse's error: rounding for exact inverses, the fixed-point
    residual for iterative ones.

    Args:
        blocks: the invertible modules, applied in order; each maps ``(B, C, *spatial)`` to a
            state of the same number of elements.
        memory_saving: ``True`` keeps only the sequence output for backward; ``False`` is plain
            autograd on the same modules (same parameters, outputs and, for exact inverses,
            gradients), the reference in tests and benchmarks.
        preserve_rng_state: store the RNG state before each block and restore it for the inverse
            and the recomputation (needed for random ops such as dropout). ``True`` by default, as
            in :class:`ReversibleSequence` and :func:`torch.utils.checkpoint.checkpoint`: the
            models, whose blocks hold no random ops, turn it off.

    Raises:
        ValueError: for an empty ``blocks``.
        TypeError: for a block without a callable ``inverse``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        memory_saving: bool = True,
        preserve_rng_state: bool = True,
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("InvertibleSequence needs at least one block")
        for block in blocks:
            if not callable(getattr(block, "inverse", None)):
                raise TypeError(
                    f"InvertibleSequence blocks need an inverse method, {type(block).__name__} "
                    "has none"
                )
        self.blocks = nn.ModuleList(blocks)
        self.memory_saving = memory_saving
        self.preserve_rng_state = preserve_rng_state

    def steps(self) -> list[Step]:
        """One :class:`BlockStep` per block (fresh per call)."""
        return invertible_steps(self.blocks, self.preserve_rng_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` through the blocks (the same shape unless a block pools)."""
        return apply_invertible_sequence(
            x, self.blocks, self.memory_saving, self.preserve_rng_state
        )


# --------------------------------------------------------------------------------------------
# finding the reversible parts of a model


def is_reversible_part(module: nn.Module) -> bool:
    """``True`` for a reversible part: a module with a callable ``inverse`` and a
    ``memory_saving`` switch (:class:`ReversibleSequence`, :class:`InvertibleSequence`,
    :class:`~revseg.nn.leapfrog.LeapfrogStack`). Invertible layers without the switch (pooling,
    batch norm, couplings) are pieces of parts, not parts."""
    return callable(getattr(module, "inverse", None)) and hasattr(module, "memory_saving")


def reversible_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost reversible parts of ``model`` as ``(name, module)``, in module order.

    The one way the planner, the reconstruction monitor, the models' ``memory_saving`` switch
    and the tests find them; parts nested in a part (the layer-wise chains inside hybrid blocks)
    belong to it.
    """
    parts: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(outer == "" or name.startswith(f"{outer}.") for outer, _ in parts):
            continue
        if is_reversible_part(module):
            parts.append((name, module))
    return parts
