"""The reversible engine under mixed precision: exactness with float32 states, low-precision
states, the in-place skip gradient, and fp16 overflow reaching the gradient scaler."""

import pytest
import torch

from helpers import rel_err
from revseg.memory import PeakMemoryMeter
from revseg.memory.autocast_rules import CudaAutocastRules
from revseg.models.prev_unet import PartiallyReversibleUNet
from revseg.nn.reversible import ReversibleSequence, fork, reversible_parts, states_in

TINY = dict(channels=(8, 16, 24), norm_groups=2, encoder_depth=2, decoder_depth=2)


def _net(**kw) -> PartiallyReversibleUNet:
    torch.manual_seed(0)
    return PartiallyReversibleUNet(**{**TINY, **kw})


def _grads(model, x, dtype, memory_saving: bool) -> torch.Tensor:
    model.memory_saving = memory_saving
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = model(x)
    out.float().square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_states_give_plain_autograd_gradients_under_autocast(dtype):
    """With float32 states the whole-volume memory-saving gradients equal plain autograd's under
    the same autocast (the fused step runs the ops autograd runs, in the same dtypes)."""
    model = _net()
    x = torch.randn(1, 4, 16, 16, 16)
    plain = _grads(model, x, dtype, memory_saving=False)
    saving = _grads(model, x, dtype, memory_saving=True)
    assert rel_err(saving, plain) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slabs_under_autocast_differ_by_rounding_only(dtype):
    """In slabs the normalised activation is computed as ``x * scale + shift`` and the input
    gradient by a transposed convolution: equal in float32 to rounding, but a last-bit change in
    float32 can move a value to the next bf16/fp16 step when cast for the convolution. The
    difference stays far below what the low precision itself costs against float32."""
    model = _net(chunks=3)
    x = torch.randn(1, 4, 16, 16, 16)
    plain = _grads(model, x, dtype, memory_saving=False)
    saving = _grads(model, x, dtype, memory_saving=True)
    fp32 = _grads(model, x, torch.float32, memory_saving=False)
    assert rel_err(saving, plain) < 0.25 * rel_err(plain, fp32), (
        rel_err(saving, plain),
        rel_err(plain, fp32),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_states_are_half_the_bytes_and_close_to_plain(dtype):
    model = _net(state_dtype="autocast", chunks=2)
    x = torch.randn(1, 4, 16, 16, 16)
    seen = []
    hooks = [
        seq.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        for _, seq in reversible_parts(model)
    ]
    saving = _grads(model, x, dtype, memory_saving=True)
    for h in hooks:
        h.remove()
    assert set(seen) == {dtype}
    plain = _grads(model, x, dtype, memory_saving=False)
    assert torch.isfinite(saving).all()
    # the inverses are exact to the low precision's rounding only: close, not equal
    assert rel_err(saving, plain) < (0.1 if dtype == torch.bfloat16 else 0.02)


def test_states_in_and_bad_state_dtype():
    x = torch.randn(2, 4)
    assert states_in(x, "autocast") is x  # no autocast: unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert states_in(x.bfloat16()).dtype == torch.float32
        assert states_in(x, "autocast").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="state_dtype must be one of float32, autocast"):
        ReversibleSequence([], state_dtype="half")  # the dtype is checked before the blocks


def test_fork_sums_the_two_gradients_in_place():
    """fork(x) gives the gradients of using x twice, without the third buffer autograd's own
    accumulation allocates."""
    base = torch.randn(64, 64, 64)

    def run(use_fork: bool):
        x = base.clone().requires_grad_(True)
        meter = PeakMemoryMeter("cpu")
        with meter.measure(static=[x]) as m:
            y = x * 1.0  # a non-leaf, as a U-Net level's output
            a, b = fork(y) if use_fork else (y, y)
            ((a * 2.0).sum() + (b * 3.0).sum()).backward()
        return x.grad, m.peak_bytes

    grad_fork, peak_fork = run(True)
    grad_plain, peak_plain = run(False)
    torch.testing.assert_close(grad_fork, grad_plain, rtol=0, atol=0)
    torch.testing.assert_close(grad_fork, torch.full_like(base, 5.0))
    assert peak_plain - peak_fork >= base.numel() * 4 * 0.9, (peak_plain, peak_fork)


def test_fork_leaves_a_gradient_held_elsewhere_alone():
    y = torch.randn(8, requires_grad=True)
    a, b = fork(y * 1.0)
    kept = []
    a.register_hook(lambda g: kept.append(g) or g)
    (a.sum() + (b * 2.0).sum()).backward()
    assert torch.equal(kept[0], torch.ones(8))  # not overwritten by the sum
    assert torch.equal(y.grad, torch.full((8,), 3.0))


def test_fp16_overflow_in_the_engine_reaches_the_scaler():
    """An fp16 overflow inside the memory-saving backward arrives as inf/NaN in the parameter
    gradients: GradScaler skips the step and lowers its scale; no weight becomes NaN."""
    model = _net(chunks=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x).float().square().mean()
    scaler.scale(loss).backward()
    engine_grads = [p.grad for _, seq in reversible_parts(model) for p in seq.parameters()]
    assert any(not torch.isfinite(g).all() for g in engine_grads if g is not None)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0**40
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_cuda_rules_run_group_norm_in_float32_and_pooling_in_the_input_dtype():
    x = torch.randn(1, 4, 4, 4, 4).bfloat16()
    gn = torch.nn.GroupNorm(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gn(x).dtype == torch.bfloat16  # CPU's rule
        assert torch.nn.functional.max_pool3d(x, 2).dtype == torch.float32
        with CudaAutocastRules():
            assert gn(x).dtype == torch.float32  # CUDA's
            assert torch.nn.functional.max_pool3d(x, 2).dtype == torch.bfloat16
            assert x.sum().dtype == torch.float32
            assert torch.softmax(x, 1).dtype == torch.float32
            assert torch.nn.functional.conv3d(x.float(), torch.randn(4, 4, 1, 1, 1)).dtype == (
                torch.bfloat16
            )
    with CudaAutocastRules():  # no autocast: nothing changes
        assert gn(x).dtype == torch.bfloat16


@pytest.mark.parametrize("memory_saving", [True, False])
def test_bf16_weight_gradients_at_a_2x2x2_bottom_level_are_right_on_cpu(memory_saving):
    """torch's CPU bf16 conv3d weight gradient is wrong on 2x2x2 inputs (error 1.0 at 64
    channels): revseg runs those convolutions in float32, so the bottom level's weight gradients
    are within bf16 rounding of float32's."""
    torch.manual_seed(0)
    model = PartiallyReversibleUNet(channels=(16, 32, 64, 128), norm_groups=4)
    model.memory_saving = memory_saving
    x = torch.randn(1, 4, 16, 16, 16)  # the bottom level (128 channels) is 2x2x2
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        out.float().square().mean().backward()
        found[dtype] = model.decoders[-1].blocks[0].f.conv.weight.grad.clone()
    assert rel_err(found[torch.bfloat16], found[torch.float32]) < 0.05
