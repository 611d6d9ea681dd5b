"""Installable like a library: the wheel ships the configs, console commands, a user config dir."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from revseg.config import CONFIG_DIR, check_group_overrides, compose_config

from conftest import REPO

BIN = Path(sys.executable).parent
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_the_package_list_names_every_package():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(REPO / "src").parts)
        for p in (REPO / "src" / "revseg").rglob("__init__.py")
    }
    assert set(declared["packages"]) == found | {"revseg.configs"}
    assert declared["package-dir"]["revseg.configs"] == "configs"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: no build/ or egg-info left in the checkout
    for name in ("src", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # offline: the build backend of this environment (CI builds with isolation, see .ci/run)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next(out.glob("revseg-*.whl"))


def test_the_wheel_ships_the_configs_and_the_commands(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    shipped = {f"revseg/configs/{p.relative_to(CONFIG_DIR)}" for p in CONFIG_DIR.rglob("*.yaml")}
    assert shipped and shipped <= names
    for command in ("train", "predict", "evaluate", "plan", "doctor"):
        assert f"revseg-{command} = revseg.cli.{command}:run" in entry_points
    assert "revseg-gpu-validate = revseg.bench.gpu_validate:run" in entry_points
    # installed (not editable) and imported from elsewhere, it finds its own configs
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    code = "import revseg.config as c; print(c.CONFIG_DIR)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == str(target / "revseg" / "configs")


@pytest.fixture
def user_configs(tmp_path) -> Path:
    (tmp_path / "model").mkdir()
    mine = (CONFIG_DIR / "model" / "prev_unet.yaml").read_text()
    (tmp_path / "model" / "mine.yaml").write_text(
        mine.replace("norm_groups:", "# mine\nnorm_groups:")
    )
    return tmp_path


def test_a_user_config_dir_adds_options(user_configs):
    search = [str(user_configs)]
    check_group_overrides(["model=mine"], CONFIG_DIR, search)
    cfg = compose_config("train", ["model=mine"], require=False, search=search)
    assert cfg.model._target_.endswith("PartiallyReversibleUNet")
    with pytest.raises(Exception, match="model=mine: no such option"):
        check_group_overrides(["model=mine"], CONFIG_DIR)


def test_console_command_with_a_user_config_dir(user_configs, tmp_path):
    # composed by Hydra with the user's option: the run fails on the value given, in one line
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "revseg-train"), "--config-dir", str(user_configs), "model=mine",
         "trainer.max_epochs=0", f"hydra.run.dir={run}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.max_epochs must be a positive int, got 0"
    ]
    assert not run.exists()


def test_torch_range_is_the_one_the_code_needs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    spec = next(d for d in project["dependencies"] if d.startswith("torch"))
    # torch.nn.utils.get_total_norm came in 2.6, torch.get_autocast_dtype in 2.4
    assert spec == "torch>=2.6,<3"
    # the Makefile's CUDA install (machines with an NVIDIA driver) asks for the same range
    assert f'pip install "{spec}"' in (REPO / "Makefile").read_text()
    import torch

    assert hasattr(torch.nn.utils, "get_total_norm") and hasattr(torch, "get_autocast_dtype")
