"""revseg.bench.specs: specs as dataclasses, recorded in results.json as they always were."""

from __future__ import annotations

import json

import pytest

from revseg.bench.specs import NetSpec, SequenceSpec, size_title, spec_from_dict, three_sides

from conftest import REPO


def test_every_recorded_spec_reads_back_to_the_same_record():
    saved = json.loads((REPO / "docs" / "benchmarks" / "results.json").read_text())
    kinds = set()
    for record in saved["results"]:
        spec = spec_from_dict(record["spec"])
        kinds.add((type(spec), spec.section))
        assert json.dumps(spec.as_dict()) == json.dumps(record["spec"])  # same keys, same order
    assert {(SequenceSpec, "c"), (NetSpec, "e"), (NetSpec, "f")} <= kinds


@pytest.mark.parametrize(
    ("spec", "keys"),
    [
        (NetSpec("a", "x", [], [8] * 3, 1, None), []),
        (NetSpec("a", "x", [], [8] * 3, 1, None, plan_only=True), ["plan_only"]),
        (NetSpec("b", "x", [], [8] * 3, 1, 1, depth=2, memory_saving=False),
         ["depth", "memory_saving"]),
        (NetSpec("d", "x", [], [8] * 3, 1, 1, video=True, rank="4", layers=27),
         ["video", "rank", "layers"]),
        (NetSpec("e", "x", [], [8] * 3, 1, 1, design="d"),
         ["setting", "depth", "saving", "design", "switch", "zoo_setting", "zoo_note"]),
    ],
)  # fmt: skip
def test_a_record_holds_the_keys_its_section_uses(spec, keys):
    common = ["kind", "section", "label", "overrides", "size", "steps", "threads"]
    assert list(spec.as_dict()) == common + keys
    assert spec_from_dict(spec.as_dict()) == spec


def test_a_scripts_size_is_a_cube_or_a_box():
    assert three_sides([96]) == [96, 96, 96] and three_sides([160, 192, 160]) == [160, 192, 160]
    assert size_title([96, 96, 96]) == "96³" and size_title([160, 192, 160]) == "160x192x160"
    with pytest.raises(ValueError, match="one side or three"):
        three_sides([96, 96])
