"""scripts/demo_report.py: each demo in a fresh process, its time and Dice before and after."""

import json

from helpers import run_python

from conftest import TINY


def test_a_demo_is_timed_and_scored_before_and_after_training(tmp_path, tiny_data_root):
    out = tmp_path / "demo.md"
    overrides = " ".join([*TINY, f"data.root={tiny_data_root}", "~logger"])
    proc = run_python(
        "scripts/demo_report.py", "--demo", f"tiny={overrides}", "--repeats", "1",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = json.loads(out.with_suffix(".json").read_text())["runs"]["tiny"]
    assert run["seconds"] > 0 and run["epochs"] == 1 and run["monitor"] == "val/dice_mean"
    assert 0.0 <= run["untrained"] <= 1.0 and 0.0 <= run["trained"] <= 1.0
    text = out.read_text()
    assert text.startswith("# The demos: time and Dice before and after training")
    assert f"| tiny | `{overrides}` |" in text
