"""revseg-doctor on a CPU machine: every CPU check passes, the CUDA ones are reported as skipped."""

from __future__ import annotations

import pytest
import torch

from revseg.cli import doctor


def test_cpu_checks_pass_and_cuda_is_skipped(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("python ") and f"torch {torch.__version__}" in lines[0]
    assert any(line.startswith("CUDA ") and "cuDNN" in line and "NCCL" in line for line in lines)
    for check in ("cpu gradients", "cpu training step", "cpu bf16", "cpu fp16", "cpu ddp"):
        assert any(line.startswith(f"ok    {check}: ") for line in lines), check
    assert "skip  cuda: CUDA not available" in lines
    assert "skip  nccl: CUDA not available" in lines
    assert lines[-1] == "all checks passed" and out.err == ""


def test_wrong_gradients_fail_with_one_line(monkeypatch, capsys):
    tiny = doctor._tiny_unet

    def broken(memory_saving, dtype, device):  # a memory-saving path that went wrong
        model = tiny(memory_saving, dtype, device)
        if memory_saving:
            with torch.no_grad():
                next(model.parameters()).mul_(1.001)
        return model

    monkeypatch.setattr(doctor, "_tiny_unet", broken)
    monkeypatch.setattr(
        doctor,
        "checks",
        lambda: [
            doctor.Check("cpu gradients", lambda: doctor.check_gradients(torch.device("cpu")))
        ],
    )
    assert doctor.main([]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines()[-1] == "1 check(s) failed"
    errors = out.err.splitlines()
    assert len(errors) == 1
    assert errors[0].startswith(
        "error: cpu gradients: AssertionError: memory-saving gradients differ from plain autograd"
    )


def test_nccl_on_one_gpu_runs_a_one_process_ddp_step(monkeypatch):
    runs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(doctor, "_ddp_gradients", lambda *args: runs.append(args) or 1e-15)
    assert doctor.check_nccl().startswith("1-process NCCL DDP step on cuda:0")
    assert runs == [(torch.device("cuda", 0), "nccl", 1)]


def test_ddp_gradients_that_differ_fail(monkeypatch):
    monkeypatch.setattr(doctor, "_ddp_gradients", lambda *args: 1e-3)
    with pytest.raises(AssertionError, match="2-process DDP gradients differ"):
        doctor.check_ddp(torch.device("cpu"))
