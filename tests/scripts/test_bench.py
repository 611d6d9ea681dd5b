"""Tests of scripts/bench.py over revseg.bench: tiny configurations end to end, peers skipped
cleanly, the zoo, the report made again from docs/benchmarks/results.json."""

import importlib.util
import json
import shutil

import pytest

from revseg.bench import report, runner, specs
from revseg.bench.specs import SequenceSpec

from conftest import REPO

BENCH = REPO / "scripts" / "bench.py"
DOCS = REPO / "docs" / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_sequence_run_writes_the_report(bench, tmp_path):
    """One tiny configuration per implementation, each in its own process, then the report."""
    args = ["--quick", "--sections", "c", "--depths", "2", "--impls", "plain,revseg"]
    args += ["--size", "8", "--steps", "1", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    results = {r["spec"]["impl"]: r["result"] for r in data["results"]}
    assert set(results) == {"plain", "revseg"}
    for result in results.values():
        assert result["memory_method"] == "cpu_tensor_tracker"
        assert result["state_bytes"] == 8 * 8**3 * 4  # C = 8 channels at 8^3, float32
        assert result["states"] >= 1  # the input is one state
        assert result["step_time_s"] > 0
    # plain autograd keeps the activations of both blocks, revseg only its output
    assert results["revseg"]["states"] < results["plain"]["states"]
    text = (tmp_path / "README.md").read_text()
    assert "## c. One reversible sequence, 8³, C = 8" in text
    assert "python scripts/bench.py --quick" in text
    assert "| depth | plain | revseg |" in text


def test_missing_peer_is_skipped_with_a_note(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        runner.importlib.util, "find_spec", lambda name: None if name == "memcnn" else real(name)
    )
    spec = SequenceSpec("memcnn", "memcnn", 1, 8, 1, [8] * 3, steps=1, threads=1)
    result = runner.run_spec(spec, timeout=10)
    assert result == {"skipped": "memcnn not installed (pip install -e '.[bench]')"}
    meta = runner.new_meta("python scripts/bench.py", 1, cuda=False)
    meta.update(wall_s=1.0, load_end=0.5)
    text, _ = report.report([{"spec": spec.as_dict(), "result": result}], meta)
    assert "Skipped: memcnn not installed" in text


def test_every_implementation_computes_the_same_sequence():
    """The peers run the same blocks: same output as plain autograd (when installed)."""
    import torch

    x = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        reference = runner.build_sequence("plain", 2, 8)(x)
        for impl in specs.IMPLS:
            if impl in specs.PEERS and importlib.util.find_spec(impl) is None:
                continue
            out = runner.build_sequence(impl, 2, 8)(x.clone())
            assert torch.allclose(out, reference, atol=1e-5), impl


def _model_configs() -> dict:
    from omegaconf import OmegaConf

    from revseg.config import CONFIG_DIR, group_options

    return {n: OmegaConf.load(CONFIG_DIR / "model" / f"{n}.yaml") for n in group_options("model")}


def test_zoo_covers_every_brats_model_config(bench):
    """Section e: every model config with 4 input channels, each with the variants its keys name."""
    from revseg.models.revnet_unet import DOWNSAMPLE_KINDS

    args = bench.build_parser().parse_args(["--quick", "--sections", "e"])
    made = [s.as_dict() for s in specs.make_specs(args, cuda=False)]
    configs = _model_configs()
    brats = {n for n, c in configs.items() if c.get("in_channels") == 4}
    assert {s["design"] for s in made} == brats
    assert {"prev_unet", "unet_baseline", "revnet_unet", "hybrid_revnet"} <= brats
    for name in brats:
        mine = [s for s in made if s["design"] == name]
        model = configs[name]
        assert all(s["size"] == [16] * 3 and f"model={name}" in s["overrides"] for s in mine)
        kinds = set(DOWNSAMPLE_KINDS) if "downsample" in model else {""}
        assert {s["setting"] for s in mine} == kinds, name
        depths = {1, 4} if "encoder_depth" in model else {None}
        assert {s["depth"] for s in mine} == depths, name
        switch = "memory_saving" if "memory_saving" in model else "checkpointing"
        for s in mine:
            assert s["switch"] == switch
            assert f"model.{switch}={str(s['saving']).lower()}" in s["overrides"]
            if s["depth"] is not None:
                assert {
                    f"model.encoder_depth={s['depth']}",
                    f"model.decoder_depth={s['depth']}",
                } <= set(s["overrides"])
        # saving on and off for every downsample kind and depth
        pairs = {(s["setting"], s["depth"], s["saving"]) for s in mine}
        assert pairs == {(k, d, v) for k in kinds for d in depths for v in (True, False)}, name
    by = {s["design"]: s for s in made}
    # the same small setting for every design that takes it; hybrid_revnet's channel rule refuses it
    assert set(specs.QUICK_UNET) <= set(by["prev_unet"]["overrides"])
    assert set(specs.QUICK_UNET) <= set(by["unet_baseline"]["overrides"])
    assert not any(o.startswith("model.channels") for o in by["hybrid_revnet"]["overrides"])
    assert "hybrid_revnet keeps its default channels" in by["hybrid_revnet"]["zoo_note"]
    assert by["prev_unet"]["zoo_note"] is None


def test_quick_zoo_run_keeps_the_other_sections(bench, tmp_path):
    """A section e run merged into an existing results.json: the a-d results and their report stay;
    memory saving lowers the peak, and the reversible activations stay flat in depth while plain
    autograd's grow (one design: each configuration is a fresh process of several seconds)."""
    shutil.copy(REPO / "docs" / "benchmarks" / "results.json", tmp_path / "results.json")
    old = json.loads((tmp_path / "results.json").read_text())
    others = [r for r in old["results"] if r["spec"]["section"] != "e"]
    assert {r["spec"]["section"] for r in others} >= {"a", "b", "c"}
    args = ["--quick", "--sections", "e", "--models", "prev_unet", "--steps", "1"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"][: len(others)] == others
    assert data["meta"]["command"] == old["meta"]["command"]
    zoo = {specs.zoo_key(r["spec"]): r["result"] for r in data["results"][len(others) :]}
    assert len(zoo) == 4 and all(specs.ok(r) for r in zoo.values()), zoo
    peak = {k: r["peak_bytes"] for k, r in zoo.items()}
    act = {k: r["planned_activation_peak_bytes"] for k, r in zoo.items()}
    for d in (1, 4):
        assert peak["prev_unet", "", d, True] < peak["prev_unet", "", d, False]
    assert act["prev_unet", "", 4, True] < 1.1 * act["prev_unet", "", 1, True]
    assert act["prev_unet", "", 4, False] > 1.5 * act["prev_unet", "", 1, False]
    assert all(r["planned_peak_bytes"] == r["peak_bytes"] for r in zoo.values())
    assert data["goals"]["e_prev_unet_peak_on_off"] < 1
    text = (tmp_path / "README.md").read_text()
    assert "## a. Partially reversible U-Net vs the baseline" in text
    assert "## c. One reversible sequence" in text
    assert "## e. The reversible zoo at 16x16x16" in text
    assert "| prev_unet | – | reversible | 26,363 |" in text
    assert "- section e from a later run: `python scripts/bench.py --quick --sections e" in text


def test_report_made_again_from_the_results_is_the_committed_one(bench, tmp_path, monkeypatch):
    """docs/benchmarks/README.md is what its results.json reports, to the byte, and so is the
    results.json that --report-from writes (nothing run; the plots are the ones the file lists,
    whether matplotlib is installed or not)."""
    import revseg.bench.plots

    saved = json.loads((DOCS / "results.json").read_text())
    text, goals = report.report(saved["results"], saved["meta"])
    assert text + "\n" == (DOCS / "README.md").read_text()
    assert json.dumps(goals) == json.dumps(saved["goals"])
    monkeypatch.setattr(revseg.bench.plots, "plots", lambda results, out: saved["meta"]["plots"])
    assert bench.main(["--report-from", str(DOCS / "results.json"), "--out", str(tmp_path)]) == 0
    for name in ("README.md", "results.json"):
        assert (tmp_path / name).read_bytes() == (DOCS / name).read_bytes(), name
