"""Reconstruction SNR of reversible parts (Hascoet et al., section 4.1.1): the analysis, the
closed forms of alpha, scripts/snr_analysis.py and the ReconstructionMonitor callback."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from revseg.config import group_options
from revseg.errors import ConfigError
from revseg.nn.blocks import NormActConv
from revseg.nn.invertible import (
    InvertibleBatchNorm3d,
    InvertibleLeakyReLU,
    LayerwiseInvertibleChain,
    batch_norm_alpha,
    leaky_relu_alpha,
)
from revseg.nn.reversible import AdditiveCoupling, ReversibleSequence
from revseg.training.checkpoint import load_checkpoint
from revseg.training.reconstruction import (
    ReconstructionMonitor,
    analyze_reconstruction,
    reversible_parts,
    snr_db,
)
from revseg.training.trainer import train

from conftest import REPO, TINY, TINY_NO_GROUPS, compose_train

# tiny variants of the reversible models, with an input they accept
TINY_MODELS = {
    "prev_unet": (("model.channels=[8,16,24]", "model.norm_groups=2"), 4, 16),
    "revnet_unet": (("model.channels=[8,16,24]", "model.norm_groups=2"), 4, 16),
    "hybrid_revnet": (("model.channels=[4,32,32]",), 4, 16),
    "hyperbolic_blr": (("model.layers=[1,2,1]",), 3, 8),
    # Fixup starts RevUp's residual g constant, so one fixed-point iteration inverts it exactly
    "revup_unet": (("model.channels=[8,16,24]",), 4, 16),
}


class Wrapper(nn.Module):
    """A model whose only reversible part is ``part``."""

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part(x)


class LossyScale(nn.Module):
    """``y = 2 x`` with a deliberately wrong inverse ``x_hat = (1 + delta) y / 2``."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (1 + self.delta) * y / 2


class LossySequence(nn.Module):
    """A reversible part by the contract of :func:`revseg.nn.reversible.reversible_parts`: an
    ``inverse`` and a ``memory_saving`` switch (here always plain autograd)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.memory_saving = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y


def coupling_model(depth: int = 3, channels: int = 8) -> Wrapper:
    half = channels // 2
    blocks = [
        AdditiveCoupling(NormActConv(half, half, 2), NormActConv(half, half, 2))
        for _ in range(depth)
    ]
    return Wrapper(ReversibleSequence(blocks))


def tiny_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    overrides, in_channels, size = TINY_MODELS[name]
    model = instantiate(compose_train(f"model={name}", *overrides).model, _convert_="all")
    torch.manual_seed(0)
    return model.to(dtype), torch.randn(2, in_channels, size, size, size, dtype=dtype)


# ------------------------------------------------------------------------------------------
# the analysis


def test_exact_couplings_reconstruct_to_rounding():
    torch.manual_seed(0)
    model = coupling_model().double()
    x = torch.randn(2, 8, 8, 8, 8, dtype=torch.float64)
    report = analyze_reconstruction(model, x, alpha=False)
    assert [r.name for r in report.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    for record in report.layers:
        assert math.isfinite(record.snr_db) and record.snr_db > 200, record
        assert record.rel_error < 1e-10
    # float32 rounding is what limits the same chain in training precision
    report32 = analyze_reconstruction(model.float(), x.float(), alpha=False)
    assert all(100 < r.snr_db < 180 for r in report32.layers), report32.layers


def test_lossy_inverse_gives_the_expected_snr():
    delta = 1e-3
    model = Wrapper(LossySequence([LossyScale(delta), LossyScale(delta)]))
    x = torch.randn(2, 3, 8, 8, 8, dtype=torch.float64)
    first, second = analyze_reconstruction(model, x, alpha=False).layers
    # block 1's input comes back scaled by (1 + delta), block 0's by (1 + delta)^2
    assert second.snr_db == pytest.approx(-20 * math.log10(delta), abs=1e-6)
    assert first.rel_error == pytest.approx((1 + delta) ** 2 - 1, rel=1e-9)
    assert first.snr_db == pytest.approx(-20 * math.log10((1 + delta) ** 2 - 1), abs=1e-6)
    assert snr_db(x, x) == math.inf


@pytest.mark.parametrize("slope", [0.2, 0.5])
def test_leaky_relu_alpha_matches_the_closed_form(slope):
    """Eq. 32c holds for zero-mean symmetric inputs and small output noise. The measured alpha
    is a ratio of energies over N = 32768 elements, whose relative fluctuations are ~1/sqrt(N)
    (0.6 %); at 60 dB the noise flips the sign of ~0.1 % of the outputs. 5 % is over 5 sigma and
    still far from the wrong forms (4 / (1 + n^2)^2 = 0.85 at n = 0.2 against 0.148; 1 without
    the branch split)."""
    torch.manual_seed(0)
    model = Wrapper(LayerwiseInvertibleChain([InvertibleLeakyReLU(slope)]))
    x = torch.randn(2, 4, 16, 16, 16, dtype=torch.float64)
    (record,) = analyze_reconstruction(model, x, trials=4).layers
    assert record.closed_form == pytest.approx(leaky_relu_alpha(slope))
    assert record.alpha == pytest.approx(leaky_relu_alpha(slope), rel=0.05)


def test_batch_norm_alpha_matches_the_closed_form():
    """Eq. 26d with the layer's batch statistics: the signal energies are exact, the noise
    per channel fluctuates by ~sqrt(2 / 8192) (1.6 %) and averages over 4 channels and 4 draws."""
    torch.manual_seed(0)
    bn = InvertibleBatchNorm3d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.2, 1.0, 3.0, -0.5]))
        bn.bias.copy_(torch.tensor([0.0, 0.5, -1.0, 2.0]))
    model = Wrapper(LayerwiseInvertibleChain([bn])).double()
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1, 1)
    x = torch.randn(2, 4, 16, 16, 16, dtype=torch.float64) * scale + 1.0
    (record,) = analyze_reconstruction(model, x, trials=4).layers
    var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), unbiased=False)
    expected = batch_norm_alpha(mean, var, bn.scale().detach(), bn.bias.detach(), bn.eps)
    assert record.closed_form == pytest.approx(expected, rel=1e-9)
    assert record.alpha == pytest.approx(expected, rel=0.03)
    assert abs(expected - 1) > 0.2  # a case where the inverse does change the SNR


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_reversible_model_reconstructs_in_float64(name):
    model, x = tiny_model(name, torch.float64)
    if name == "revup_unet":  # Fixup starts g constant (inverted by any iteration): a slope, and
        with torch.no_grad():  # enough fixed-point iterations to converge in float64
            for block in model.blocks():
                block.conv2.weight.normal_(0, 0.05)
        model.inverse_iterations = 80
    report = analyze_reconstruction(model, x, trials=1)
    assert report.layers and {r.part for r in report.layers} == {
        n for n, _ in reversible_parts(model)
    }
    assert all(r.snr_db > 200 for r in report.layers), min(r.snr_db for r in report.layers)
    kinds = {k["kind"]: k for k in report.kinds()}
    assert all(k["alpha"] is not None and k["alpha"] > 0 for k in kinds.values())
    json.dumps(report.to_dict(), allow_nan=False)


def test_fixed_point_inverses_report_their_truncation_error():
    """RevUp's blocks invert ``y = x + g(x)`` by fixed-point iterations: one iteration (the
    paper's training setting) leaves an error of order Lip(g), 60 reach float32 rounding."""
    model, x = tiny_model("revup_unet")
    with torch.no_grad():  # Fixup starts g constant (exactly invertible): give it a slope
        for block in model.blocks():
            block.conv2.weight.normal_(0, 0.05)
    errors = {}
    for iterations in (1, 60):
        model.inverse_iterations = iterations
        report = analyze_reconstruction(model, x, alpha=False)
        assert {r.kind for r in report.layers} == {"RevUpBlock"}
        errors[iterations] = max(report.worst_by_part().values())
    assert errors[1] > 1e-3 and errors[60] < 1e-6, errors


def test_hybrid_blocks_report_their_layers():
    """Figure 13: the layers inside a hybrid block's F and G are rebuilt by layer-wise inverses;
    closed forms sit next to the measured alpha of LeakyReLU, batch norm and pooling."""
    model, x = tiny_model("hybrid_revnet")
    report = analyze_reconstruction(model, x, trials=2)
    levels = {r.level for r in report.layers}
    assert levels == {"block", "layer"}
    names = [r.name for r in report.layers]
    assert names.index("blocks.0") < names.index("blocks.0.f.layers.2") < names.index("blocks.1")
    kinds = {k["kind"]: k for k in report.kinds()}
    assert kinds["InvertibleLeakyReLU"]["closed_form"] == pytest.approx(leaky_relu_alpha(0.2))
    assert kinds["InvertibleBatchNorm3d"]["closed_form"] is not None
    assert kinds["ChannelPooling3d"]["alpha"] == pytest.approx(1.0, abs=1e-3)
    assert kinds["HybridBlock"]["closed_form"] is None
    assert [r.position for r in report.layers] == list(range(len(report.layers)))


@pytest.mark.parametrize("name", ["hybrid_revnet", "revup_unet"])
def test_analysis_leaves_the_model_and_the_rng_as_they_were(name):
    """Batch norms' running and batch statistics, RevUp's power-iteration vectors (advanced by
    training-mode forwards), the RNG and the train/eval flags."""
    model, x = tiny_model(name)
    model.train()
    with torch.no_grad():
        model(x)  # batch statistics stored by the invertible batch norms
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = {id(m): m.batch_stats for m in model.modules() if hasattr(m, "batch_stats")}
    rng = torch.get_rng_state()
    analyze_reconstruction(model, x * 3 + 1, trials=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert {id(m): m.batch_stats for m in model.modules() if hasattr(m, "batch_stats")} == stats
    model.eval()
    report = analyze_reconstruction(model, x, mode="train", alpha=False)
    assert report.mode == "train" and not model.training


@pytest.mark.parametrize("name", group_options("model"))
def test_parts_are_found_in_every_reversible_model(name):
    model = instantiate(compose_train(f"model={name}").model, _convert_="all")
    assert bool(reversible_parts(model)) == model.memory_saving  # true in every config
    if not reversible_parts(model):
        with pytest.raises(ValueError, match="no reversible parts"):
            analyze_reconstruction(model, torch.randn(1, 4, 16, 16, 16))


# ------------------------------------------------------------------------------------------
# scripts/snr_analysis.py


def load_script():
    spec = importlib.util.spec_from_file_location("snr_analysis", REPO / "scripts/snr_analysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_on_the_demo_config(tmp_path, tiny_data_root):
    out = tmp_path / "snr.json"
    args = [*TINY, f"data.root={tiny_data_root}", "snr.float64=true", f"output={out}"]
    proc = subprocess.run(
        [sys.executable, "scripts/snr_analysis.py", "model=prev_unet", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| part | # | layer |" in proc.stdout and "| AdditiveCoupling |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["model"] == "prev_unet" and result["batch"]["shape"] == [1, 4, 16, 16, 16]
    assert set(result["reports"]) == {"float32", "float64"}
    f32, f64 = (result["reports"][k]["layers"] for k in ("float32", "float64"))
    assert len(f32) == len(f64) == 6  # 3 encoder and 3 decoder sequences of one block
    assert all(r["snr_db"] > 200 for r in f64) and all(80 < r["snr_db"] < 200 for r in f32)


def test_script_on_a_run_dir_and_its_errors(tmp_path, tiny_data_root, capsys):
    run = tmp_path / "run"
    common = [*TINY, f"data.root={tiny_data_root}", "~logger", "trainer.plan_memory=false"]
    train(compose_train(*common, f"paths.output_dir={run}"))
    script = load_script()
    assert script.main([f"run={run}", f"data.root={tiny_data_root}", "snr.checkpoint=last"]) == 0
    result = json.loads((run / "snr.json").read_text())
    assert result["run"] == str(run) and result["checkpoint"] == "last"
    assert result["reports"]["float32"]["layers"]
    assert "| AdditiveCoupling |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="only data"):
        script.main([f"run={run}", "model.channels=[8,16,32]"])
    with pytest.raises(ConfigError, match="data.nokey"):
        script.main([f"run={run}", "data.nokey=1"])
    with pytest.raises(ConfigError, match="snr.nokey"):
        script.main(["snr.nokey=1"])
    with pytest.raises(ConfigError, match="snr.split"):
        script.main(["snr.split=test"])
    for bad, key in (("snr.trials=abc", "snr.trials"), ("snr.trials=0", "snr.trials")):
        with pytest.raises(ConfigError, match=key):
            script.main([bad])
    with pytest.raises(ConfigError, match="snr.noise_snr_db"):
        script.main(["snr.noise_snr_db=loud"])
    with pytest.raises(ConfigError, match="no reversible parts"):
        script.main(["model=unet_baseline", *common[:-2]])
    from revseg.errors import DataError

    with pytest.raises(DataError, match="nowhere"):
        script.main([f"run={tmp_path / 'nowhere'}"])


# ------------------------------------------------------------------------------------------
# the callback


class Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def fake_trainer(model: nn.Module, x: torch.Tensor) -> SimpleNamespace:
    data = SimpleNamespace(val_dataloader=lambda: [{"image": x}])
    return SimpleNamespace(
        network=model, writer=Writer(), device=torch.device("cpu"), precision="fp32", data=data
    )


def test_monitor_logs_every_n_steps_and_warns_once(caplog):
    model, x = tiny_model("prev_unet")
    trainer = fake_trainer(model, x)
    monitor = ReconstructionMonitor(every_n_steps=2, threshold=1e-12)
    monitor.on_train_start(trainer)
    with caplog.at_level(logging.WARNING, logger="revseg.training.reconstruction"):
        for step in range(1, 6):
            monitor.on_train_batch_end(trainer, {"image": x}, step)
    logged = [(tag, step) for tag, _, step in trainer.writer.scalars]
    assert [s for tag, s in logged if tag == "reconstruction/max_rel_error"] == [2, 4]
    assert ("reconstruction/encoders.0", 2) in logged  # 6 parts: each is logged too
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "exceeds threshold" in warnings[0] and monitor.max_part in warnings[0]
    summary = monitor.summary()["reconstruction"]
    assert summary["steps"] == 2 and 0 < summary["last"] <= summary["max"] < 1e-5
    resumed = ReconstructionMonitor(every_n_steps=2, threshold=1e-12)
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert resumed.summary() == monitor.summary()
    with caplog.at_level(logging.WARNING, logger="revseg.training.reconstruction"):
        caplog.clear()
        resumed.on_train_batch_end(trainer, {"image": x}, 6)
    assert not caplog.records and resumed.steps == 3  # warned before the resume


def test_monitor_on_validation_batches_and_its_arguments(caplog):
    model, x = tiny_model("hyperbolic_blr")
    trainer = fake_trainer(model, x)
    trainer.global_step = 7
    monitor = ReconstructionMonitor(on="val")
    with caplog.at_level(logging.WARNING):
        monitor.on_train_start(trainer)
        monitor.on_train_batch_end(trainer, {"image": x}, 100)
        monitor.on_validation_end(trainer, {})
    assert [(tag, step) for tag, _, step in trainer.writer.scalars][0] == (
        "reconstruction/max_rel_error",
        7,
    )
    assert monitor.steps == 1 and not caplog.records  # float32 leapfrog: far below 1e-3
    for kwargs in ({"every_n_steps": 0}, {"threshold": 0.0}, {"on": "test"}):
        with pytest.raises(ValueError):
            ReconstructionMonitor(**kwargs)


def test_monitor_runs_under_the_trainers_precision():
    """Under bf16 autocast F and G compute in bf16 while the sequences keep their states in
    float32: the additive inverse then stays exact to float32 rounding (states in bf16 would
    lose ~1e-3)."""
    model, x = tiny_model("prev_unet")
    trainer = fake_trainer(model, x)
    trainer.precision = "bf16"
    assert ReconstructionMonitor().check(trainer, x, 1) < 1e-5


def test_training_with_the_monitor_ends_with_the_same_weights(tmp_path, tiny_data_root):
    """Invertible batch norms hold running and batch statistics: the monitor must leave them,
    and the RNG, as they were (CPU, deterministic)."""
    common = [
        *TINY_NO_GROUPS,
        "model=hybrid_revnet",
        "model.channels=[4,32,32]",
        f"data.root={tiny_data_root}",
        "~logger",
        "trainer.deterministic=true",
        "trainer.plan_memory=false",
    ]
    plain = train(compose_train(*common, f"paths.output_dir={tmp_path / 'a'}"))
    watched = train(
        compose_train(
            *common,
            "callbacks=reconstruction",
            "callbacks.reconstruction.every_n_steps=1",
            f"paths.output_dir={tmp_path / 'b'}",
        )
    )
    assert "reconstruction" not in plain
    assert watched["reconstruction"]["steps"] == 3  # 3 training cases, one epoch
    assert 0 < watched["reconstruction"]["max"] < 1e-3
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert plain["final_metrics"] == watched["final_metrics"]


def analysis_peak(depth: int) -> int:
    """Peak tensor bytes of a monitor's check of a ``depth``-block sequence, less the model."""
    from revseg.memory import PeakMemoryMeter

    torch.manual_seed(0)
    model = coupling_model(depth, channels=4)
    x = torch.randn(1, 4, 16, 16, 16)
    params = list(model.parameters())
    with PeakMemoryMeter("cpu").measure(static=[params, x]) as m:
        analyze_reconstruction(model, x, alpha=False)
    return m.peak_bytes - sum(p.nbytes for p in params)


def test_analysis_holds_about_sqrt_depth_states():
    # the monitor used to keep every block's true input (copied to host memory on a GPU): at
    # the full field of view, GBs per check. Now about 2 sqrt(N) states are held at once.
    state = 4 * 16**3 * 4
    peaks = {depth: analysis_peak(depth) for depth in (4, 36)}
    assert peaks[36] < 20 * state, {d: p / state for d, p in peaks.items()}
    assert peaks[36] < 3 * peaks[4]
