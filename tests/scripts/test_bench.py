"""Tests of scripts/bench.py: one tiny configuration end to end, peers skipped cleanly."""

import importlib.util
import json

import pytest

from conftest import REPO

BENCH = REPO / "scripts" / "bench.py"


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


def test_missing_peer_is_skipped_with_a_note(bench, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util, "find_spec", lambda name: None if name == "memcnn" else real(name)
    )
    spec = {"kind": "sequence", "section": "c", "label": "memcnn", "impl": "memcnn"}
    result = bench.run_spec(spec, timeout=10)
    assert result == {"skipped": "memcnn not installed (pip install -e '.[bench]')"}
    results = [{"spec": {**spec, "depth": 1, "channels": 8, "size": [8] * 3}, "result": result}]
    meta = {
        "command": "python scripts/bench.py",
        "date": "today",
        "wall_s": 1.0,
        "load_start": 0.5,
        "load_end": 0.5,
        "machine": bench.machine_info(),
        "memory_method": "cpu_tensor_tracker",
        "threads": 1,
    }
    text, _ = bench.report(results, meta)
    assert "Skipped: memcnn not installed" in text


def test_every_implementation_computes_the_same_sequence(bench):
    """The peers run the same blocks: same output as plain autograd (when installed)."""
    import torch

    x = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        reference = bench.build_sequence("plain", 2, 8)(x)
        for impl in bench.IMPLS:
            if impl in bench.PEERS and importlib.util.find_spec(impl) is None:
                continue
            out = bench.build_sequence(impl, 2, 8)(x.clone())
            assert torch.allclose(out, reference, atol=1e-5), impl
