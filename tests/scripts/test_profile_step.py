"""scripts/profile_step.py: one profiled step per configuration, the labelled phases found."""

from __future__ import annotations

import json

from helpers import run_python


def test_profiles_the_phases_of_a_reversible_and_a_checkpointed_step(tmp_path):
    tiny = "model.channels=[8,16,24] model.norm_groups=2"
    proc = run_python(
        "scripts/profile_step.py",
        "--size",
        "16",
        "--configs",
        f"model=prev_unet {tiny} model.chunks=2",
        f"model=unet_baseline {tiny} model.checkpointing=true",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "profile_16.json").read_text())["results"]
    reversible, checkpointed = (r["phases_s"] for r in results)
    for phase in ("step: forward and loss", "step: backward", "step: optimizer"):
        assert reversible[phase] > 0 and checkpointed[phase] > 0
    assert reversible["reversible chain: backward"] > reversible["fused half step: slabs"] > 0
    assert "reversible chain: backward" not in checkpointed
    kinds = json.loads((tmp_path / "profile_16.json").read_text())["results"][0]["kinds_s"]
    assert all(
        r["forward_gflop"] > 0
        for r in json.loads((tmp_path / "profile_16.json").read_text())["results"]
    )
    assert kinds["convolution backward"] > 0 and kinds["resampling (pooling, upsampling)"] > 0
    assert (tmp_path / "profile_16.md").read_text().startswith("# One training step profiled")


def test_a_box_size_names_its_files_by_its_sides(tmp_path):
    tiny = "model.channels=[8,16] model.norm_groups=2"
    proc = run_python(
        "scripts/profile_step.py",
        *("--size", "8", "16", "8"),
        *("--configs", f"model=prev_unet {tiny}", "--out", str(tmp_path)),
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        (tmp_path / "profile_8x16x8.md")
        .read_text()
        .startswith("# One training step profiled at 8x16x8")
    )
