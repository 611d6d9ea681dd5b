"""revseg-gpu-validate: its CPU dry run passes and writes both reports; its own arithmetic (TF32
rounding, a failing check) is right; without a GPU and without --dry-run it stops with one line."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_python
from revseg.bench import gpu_validate as gv


def test_dry_run_passes_and_writes_the_reports(tmp_path):
    proc = run_python("scripts/gpu_validate.py", "--dry-run", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (report,) = tmp_path.glob("*_dry-run.json")
    data = json.loads(report.read_text())
    sections = {s["name"]: s for s in data["sections"]}
    assert list(sections) == [fn.__name__ for fn in gv.SECTIONS]
    assert all(s["status"] == "ok" for s in sections.values()), proc.stdout
    env = sections["environment"]["rows"][0]
    assert env["tf32_revseg_default"] == {"cudnn_conv": False, "cuda_matmul": False}
    rows = sections["full_fov"]["rows"]
    assert all(r["allocated_bytes"] > 0 and r["planned_bytes"] > 0 for r in rows)
    depth_rows = sections["precision_by_depth"]["rows"]
    assert {(r["depth"], r["mode"]) for r in depth_rows} == {
        (d, m) for d in gv.DEPTHS for m in gv.MODES
    }
    fp32 = [r for r in depth_rows if r["mode"] == "fp32"]
    tf32 = [r for r in depth_rows if r["mode"] == "tf32"]
    # TF32 (emulated) is far less exact than float32, and its error grows with depth
    assert max(r["engine_param_grad_rel"] for r in fp32) < 1e-5
    assert min(r["engine_param_grad_rel"] for r in tf32) > 10 * max(
        r["engine_param_grad_rel"] for r in fp32
    )
    md = report.with_suffix(".md").read_text()
    assert md.startswith("# GPU validation: cpu, ") and "| full_fov | ok |" in md
    assert proc.stdout.rstrip().endswith("all passed")


def test_tf32_rounding_keeps_ten_mantissa_bits():
    one = 1.0
    values = torch.tensor([one + 2**-12, one + 2**-11, one + 3 * 2**-11, -(one + 2**-9), 3.0])
    want = torch.tensor([one, one + 2**-10, one + 2**-9, -(one + 2**-9), 3.0])
    assert torch.equal(gv._to_tf32(values), want)


def test_a_failing_check_fails_the_run(monkeypatch, tmp_path, capsys):
    def broken(s):
        raise RuntimeError("gradients differ\nsecond line")

    broken.__name__ = "exactness"
    monkeypatch.setattr(gv, "SECTIONS", (gv.environment, broken))
    assert gv.main(["--dry-run", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL exactness: RuntimeError: gradients differ (" in out
    assert "FAILED: exactness" in out
    assert "| exactness | FAIL |" in next(tmp_path.glob("*.md")).read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_needs_dry_run(tmp_path):
    proc = run_python("scripts/gpu_validate.py", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no CUDA GPU here: run it on a GPU, or with --dry-run"
    assert not any(tmp_path.iterdir())
