"""Tests of revseg.memory.measure: the CPU tensor tracker, the CUDA path and SavedTensorsCounter."""

import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from revseg.memory import (
    PeakMemoryMeter,
    SavedTensorsCounter,
    format_bytes,
    live_tensor_bytes,
    rss_peak_bytes,
)

N = 10_000  # elements of the test tensors: 40 kB in float32


@pytest.fixture
def meter():
    return PeakMemoryMeter(torch.device("cpu"))


def test_method_and_bad_device():
    assert PeakMemoryMeter("cpu").method == "cpu_tensor_tracker"
    assert PeakMemoryMeter("cuda:0").method == "cuda_max_memory_allocated"
    with pytest.raises(ValueError, match="meta"):
        PeakMemoryMeter("meta")


def test_known_allocation_raises_peak_by_its_nbytes(meter):
    with meter.measure() as m:
        x = torch.empty(N)
    assert m.peak_bytes == m.end_bytes == x.nbytes == 4 * N
    with meter.measure() as m:
        y = torch.empty(N, dtype=torch.float64)
    assert m.peak_bytes == y.nbytes


def test_peak_is_max_not_sum(meter):
    with meter.measure() as m:
        a = torch.ones(N)
        del a
        b = torch.ones(3 * N)
    assert m.peak_bytes == m.end_bytes == b.nbytes
    with meter.measure() as m:
        a = torch.ones(N)
        b = torch.ones(3 * N)
    assert m.peak_bytes == a.nbytes + b.nbytes


def test_views_and_inplace_add_nothing(meter):
    with meter.measure() as m:
        x = torch.zeros(N)
        v = x[10:].view(-1, 10)
        x.add_(1)
        v.mul_(2)
        x.view(100, -1).t_().clamp_(max=1.0)
        torch.relu_(x)
    assert m.peak_bytes == x.nbytes


def test_resize_is_followed(meter):
    with meter.measure() as m:
        x = torch.empty(0)
        x.resize_(2 * N)
    assert m.peak_bytes == x.nbytes == 8 * N


def test_static_baseline_counted_once(meter):
    p = torch.randn(N)
    q = torch.randn(2 * N)
    static = [[p, p[10:]], {"state": {"q": q, "step": 3}}, [p.view(100, -1)]]
    with meter.measure(static=static) as m:
        p.mul_(2)  # touches a static storage: no new bytes
        y = p * 2
    assert m.baseline_bytes == p.nbytes + q.nbytes
    assert m.peak_bytes == p.nbytes + q.nbytes + y.nbytes


def test_untracked_preexisting_storage_counted_since_entry(meter):
    q = torch.zeros(N)
    with meter.measure() as m:
        a = torch.ones(2 * N)
        del a
        q.add_(1)  # q was live during `a`, so the peak is a + q, not max(a, q)
    assert m.peak_bytes == 3 * 4 * N


def test_nested_measure_raises_and_meter_recovers(meter):
    with meter.measure(), pytest.raises(RuntimeError, match="nested"):
        with meter.measure():
            pass
    with pytest.raises(KeyError), meter.measure():
        raise KeyError("boom")
    with meter.measure() as m:
        torch.empty(N)
    assert m.peak_bytes == 4 * N


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.LeakyReLU(),
        nn.Conv3d(8, 8, 3, padding=1),
        nn.LeakyReLU(),
        nn.Conv3d(8, 2, 1),
    )


def test_backward_and_optimizer_memory_is_seen(meter):
    model = _conv_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(1, 2, 12, 12, 12)
    static = [list(model.parameters()), x]
    with torch.no_grad(), meter.measure(static=static) as fwd:
        model(x)
    with meter.measure(static=static) as step:
        model(x).square().mean().backward()
        opt.step()
    base = live_tensor_bytes(static)
    assert fwd.baseline_bytes == step.baseline_bytes == base
    # the step holds at least every activation, the gradients and Adam's two moments
    activation = 8 * 12**3 * 4
    assert step.peak_bytes > fwd.peak_bytes
    assert step.peak_bytes >= base + 4 * activation + 3 * live_tensor_bytes(model.parameters())
    # every activation is freed by the end: what is left is parameters, batch, grads and
    # Adam's state (two moments and a float32 step per parameter)
    assert fwd.end_bytes == base
    assert step.end_bytes == base + 3 * live_tensor_bytes(model.parameters()) + 4 * len(opt.state)
    assert step.end_bytes == live_tensor_bytes(
        [static, [p.grad for p in model.parameters()], opt.state]
    )


class _SinhChainSaving(torch.autograd.Function):
    """``y = sinh^k(x)`` saving every block input for backward (plain autograd's behaviour)."""

    @staticmethod
    def forward(ctx, x, k):
        xs = [x]
        for _ in range(k):
            xs.append(torch.sinh(xs[-1]))
        ctx.save_for_backward(*xs[:-1])
        return xs[-1]

    @staticmethod
    def backward(ctx, grad):
        for x in reversed(ctx.saved_tensors):
            grad = grad * torch.cosh(x)
        return grad, None


class _SinhChainFreeing(torch.autograd.Function):
    """Same function, keeping only the output and rebuilding inputs with ``asinh`` in backward."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        y = x
        for _ in range(k):
            y = torch.sinh(y)  # the previous block input is freed here
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        for _ in range(ctx.k):
            x = torch.asinh(y)
            grad = grad * torch.cosh(x)
            y = x
        return grad, None


def test_freeing_custom_function_has_lower_peak(meter):
    peaks, grads = {}, {}
    for fn in (_SinhChainSaving, _SinhChainFreeing):
        for k in (4, 16):
            x0 = 0.1 * torch.randn(N, generator=torch.Generator().manual_seed(0))
            x0.requires_grad_()
            with meter.measure(static=[x0]) as m:
                fn.apply(x0 * 1, k).sum().backward()
            peaks[fn, k], grads[fn, k] = m.peak_bytes, x0.grad
    for k in (4, 16):
        torch.testing.assert_close(grads[_SinhChainSaving, k], grads[_SinhChainFreeing, k])
    tensor = 4 * N
    # saving keeps all k block inputs (the first is x0 * 1) besides x0; freeing is O(1) in k
    assert peaks[_SinhChainSaving, 16] - peaks[_SinhChainSaving, 4] == 12 * tensor
    assert peaks[_SinhChainSaving, 16] >= 17 * tensor
    assert peaks[_SinhChainFreeing, 16] == peaks[_SinhChainFreeing, 4] <= 8 * tensor


def test_rss_peak_reported_on_linux(meter):
    with meter.measure() as m:
        big = torch.ones(16 * 2**20)  # 64 MiB, touched
        del big
    if sys.platform.startswith("linux"):
        assert m.rss_peak_bytes is not None and m.rss_peak_bytes >= 64 * 2**20
        assert rss_peak_bytes() >= m.rss_peak_bytes - 2**20
    else:
        assert m.rss_peak_bytes is None


def _linear_chain(n: int, width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def test_saved_tensors_grow_with_depth():
    x = torch.randn(32, 64)
    saved = []
    for n in (1, 2, 4, 8):
        chain = _linear_chain(n)
        with SavedTensorsCounter(exclude=chain.parameters()) as c:
            chain(x).sum()
        saved.append(c.bytes)
        assert c.count == n and c.bytes == n * x.nbytes  # each layer keeps its input
        with SavedTensorsCounter() as c_all:
            chain(x).sum()
        # x needs no grad, so the first layer need not keep its weight; the others do
        assert c_all.bytes == c.bytes + sum(layer.weight.nbytes for layer in chain[1:])
    assert saved == sorted(saved) and saved[0] < saved[-1]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_chain_saves_less(use_reentrant):
    chain, x = _linear_chain(8), torch.randn(32, 64, requires_grad=True)
    with SavedTensorsCounter(exclude=chain.parameters()) as plain:
        chain(x).sum()
    with SavedTensorsCounter(exclude=chain.parameters()) as ckpt:
        checkpoint(chain, x, use_reentrant=use_reentrant).sum()
    assert plain.bytes == 8 * x.nbytes
    assert ckpt.bytes <= x.nbytes < plain.bytes


def test_custom_function_save_for_backward_is_counted():
    x = torch.randn(N, requires_grad=True)
    with SavedTensorsCounter(exclude=[x]) as c_ex:
        _SinhChainFreeing.apply(x, 3)
    with SavedTensorsCounter() as c:
        _SinhChainSaving.apply(x, 3)
    assert (c_ex.count, c_ex.bytes) == (1, 4 * N)  # only the output
    assert (c.count, c.bytes) == (3, 3 * 4 * N)  # the three block inputs, x included


def test_live_tensor_bytes_and_format_bytes():
    a = torch.zeros(N)
    assert (
        live_tensor_bytes([a, a[5:], {"m": [a.t()]}, torch.zeros(3, dtype=torch.int8)]) == 4 * N + 3
    )
    assert live_tensor_bytes([]) == 0
    assert format_bytes(512) == "512 B"
    assert format_bytes(12_897_484) == "12.3 MiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(-2048) == "-2.0 KiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_matches_allocation():
    meter = PeakMemoryMeter(torch.device("cuda"))
    keep = torch.empty(2**20, device="cuda")
    with meter.measure(static=[keep]) as m:
        a = torch.empty(2**20, device="cuda")
        del a
        b = torch.empty(2**21, device="cuda")
    assert m.method == "cuda_max_memory_allocated"
    assert m.baseline_bytes >= keep.nbytes
    assert m.peak_bytes == m.baseline_bytes + b.nbytes


def test_cuda_reports_the_reserved_peak(monkeypatch):
    # what decides an out-of-memory error is the allocator's reserve, reported beside the peak
    calls = []
    fake = {
        "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: calls.append("reset"),
        "memory_allocated": lambda device=None: 100,
        "max_memory_allocated": lambda device=None: 300,
        "max_memory_reserved": lambda device=None: 512,
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    with PeakMemoryMeter("cuda").measure() as m:
        pass
    assert calls == ["reset"]
    assert (m.baseline_bytes, m.peak_bytes, m.reserved_bytes) == (100, 300, 512)
    with PeakMemoryMeter("cpu").measure() as m:
        pass
    assert m.reserved_bytes is None
