"""Every model config has a test class built on the shared tester."""

from pathlib import Path

from revseg.config import group_options

import model_tester


def test_every_model_config_is_tested():
    tested = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        text = path.read_text()
        tested.update(
            line.split("=", 1)[1].strip().strip("\"'")
            for line in text.splitlines()
            if line.strip().startswith("config_name =")
        )
    assert set(group_options("model")) <= tested, set(group_options("model")) - tested
    assert model_tester.ModelTester.config_name == ""
