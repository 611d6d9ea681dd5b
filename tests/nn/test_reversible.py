"""The reversible core: exact inverses, exact gradients, O(1) saved memory, autograd-only grads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import rel_err
from revseg.nn.invertible import InvertibleBatchNorm3d
from revseg.nn.reversible import (
    AdditiveCoupling,
    InvertibleSequence,
    ReversibleSequence,
    Step,
    is_recomputing,
    run_chain,
)


class CountingConv(nn.Module):
    """GN-LReLU-Conv with an optional dropout / BatchNorm, counting its calls."""

    def __init__(self, channels: int, dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm3d(channels) if batchnorm else nn.GroupNorm(2, channels)
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.drop(self.conv(torch.nn.functional.leaky_relu(self.norm(x))))


def make_sequence(
    depth: int, channels: int = 8, memory_saving: bool = True, **kwargs
) -> ReversibleSequence:
    half = channels // 2
    preserve = kwargs.pop("preserve_rng_state", True)
    blocks = [
        AdditiveCoupling(CountingConv(half, **kwargs), CountingConv(half, **kwargs))
        for _ in range(depth)
    ]
    return ReversibleSequence(blocks, memory_saving=memory_saving, preserve_rng_state=preserve)


def grads_of(
    seq: nn.Module, x: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_(True)
    seq.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    # a nonlinear loss so that the output gradient is not constant
    y = seq(x)
    (y.pow(2).sum() + y.sin().sum()).backward()
    return y.detach(), [p.grad.clone() for p in seq.parameters()], x.grad.clone()


def test_coupling_inverse_is_exact():
    torch.manual_seed(0)
    block = AdditiveCoupling(CountingConv(4), CountingConv(4)).double()
    x = torch.randn(2, 8, 6, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(block.inverse(block(x)), x) < 1e-12
        assert rel_err(block(block.inverse(x)), x) < 1e-12


def test_sequence_inverse_is_exact():
    torch.manual_seed(0)
    seq = make_sequence(4).double()
    x = torch.randn(2, 8, 6, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(seq.inverse(seq(x)), x) < 1e-12


def test_dropout_recomputation_sees_the_same_random_numbers():
    torch.manual_seed(0)
    saving = make_sequence(2, dropout=0.5).double()
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(1, 8, 4, 4, 4, dtype=torch.float64)
    y1, g1, gx1 = grads_of(saving, x, seed=7)
    y2, g2, gx2 = grads_of(plain, x, seed=7)
    assert torch.equal(y1, y2)
    assert rel_err(gx1, gx2) < 1e-6
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-6
    # control: without restoring the RNG, recomputation draws other masks and gradients differ
    careless = copy.deepcopy(saving)
    careless.preserve_rng_state = False
    _, g3, _ = grads_of(careless, x, seed=7)
    assert max(rel_err(a, b) for a, b in zip(g3, g2)) > 1e-2


@pytest.mark.parametrize("sequence", [ReversibleSequence, InvertibleSequence])
def test_invertible_batchnorm_in_couplings_updated_once(sequence):
    """Couplings whose F and G hold revseg's invertible batch norm (a ``stats_frozen`` flag, not
    a torch ``_BatchNorm``): neither sequence's backward may update its running statistics (it
    did twice in ReversibleSequence and three times in InvertibleSequence before the flag was
    set)."""
    torch.manual_seed(0)

    def half() -> nn.Module:
        # no conv bias: a batch norm follows, so its gradient would be rounding noise
        return nn.Sequential(nn.Conv3d(4, 4, 3, padding=1, bias=False), InvertibleBatchNorm3d(4))

    saving = sequence([AdditiveCoupling(half(), half()) for _ in range(2)]).double()
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    _, g1, gx1 = grads_of(saving, x)
    _, g2, gx2 = grads_of(plain, x)
    assert len(g1) == 2 * 2 * 3 and rel_err(gx1, gx2) < 1e-10
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-10
    bns = [m for m in saving.modules() if isinstance(m, InvertibleBatchNorm3d)]
    assert [int(bn.num_batches_tracked) for bn in bns] == [1] * 4
    assert not any(bn.stats_frozen for bn in bns)
    for (name, a), (_, b) in zip(saving.named_buffers(), plain.named_buffers()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), name


def test_exactly_one_extra_forward_of_f_and_g_per_block():
    seq = make_sequence(3)
    x = torch.randn(1, 8, 4, 4, 4, requires_grad=True)
    seq(x).sum().backward()
    assert [m.calls for m in seq.modules() if isinstance(m, CountingConv)] == [2] * 6
    plain = make_sequence(3, memory_saving=False)
    plain(x).sum().backward()
    assert [m.calls for m in plain.modules() if isinstance(m, CountingConv)] == [1] * 6


def saved_bytes(seq: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique non-parameter storages autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in seq.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        seq(x)
    return sum(seen.values())


def test_bad_input_is_reported():
    seq = make_sequence(1)
    with pytest.raises(ValueError, match="even size"):
        seq.blocks[0](torch.randn(1, 7, 4, 4, 4))
    with pytest.raises(ValueError, match="at least one block"):
        ReversibleSequence([])


# --------------------------------------------------------------------------------------------
# InvertibleSequence: any module with an inverse


class ChannelAffine(nn.Module):
    """Exactly invertible toy block ``y = x * exp(a) + b`` per channel, counting calls."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(0.3 * torch.randn(1, channels, 1, 1, 1))
        self.shift = nn.Parameter(torch.randn(1, channels, 1, 1, 1))
        self.calls: list[tuple[str, bool]] = []  # (method, is_recomputing())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(("forward", is_recomputing()))
        return x * self.log_scale.exp() + self.shift

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(("inverse", is_recomputing()))
        return (y - self.shift) * (-self.log_scale).exp()


def make_invertible(
    depth: int,
    channels: int = 8,
    memory_saving: bool = True,
    preserve_rng_state: bool = False,
    **kw,
) -> InvertibleSequence:
    """Alternating additive couplings (convolutions, optional dropout / BatchNorm) and affines."""
    blocks: list[nn.Module] = []
    for _ in range(depth):
        half = channels // 2
        blocks.append(AdditiveCoupling(CountingConv(half, **kw), CountingConv(half, **kw)))
        blocks.append(ChannelAffine(channels))
    return InvertibleSequence(blocks, memory_saving, preserve_rng_state)


def test_invertible_sequence_inverse_is_exact():
    torch.manual_seed(0)
    seq = make_invertible(3).double()
    x = torch.randn(2, 8, 5, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        y = seq(x)
        assert rel_err(y, x) > 0.1  # the blocks do change the input
        assert rel_err(seq.inverse(y), x) < 1e-12


def test_invertible_backward_is_one_inverse_and_one_forward_per_block_under_recomputing():
    seq = make_invertible(2)
    seq(torch.randn(1, 8, 4, 4, 4, requires_grad=True)).sum().backward()
    convs = [m for m in seq.modules() if isinstance(m, CountingConv)]
    assert [m.calls for m in convs] == [3] * 4  # forward, inverse, recomputation
    affines = [m for m in seq.modules() if isinstance(m, ChannelAffine)]
    expected = [("forward", False), ("inverse", True), ("forward", True)]
    assert all(m.calls == expected for m in affines)
    assert not is_recomputing()


def test_invertible_dropout_recomputation_sees_the_same_random_numbers():
    torch.manual_seed(0)
    saving = make_invertible(2, preserve_rng_state=True, dropout=0.5).double()
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(1, 8, 4, 4, 4, dtype=torch.float64)
    # dropout in G makes the coupling's inverse inexact: only F drops here
    for block in saving.blocks[::2]:
        block.g.drop = nn.Identity()
    for block in plain.blocks[::2]:
        block.g.drop = nn.Identity()
    y1, g1, gx1 = grads_of(saving, x, seed=3)
    y2, g2, gx2 = grads_of(plain, x, seed=3)
    assert torch.equal(y1, y2)
    assert rel_err(gx1, gx2) < 1e-10
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-10
    careless = copy.deepcopy(saving)
    careless.preserve_rng_state = False
    _, g3, _ = grads_of(careless, x, seed=3)
    assert max(rel_err(a, b) for a, b in zip(g3, g2)) > 1e-2


def test_invertible_sequence_rejects_bad_blocks():
    with pytest.raises(ValueError, match="at least one block"):
        InvertibleSequence([])
    with pytest.raises(TypeError, match="Conv3d has none"):
        InvertibleSequence([nn.Conv3d(2, 2, 1)])


def test_coupling_recomputation_does_not_advance_a_power_iteration():
    """A coupling whose F and G update state in a training forward (RevUp's spectral norm): the
    memory-saving backward recomputes them under ``recomputing()``, so the state moves once per
    step and the gradients equal plain autograd."""
    from revseg.nn.lipschitz import SpectralNormConv3d

    torch.manual_seed(0)
    blocks = [
        AdditiveCoupling(SpectralNormConv3d(2, 2), SpectralNormConv3d(2, 2)) for _ in range(2)
    ]
    saving = ReversibleSequence(blocks, memory_saving=True).double().train()
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(1, 4, 6, 6, 6, dtype=torch.float64)
    results = []
    for seq in (saving, plain):
        out = seq(x)
        after_forward = [b.clone() for b in seq.buffers()]
        out.square().sum().backward()
        assert all(torch.equal(a, b) for a, b in zip(after_forward, seq.buffers()))
        results.append(([b.clone() for b in seq.buffers()], [p.grad for p in seq.parameters()]))
    (buffers1, grads1), (buffers2, grads2) = results
    assert all(torch.equal(a, b) for a, b in zip(buffers1, buffers2))
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# the one engine


class ScaleShift(nn.Module):
    """A toy two-state block for a custom step: ``(a, b) -> (b, a * exp(s) + b)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(-0.3, 0.3, channels).view(1, channels, 1, 1, 1))


class ScaleShiftStep(Step):
    """What a new reversible design writes: forward, inverse and a backward step."""

    def __init__(self, block: ScaleShift) -> None:
        self.module = block

    def forward(self, state):
        a, b = state
        return [b, a * self.module.s.exp() + b]

    def inverse(self, state):
        b, c = state
        return [(c - b) * (-self.module.s).exp(), b]

    def backward(self, state, grads):
        x = self.inverse(state)
        state.clear()
        leaves = [t.detach().requires_grad_(True) for t in x]
        out = self.forward(leaves)
        got = torch.autograd.grad(out, [*leaves, self.module.s], grads)
        state[:] = x
        grads[:] = got[:2]
        return [got[2]]


def test_every_chain_runs_on_the_one_engine():
    from revseg.models.hyperbolic_net import HyperbolicNet
    from revseg.nn.reversible import _ChainFunction

    x = torch.randn(1, 8, 4, 4, 4)
    seq = make_sequence(2)
    inv = InvertibleSequence([InvertibleBatchNorm3d(8)])
    stack = HyperbolicNet(3, 1, 6, layers=[1, 1, 1], rank=2).stack
    y0 = torch.randn(1, 6, 4, 4, 4)
    for out in (seq(x), inv(x), stack(y0)):
        node = out.grad_fn
        while node is not None and "ChainFunction" not in type(node).__name__:
            node = node.next_functions[0][0]
        assert node is not None and type(node).__name__ == f"{_ChainFunction.__name__}Backward"


def test_a_custom_step_gets_exact_gradients_and_an_unused_output_costs_nothing():
    torch.manual_seed(0)
    blocks = [ScaleShift(4).double() for _ in range(3)]
    a = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def plain():
        state = [a, b]
        for block in blocks:
            state = ScaleShiftStep(block).forward(state)
        return state

    params = [blk.s for blk in blocks]
    reference = torch.autograd.grad(plain()[1].square().sum(), [a, b, *params])
    first, last = run_chain([ScaleShiftStep(blk) for blk in blocks], a, b)
    assert not first.requires_grad or first.grad_fn is last.grad_fn  # one node, two outputs
    got = torch.autograd.grad(last.square().sum(), [a, b, *params])  # `first` unused: None in
    for g, r in zip(got, reference):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# both sequences: the engine's guarantees

BOTH = pytest.mark.parametrize("make", [make_sequence, make_invertible], ids=["coupling", "any"])


@BOTH
def test_parameter_gradients_arrive_through_autograd_accumulation(make):
    """DDP relies on autograd accumulating each parameter's gradient exactly once per backward."""
    seq = make(2)
    fired: dict[int, int] = {}
    for p in seq.parameters():
        p.register_post_accumulate_grad_hook(
            lambda p: fired.__setitem__(id(p), fired.get(id(p), 0) + 1)
        )
    seq(torch.randn(1, 8, 4, 4, 4)).sum().backward()
    assert fired == {id(p): 1 for p in seq.parameters()}


@BOTH
def test_saved_memory_does_not_grow_with_depth(make):
    x = torch.randn(1, 8, 8, 8, 8, requires_grad=True)
    saving = [saved_bytes(make(d), x) for d in (1, 2, 4, 8)]
    assert saving == [x.nbytes] * 4  # only the sequence output is kept
    plain = [saved_bytes(make(d, memory_saving=False), x) for d in (1, 2, 4)]
    assert plain[0] < plain[1] < plain[2]


@BOTH
def test_batchnorm_running_stats_updated_once(make):
    torch.manual_seed(0)
    saving = make(2, batchnorm=True).double()
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    _, g1, _ = grads_of(saving, x)
    _, g2, _ = grads_of(plain, x)
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-6
    # equal up to float64 rounding (the chain runs on split halves, plain autograd on views);
    # a second update during recomputation would move running stats by ~momentum * stats
    for (name, a), (_, b) in zip(saving.named_buffers(), plain.named_buffers()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), name
    bns = [m.norm for m in saving.modules() if isinstance(m, CountingConv)]
    assert [int(bn.num_batches_tracked) for bn in bns] == [1] * 4


@BOTH
def test_frozen_parameters_and_no_grad_paths(make):
    seq = make(2)
    for p in seq.blocks[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 8, 4, 4, 4, requires_grad=True)
    seq(x).sum().backward()
    assert all(p.grad is None for p in seq.blocks[0].parameters())
    assert all(p.grad is not None for p in seq.blocks[1].parameters())
    assert x.grad is not None
    with torch.no_grad():
        assert seq(x).shape == x.shape


@BOTH
@pytest.mark.parametrize("depth", [1, 3])
def test_gradients_equal_plain_autograd(make, depth):
    torch.manual_seed(0)
    saving = make(depth).double()
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(2, 8, 6, 5, 4, dtype=torch.float64)
    y1, g1, gx1 = grads_of(saving, x)
    y2, g2, gx2 = grads_of(plain, x)
    assert torch.equal(y1, y2)
    assert rel_err(gx1, gx2) < 1e-10
    # per coupling: norm weight/bias + conv weight/bias in F and G; per affine (any): 2
    assert len(g1) == len(g2) == (8 if make is make_sequence else 8 + 2) * depth
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-10


# --------------------------------------------------------------------------------------------
# under torch.compile


class Around(nn.Module):
    """A chain with compiled work before and after it."""

    def __init__(self, seq: nn.Module) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x * 1.5).tanh()


def test_compiled_model_runs_the_chains_eagerly(monkeypatch):
    """Inductor compiles what surrounds a chain, never the chain: a compiled forward would draw
    other dropout masks than the eager recomputation (gradients off by a relative 0.4-1.0), and
    a gradient probe calibrated inside a compiled frame counted 11 references instead of 7, so
    that a gradient a hook kept was overwritten (issue 19, items 2 and 3)."""
    from revseg.nn.reversible import _GradientProbe, _unheld_gradient_refs

    monkeypatch.setattr(_GradientProbe, "refs", [])  # calibrated by the first (compiled) chain
    torch._dynamo.reset()
    torch.manual_seed(0)
    saving = make_sequence(2, dropout=0.5)
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(1, 8, 4, 4, 4)
    y = torch.compile(saving, backend="inductor")(x.clone().requires_grad_(True))
    kept = []
    y.register_hook(kept.append)  # holds dL/dy = 2 beyond the backward
    (2 * y).sum().backward()
    assert torch.equal(kept[0], torch.full_like(y, 2.0))
    calibrated = _GradientProbe.refs[:]
    monkeypatch.setattr(_GradientProbe, "refs", [])
    assert calibrated == [_unheld_gradient_refs()]  # as measured eagerly

    results = []
    for model in (torch.compile(Around(saving), backend="inductor"), Around(plain)):
        xi = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        y = model(xi)
        (y.pow(2).sum() + y.sin().sum()).backward()
        results.append((y.detach(), xi.grad, [p.grad for p in model.parameters()]))
    (y1, gx1, g1), (y2, gx2, g2) = results
    assert rel_err(y1, y2) < 1e-6  # the same masks; inductor's tanh rounds its own way
    assert rel_err(gx1, gx2) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-5
