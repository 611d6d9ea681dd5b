"""revseg-plan for a GPU: the breakdown says what is traced, computed and estimated, and the
budget answer is the total with its parts."""

import re

import pytest

from revseg.cli.plan import main

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *args: str) -> str:
    assert main(["model=prev_unet", *TINY_MODEL, "data.crop_size=[16,16,16]", *args]) == 0
    return capsys.readouterr().out


def test_cuda_plan_shows_the_breakdown_and_the_total_against_the_budget(capsys):
    out = _run(capsys, "trainer.device=cuda", "budget_gb=1", "max_depth=2")
    for label in (
        "| **traced peak** (",
        "| allocator rounding |",
        "| **predicted max_memory_allocated** |",
        "| allowance: cuDNN workspace |",
        "| allowance: CUDA context | 536,870,912 |",
        "| **predicted total (device memory)** |",
        "of device memory):",
    ):
        assert label in out, label
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    body = [r for r in rows[1:] if not r.startswith("| **predicted")]
    assert all(re.search(r"\| (traced|computed: .+|estimated: .+) \|$", r) for r in body), body
    cube = next(line for line in out.splitlines() if "largest cube:" in line)
    parts = re.search(
        r"predicted total ([\d.]+ \w+): traced .+ \+ computed .+ \+ estimated allowance ([\d.]+ "
        r"\w+)",
        cube,
    )
    assert parts and parts.group(2).startswith("5"), cube  # the 512 MiB context at least


def test_cpu_plan_says_it_is_for_the_cpu(capsys):
    out = _run(capsys, "trainer.device=cpu", "budget_gb=0.5", "max_depth=2")
    assert "| **predicted peak** (" in out and "allowance" not in out
    assert "planned for the CPU: for a GPU's memory add trainer.device=cuda" in out
    assert "largest cube:" in out and "(predicted peak " in out
