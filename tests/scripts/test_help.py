"""Every command answers --help with its usage and exit status 0 (Hydra read --help as a
malformed override: ``error: LexerNoViableAltException: --help``; issue 22, item 8)."""

from __future__ import annotations

import pytest

from helpers import run_python

SCRIPTS = [
    "predict",
    "predict_video",
    "memory_plan",
    "check_data",
    "evaluate",
    "check_submission",
    "doctor",
    "snr_analysis",
    "gpu_validate",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage(script):
    proc = run_python(f"scripts/{script}.py", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower() and "Lexer" not in proc.stdout
    assert proc.stdout.strip()
