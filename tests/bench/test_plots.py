"""revseg.bench.plots: one PNG per plot from the committed results (needs matplotlib)."""

from __future__ import annotations

import json

import pytest

from conftest import REPO


def test_every_plot_is_written_from_the_committed_results(tmp_path):
    pytest.importorskip("matplotlib")
    from revseg.bench.plots import plots

    saved = json.loads((REPO / "docs" / "benchmarks" / "results.json").read_text())
    made = plots(saved["results"], tmp_path)
    expected = ["memory_vs_depth_sequence.png", "memory_vs_depth_unet.png", "memory_vs_fov.png"]
    assert made == [*expected, "memory_zoo.png"]
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in made)
    only_e = [r for r in saved["results"] if r["spec"]["section"] == "e"]
    assert plots(only_e, tmp_path) == ["memory_zoo.png"]
