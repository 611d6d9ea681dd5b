"""scripts/time_interleaved.py: configurations alternated in fresh processes, ratios to the 1st."""

import json

from helpers import run_python

TINY = "model.channels=[8,16,24] model.norm_groups=2"


def test_two_configs_interleaved(tmp_path):
    out = tmp_path / "t.md"
    proc = run_python(
        "scripts/time_interleaved.py",
        "--size", "16", "--repeats", "2", "--steps", "1", "--threads", "1",
        "--config", f"rev=model=prev_unet {TINY} trainer.precision=bf16",
        "--config", f"ckpt=model=unet_baseline model.checkpointing=true {TINY}",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.with_suffix(".json").read_text())
    assert list(record["runs"]) == ["rev", "ckpt"]
    assert all(
        len(r) == 2 and all(x["step_time_s"] > 0 for x in r) for r in record["runs"].values()
    )
    assert all(x["peak_bytes"] > 0 for r in record["runs"].values() for x in r)
    text = out.read_text()
    assert "| rev | `model=prev_unet" in text and "| 1.000 |" in text
    assert text.startswith("# Step time, interleaved: 16³")


def test_a_box_size(tmp_path):
    out = tmp_path / "t.md"
    proc = run_python(
        "scripts/time_interleaved.py",
        "--size", "8", "16", "8", "--repeats", "1", "--steps", "1", "--threads", "1",
        "--config", "ckpt=model=unet_baseline model.channels=[8,16] model.norm_groups=2",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.with_suffix(".json").read_text())["size"] == [8, 16, 8]
    assert out.read_text().startswith("# Step time, interleaved: 8x16x8, 1 repeats")
