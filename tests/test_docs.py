"""The documentation: the config-key page is what configs/ says, every command is documented,
the README stays short and its links resolve."""

from __future__ import annotations

import re

import tomllib

from helpers import run_python

from conftest import REPO


def test_the_config_key_page_is_up_to_date():
    proc = run_python("scripts/config_reference.py", "--check")
    assert proc.returncode == 0, proc.stderr


def test_every_config_key_is_on_the_page():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "scripts/config_reference.py"
    )
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    page = (REPO / "docs/reference/config-keys.md").read_text()
    for group in (REPO / "configs").iterdir():
        if group.is_dir() and group.name not in ref.PRESETS:
            for path in group.glob("*.yaml"):
                for key, _, _ in ref.keys(path):
                    assert f"`{group.name}.{key}`" in page, (path, key)


def test_every_command_is_documented():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    page = (REPO / "docs/reference/command-line.md").read_text()
    for command in scripts:
        assert f"`{command}`" in page, command


def test_the_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target
