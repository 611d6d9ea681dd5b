"""The fully reversible hyperbolic network (Peters, Haber, Lensink): Tables 1 and 2, leapfrog
recursion, exact reverse recursion, gradients and memory of the fully reversible backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import activation_peak
from revseg.memory import SavedTensorsCounter
from revseg.models.hyperbolic_net import HyperbolicNet, memory_report
from revseg.nn.haar import haar3d, inverse_haar3d
from revseg.nn.leapfrog import LeapfrogStack

from model_tester import ReversibleModelTester, rel_err

# Table 1, stage 1: (layers, m, n) per level
TABLE_1 = [(3, 6, 6), (4, 4, 48), (4, 4, 384), (4, 4, 3072), (4, 4, 384), (4, 4, 48), (4, 6, 6)]
TABLE_1_KERNELS = sum(k * m * n for k, m, n in TABLE_1)  # 63,228 kernels of 3x3x3


class TestHyperbolicNet(ReversibleModelTester):
    config_name = "hyperbolic_blr"
    # Table 1 kernels (63,228 x 27 weights) + one bias per kernel row (122) + the 6 -> 1 head
    expected_params = TABLE_1_KERNELS * 27 + 122 + 7
    # two coarsenings (6 | 48 | 384 | 48 | 6 channels): sizes must be divisible by 4, so the
    # tester's size 10 is rejected
    tiny = ("model.layers=[1,1,1,1,1]",)
    tiny_shape = (8, 8, 8)
    in_channels = 3
    out_channels = 1

    def depth_overrides(self, depth: int) -> tuple[str, ...]:
        return (f"model.layers=[{','.join([str(depth)] * 5)}]",)

    part_type = LeapfrogStack

    def test_every_sequence_inverts(self):
        """The reverse recursion takes the last two states back to ``(Y_0, Y_0)``."""
        model = self.build(*self.depth_overrides(2)).double()
        torch.manual_seed(0)
        for stack in self.sequences(model):
            y0 = torch.randn(2, stack.channels, 4, 4, 4, dtype=torch.float64)
            with torch.no_grad():
                last = stack.run(y0, y0)
                y_prev, y_first = stack.inverse(*last)
            assert rel_err(y_prev, y0) < 1e-10 and rel_err(y_first, y0) < 1e-10
            assert rel_err(last[1], y0) > 1e-3  # the stack does change the state

    def test_default_config_is_table_1(self):
        model = self.build(tiny=False)
        assert model.level_channels() == [n for _, _, n in TABLE_1]
        assert model.ranks() == [m for _, m, _ in TABLE_1]
        levels = model.stack.levels
        assert [len(level) for level in levels] == [k for k, _, _ in TABLE_1]
        for level, (_, m, n) in zip(levels, TABLE_1):
            assert all(layer.kernel()[0].shape == (m, n, 3, 3, 3) for layer in level)
        assert model.set_ranks(8) == [6, 8, 8, 8, 8, 8, 6]  # stage 2
        assert TABLE_1_KERNELS == 63_228


def explicit_forward(model: HyperbolicNet, x: torch.Tensor) -> torch.Tensor:
    """Eq. 3.5/4.7 written out, with W_j the Haar transform at the first layer of a coarser level
    (inverse: finer level):  Y_{j+1} = 2 W_j Y_j - W_j W_{j-1} Y_{j-1} - h^2 K^T relu(K W_j Y_j + b)
    """
    h2 = model.stack.h**2
    y_prev = y = x.repeat(1, 2, 1, 1, 1)

    def identity(t):
        return t

    w_prev = identity  # W_{j-1}
    for kind, level in zip(model.stack.transforms, model.stack.levels):
        w = {None: identity, "coarsen": haar3d, "refine": inverse_haar3d}[kind]
        for j, layer in enumerate(level):
            w_j = w if j == 0 else identity
            k, b = layer.kernel()
            wy = w_j(y)
            force = F.conv_transpose3d(torch.relu(F.conv3d(wy, k, b, padding=1)), k, padding=1)
            y_prev, y = y, 2 * wy - w_j(w_prev(y_prev)) - h2 * force
            w_prev = w_j
    return model.head(y)


def tiny_model(layers=(2, 2, 2, 2, 2), **kwargs) -> HyperbolicNet:
    torch.manual_seed(0)
    model = HyperbolicNet(layers=layers, **kwargs).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases away from 0: some ReLUs off
    return model


def test_forward_is_the_leapfrog_recursion_of_the_paper():
    model = tiny_model(h=0.7)
    x = torch.randn(2, 3, 8, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x), explicit_forward(model, x)) < 1e-12


@pytest.mark.parametrize("grow", [False, True])
def test_gradients_with_two_coarsenings_and_grown_ranks_equal_plain_autograd(grow):
    saving = tiny_model(h=0.5)
    if grow:  # two parameter blocks per coarse layer: gradients reach both
        saving.set_ranks(6, init="default")
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(1, 3, 8, 8, 4, dtype=torch.float64)
    results = []
    for model in (saving, plain):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out.pow(2).sum() + out.sin().sum()).backward()
        results.append((out.detach(), xi.grad, [p.grad for p in model.parameters()]))
    (o1, gx1, g1), (o2, gx2, g2) = results
    assert torch.equal(o1, o2)
    assert rel_err(gx1, gx2) < 1e-10
    assert len(g1) == len(g2) == 2 + 2 * (10 + 6 * grow)  # head + (weight, bias) blocks
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) < 1e-10


def test_last_two_states_reconstruct_the_first_at_table_1_depth():
    model = HyperbolicNet(state_channels=6, layers=[3, 4, 4, 4, 4], rank=4).double()
    y0 = torch.randn(1, 6, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y_prev, y_first = model.stack.inverse(*model.stack.run(y0, y0))
    assert rel_err(y_prev, y0) < 1e-10 and rel_err(y_first, y0) < 1e-10


def test_table_2_memory():
    """Kernels 7 | 14 | 4206 MB, states 528 MB, totals 534 | 541 | 4734 MB at 240x424x72x6."""
    model = HyperbolicNet()
    built = memory_report(model).megabytes()
    assert (round(built["kernels_mb"]), round(built["kernels_full_mb"])) == (7, 4206)
    assert (round(built["states_mb"]), round(built["total_mb"])) == (528, 534)
    assert memory_report({"rank": 4}) == memory_report(model)
    assert model.set_ranks(8) == [6, 8, 8, 8, 8, 8, 6]
    stage_2 = memory_report(model)
    assert stage_2 == memory_report({"rank": 8})
    assert (round(stage_2.kernel_bytes / 1e6), round(stage_2.total_bytes / 1e6)) == (14, 541)
    full = memory_report({"rank": None}).megabytes()  # 4.2 GB: computed, not built
    assert (round(full["kernels_mb"]), round(full["total_mb"])) == (4206, 4734)
    # exactly: 63,228 kernels x 27 weights x 4 bytes; 3 states of 72 x 240 x 424 x 6 floats
    assert memory_report(HyperbolicNet()).kernel_bytes == TABLE_1_KERNELS * 27 * 4
    assert stage_2.state_bytes == 3 * 72 * 240 * 424 * 6 * 4
    assert "7 MB" in str(memory_report({"rank": 4}))


def test_ranks_grow_train_and_reload_at_the_grown_ranks():
    model = HyperbolicNet(layers=[1, 1, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(1, 3, 4, 4, 4)
    model(x).pow(2).mean().backward()
    optimizer.step()
    old = {id(p) for p in model.parameters()}
    assert model.ranks() == [6, 4, 6]
    assert model.set_ranks(8) == [6, 8, 6]
    assert old < {id(p) for p in model.parameters()}  # existing parameters kept, new ones added
    optimizer.param_groups[0]["params"] = list(model.parameters())  # Trainer.sync_optimizer_params
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()
    fresh = HyperbolicNet(layers=[1, 1, 1])
    fresh.load_state_dict(model.state_dict())  # strict: a resumed run at grown ranks
    assert fresh.ranks() == [6, 8, 6]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert model.set_ranks([None, 2, 3]) == [6, 2, 3]  # a list: one rank per level, None = full


def test_opening_conv_takes_any_number_of_input_channels():
    model = HyperbolicNet(in_channels=4, out_channels=3, layers=[1, 1, 1], opening="conv")
    assert model(torch.randn(1, 4, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="opening='repeat' needs state_channels"):
        HyperbolicNet(in_channels=4)
    with pytest.raises(ValueError, match=r"^HyperbolicNet expects \(B, 3, D, H, W\)"):
        HyperbolicNet(layers=[1, 1, 1])(torch.randn(1, 4, 8, 8, 8))
    with pytest.raises(ValueError, match="odd number of levels"):
        HyperbolicNet(layers=[1, 1])
    with pytest.raises(ValueError, match="divisible by 8"):
        HyperbolicNet()(torch.randn(1, 3, 16, 16, 12))


def test_saved_tensors_are_the_last_two_states():
    model = HyperbolicNet(layers=[3, 3, 3])
    x = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    with SavedTensorsCounter(exclude=model.parameters()) as counter:
        model(x)
    assert counter.bytes == 2 * 6 * 8**3 * 4


def peak_bytes(depth: int, memory_saving: bool) -> int:
    """Peak tensor bytes of forward + backward less parameters, gradients and input.

    Gradients exist before the step (autograd accumulates into them in place), and the
    parameter-sized gradients the memory-saving backward returns at once are subtracted too:
    what is left is the activation memory."""
    torch.manual_seed(0)
    model = HyperbolicNet(layers=[depth] * 3, memory_saving=memory_saving)
    return activation_peak(model, torch.randn(1, 3, 16, 16, 16))


def test_peak_memory_does_not_grow_with_depth():
    saving = [peak_bytes(d, True) for d in (1, 2, 4)]
    plain = [peak_bytes(d, False) for d in (1, 2, 4)]
    assert saving[0] == saving[1] == saving[2], saving
    assert saving[0] < 12 * 6 * 16**3 * 4  # fewer than 12 full-resolution states
    assert plain[0] < plain[1] < plain[2], plain
    assert saving[2] < plain[2]


@pytest.mark.parametrize("opening", ["repeat", "conv"])
def test_states_stay_float32_under_autocast(opening):
    torch.manual_seed(0)
    saving = HyperbolicNet(layers=[1, 1, 1], opening=opening)
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(1, 3, 8, 8, 8)
    grads = []
    for model in (saving, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = model.open(x)
            state = model.stack(first)
        assert first.dtype == state.dtype == torch.float32
        model.head(state).float().square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    # bf16 layer outputs: recomputation from reconstructed states agrees to bf16 precision
    assert max(rel_err(a, b) for a, b in zip(*grads)) < 5e-2
