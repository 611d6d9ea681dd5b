"""Tests of revseg.memory.plan: the planner agrees with the measured peak, budgets, the script."""

import pytest
import torch

from helpers import run_python
from revseg.config import build
from revseg.errors import ConfigError
from revseg.memory import PeakMemoryMeter
from revseg.memory.plan import CATEGORIES, fit_budget, plan_from_config, plan_run

from conftest import TINY_MODEL, compose_train, plan_config

# the planner traces at the model's divisor (4 for three levels) and 2x in one dimension; the
# checks are at sizes 4 times larger in voxels and more, so the extrapolation is tested
pytestmark = pytest.mark.usefixtures("one_thread")


def measured_peak(cfg, size, precision: str = "fp32") -> int:
    """Peak of the second training step, measured as the trainer does (CPU autocast for bf16
    and fp16, a gradient scaler for fp16); ``size``: a cube side or a ``(D, H, W)``."""
    torch.manual_seed(0)
    spatial = [size] * 3 if isinstance(size, int) else list(size)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    model = build(cfg.model, "model")
    optimizer = build(cfg.optimizer, "optimizer")(params=model.parameters())
    loss_fn = build(cfg.loss, "loss")
    image = torch.randn(1, int(cfg.model.in_channels), *spatial)
    with torch.no_grad():
        label = (torch.rand_like(model(image)) > 0.5).float()
    meter = PeakMemoryMeter("cpu")
    peaks = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        with meter.measure(static=[*model.parameters(), image, label, *state]) as m:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(image), label)
            scaler.scale(loss).backward()
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        peaks.append(m.peak_bytes)
    return max(peaks)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model=prev_unet", "model.encoder_depth=1"),
        ("model=prev_unet", "model.encoder_depth=[1,2,3]"),
        ("model=prev_unet", "model.encoder_depth=4"),
        ("model=prev_unet", "model.encoder_depth=4", "model.memory_saving=false"),
        ("model=unet_baseline",),
    ],
)
def test_plan_matches_measured_peak(overrides):
    size = 8
    cfg = plan_config(*overrides, size=size)
    plan = plan_from_config(cfg)
    measured = measured_peak(cfg, size)
    assert plan.input_shape == (1, 4, size, size, size)
    assert abs(plan.peak_bytes / measured - 1) < 0.15, (plan.peak_bytes, measured)
    # the method resolves the step in time, so on the CPU tracker it is exact up to rounding
    assert abs(plan.peak_bytes - measured) <= 64, (plan.peak_bytes, measured)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "overrides",
    [
        ("model=prev_unet",),
        ("model=prev_unet", "model.state_dtype=autocast", "model.encoder_depth=2"),
        ("model=unet_baseline", "model.checkpointing=true"),
    ],
)
def test_plan_follows_the_precision(overrides, precision):
    """trainer.precision is planned as the trainer runs it (CPU rules on the CPU), to the byte
    with float32 states."""
    size = 8
    cfg = plan_config(*overrides, f"trainer.precision={precision}", "trainer.device=cpu", size=size)
    plan = plan_from_config(cfg)
    assert (plan.precision, plan.rules) == (precision, "cpu")
    assert f"{precision} with CPU autocast rules" in plan.table().splitlines()[0]
    measured = measured_peak(cfg, size, precision)
    if "model.state_dtype=autocast" in overrides:
        # low-precision states: within about 1 % of the measured peak (the bf16 max-pooling's
        # backward does not extrapolate exactly from the planner's tiny traces)
        assert abs(plan.peak_bytes / measured - 1) < 0.02, (plan.peak_bytes, measured)
    else:
        assert abs(plan.peak_bytes - measured) <= 64, (plan.peak_bytes, measured)


ZOO = {  # every model config, small (the planner traces its divisor and twice it)
    "prev_unet": ("model.channels=[8,16,24]", "model.norm_groups=2"),
    "unet_baseline": ("model.channels=[8,16,24]", "model.norm_groups=2"),
    "revnet_unet": ("model.channels=[8,16,24]", "model.norm_groups=2"),
    "revup_unet": ("model.channels=[8,16,24]", "model.power_grid_size=4"),
    "hybrid_revnet": ("model.channels=[4,32,32]",),
    "hyperbolic_blr": ("model.layers=[1,1,1]", "data=synthetic_video", "data.size=[16,16]",
                       "data.frames=8"),
}  # fmt: skip


def test_zoo_is_complete():
    from revseg.config import CONFIG_DIR

    assert set(ZOO) == {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_model_is_planned_as_measured_at_every_precision(name, precision):
    video = name == "hyperbolic_blr"
    size = (8, 16, 16) if video else (16, 16, 16)
    shape = [] if video else [f"data.crop_size=[{size[0]},{size[1]},{size[2]}]"]
    cfg = compose_train(
        f"model={name}", *ZOO[name], *shape, f"trainer.precision={precision}", "trainer.device=cpu"
    )
    plan = plan_from_config(cfg)
    assert plan.input_shape[2:] == size
    measured = measured_peak(cfg, size, precision)
    assert abs(plan.peak_bytes / measured - 1) < 0.01, (plan.peak_bytes, measured)


def test_low_precision_plans_less_and_cuda_rules_keep_float32_norms():
    """The baseline's convolutions shrink under bf16; under CUDA's rules its GroupNorms run in
    float32 (their inputs cast up and kept), under CPU's in bf16."""
    cfg = plan_config("model=unet_baseline", "model.checkpointing=true", size=32)
    peaks = {}
    for precision, device in (("fp32", "cpu"), ("bf16", "cpu"), ("bf16", "cuda")):
        c = cfg.copy()
        c.trainer.precision, c.trainer.device = precision, device
        plan = plan_from_config(c)
        assert (plan.precision, plan.rules) == (precision, "cuda" if device == "cuda" else "cpu")
        peaks[precision, device] = plan.as_dict()["breakdown"]["workspace"] + sum(
            plan.kept_after_forward.values()
        )
    assert peaks["bf16", "cpu"] < peaks["bf16", "cuda"] < peaks["fp32", "cpu"] * 1.2
    assert peaks["bf16", "cpu"] < 0.8 * peaks["fp32", "cpu"]


def test_precision_and_device_errors_name_the_key():
    with pytest.raises(ConfigError, match="trainer.precision"):
        plan_from_config(plan_config("model=prev_unet", "trainer.precision=fp64"))
    with pytest.raises(ConfigError, match="trainer.device"):
        plan_from_config(plan_config("model=prev_unet", "trainer.device=tpu"))


def test_breakdown_adds_up_and_names_the_reversible_states():
    saving = plan_from_config(plan_config("model=prev_unet", "model.encoder_depth=3"))
    plain = plan_from_config(
        plan_config("model=prev_unet", "model.encoder_depth=3", "model.memory_saving=false")
    )
    for plan in (saving, plain):
        assert set(plan.breakdown) == set(CATEGORIES)
        assert abs(sum(plan.breakdown.values()) - plan.peak_bytes) <= len(CATEGORIES)
    n_params = saving.params * 4
    assert saving.breakdown["parameters"] == n_params
    assert saving.breakdown["optimizer state"] >= 2 * n_params  # Adam: two moments
    assert saving.kept_after_forward["reversible"] > 0
    assert plain.kept_after_forward["reversible"] == 0
    # plain autograd keeps what the reversible sequences free
    assert (
        plain.kept_after_forward["non-reversible"] > 2 * saving.kept_after_forward["non-reversible"]
    )
    assert plain.peak_bytes > saving.peak_bytes
    table = saving.table()
    assert "predicted peak" in table and "reversible states" in table


def test_reversible_depth_costs_parameters_not_activations():
    shallow = plan_from_config(
        plan_config("model=prev_unet", "model.encoder_depth=1"), spatial=[32] * 3
    )
    deep = plan_from_config(
        plan_config("model=prev_unet", "model.encoder_depth=3"), spatial=[32] * 3
    )
    extra_params = (deep.params - shallow.params) * 4
    activations = ("reversible states", "non-reversible activations")
    assert sum(deep.kept_after_forward.values()) == sum(shallow.kept_after_forward.values())
    assert deep.peak_bytes - shallow.peak_bytes <= 4 * extra_params + 1024  # p, grad, 2 moments
    assert [deep.breakdown[k] for k in activations] == [shallow.breakdown[k] for k in activations]


def test_plan_leaves_the_model_alone_and_logs_to_tensorboard():
    cfg = plan_config("model=prev_unet")
    model = build(cfg.model, "model")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Writer:
        def __init__(self):
            self.texts = []

        def add_text(self, tag, text, step):
            self.texts.append((tag, text, step))

    writer = Writer()
    plan = plan_from_config(cfg, model, writer=writer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert writer.texts == [("memory/plan", plan.table(), 0)]


def test_plan_of_the_run_uses_its_objects():
    """The trainer's plan: the model, optimizer, loss and data module train() built, nothing
    rebuilt from the config; the same plan as from the config, and AdamW's defaults are taken."""
    from types import SimpleNamespace

    for optimizer in ("adam", "adamw"):
        cfg = plan_config("model=prev_unet", f"optimizer={optimizer}")
        model = build(cfg.model, "model")
        opt = build(cfg.optimizer, "optimizer")(params=model.parameters())
        loss_fn = build(cfg.loss, "loss")
        data = SimpleNamespace(input_shape=(16, 16, 24), batch_size=1)
        plan = plan_run(cfg, model, opt, loss_fn, data)
        assert plan == plan_from_config(cfg, model, spatial=[16, 16, 24])
        assert all(p.grad is None for p in model.parameters()) and not opt.state
    no_step = plan_run(cfg, model, None, loss_fn, data)
    assert no_step.breakdown["optimizer state"] == 0 < plan.breakdown["optimizer state"]


def test_budget_fit_is_the_largest_that_fits():
    cfg = plan_config("model=prev_unet", size=16)
    small = plan_from_config(cfg, spatial=[16] * 3)
    budget = small.peak_bytes * 1.5
    fit = fit_budget(cfg, budget, max_depth=2)
    side = fit.cube[0]
    assert fit.plans["cube"].peak_bytes <= budget
    assert plan_from_config(cfg, spatial=[side + 4] * 3).peak_bytes > budget
    assert fit.scaled_crop is not None and fit.plans["scaled_crop"].peak_bytes <= budget
    assert fit.encoder_depth is not None and 1 <= fit.encoder_depth <= 2
    assert fit.plans["encoder_depth"].peak_bytes <= budget
    nothing = fit_budget(cfg, 1000, depth=False)
    assert nothing.cube is None and nothing.scaled_crop is None


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="divisible by 4"):
        plan_from_config(plan_config("model=prev_unet"), spatial=[10, 12, 12])


def _script(*args):
    return run_python("scripts/memory_plan.py", *args)


def test_memory_plan_script():
    proc = _script(*TINY_MODEL, "data.crop_size=[16,16,16]", "budget_gb=0.5", "max_depth=2")
    assert proc.returncode == 0, proc.stderr
    assert "memory plan: prev_unet" in proc.stdout
    assert "predicted peak" in proc.stdout
    assert "largest cube:" in proc.stdout and "deepest encoder" in proc.stdout
    bad = _script("model.no_such_key=1")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    bad = _script("budget_gb=lots")
    assert bad.returncode == 2 and "budget_gb" in bad.stderr


def test_planning_leaves_the_random_stream_alone():
    # the trainer plans on rank 0 only: planning must not change what the run draws next
    cfg = plan_config()
    model = build(cfg.model, "model")
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    first = plan_from_config(cfg, model)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(1)
    plan_from_config(cfg)  # building the model draws its weights: in the fork too
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(2)
    assert plan_from_config(cfg, model).peak_bytes == first.peak_bytes
