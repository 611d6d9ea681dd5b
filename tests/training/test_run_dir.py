"""A run directory holds one run at a time; a fresh run does not replace another's checkpoints
(issue 22, items 1 and 2)."""

from __future__ import annotations

import os
import socket

import pytest

from revseg.errors import ConfigError
from revseg.training.run_dir import check_fresh_run, claim_run_dir


def test_a_second_run_in_the_directory_is_refused_naming_the_holder(tmp_path):
    with claim_run_dir(tmp_path):
        with pytest.raises(ConfigError) as info, claim_run_dir(tmp_path):
            pass
        message = str(info.value)
        assert message.startswith(
            f"{tmp_path} is in use by process {os.getpid()} on {socket.gethostname()} since "
        )
        assert message.endswith("give this one another directory (hydra.run.dir=...)")
    with claim_run_dir(tmp_path):  # released when the first run ended
        pass


def test_a_fresh_run_does_not_replace_checkpoints(tmp_path):
    check_fresh_run(tmp_path, resume=False, overwrite=False)  # an empty directory
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds a run \\(checkpoints/last.pt\\)"):
        check_fresh_run(tmp_path, resume=False, overwrite=False)
    check_fresh_run(tmp_path, resume=True, overwrite=False)
    check_fresh_run(tmp_path, resume="other/last.pt", overwrite=False)
    check_fresh_run(tmp_path, resume=False, overwrite=True)
