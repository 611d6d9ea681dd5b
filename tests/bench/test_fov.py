"""Section f of the benchmark: the specs it runs and the goals its report computes."""

from __future__ import annotations

from revseg.bench import fov

FULL = [160, 192, 160]


def test_specs_cover_every_config_measured_and_planned():
    specs = fov.specs([64, 96], [tuple(FULL)], steps=2, threads=1)
    assert len(specs) == 3 * len(fov.CONFIGS)
    labels = {s.label for s in specs}
    assert labels == {c.label for c in fov.CONFIGS}
    assert {fov.REFERENCE, "prev_unet depth 4", "hybrid_revnet"} <= labels
    planned = [s for s in specs if s.plan_only]
    assert len(planned) == len(fov.CONFIGS) and all(s.size == FULL for s in planned)
    assert all(s.section == "f" and s.kind == "net" for s in specs)
    assert planned[0].as_dict()["plan_only"] and "plan_only" not in specs[0].as_dict()
    tiny = fov.specs([16], [], steps=1, threads=1, tiny=True)
    assert all(set(c.tiny) <= set(s.overrides) for c, s in zip(fov.CONFIGS, tiny))


def result(label: str, size: list[int], peak: float, time: float | None = None) -> dict:
    spec = {
        "section": "f",
        "label": label,
        "size": size,
        **({"plan_only": True} if not time else {}),
    }
    res = {"planned_peak_bytes": peak} if not time else {"peak_bytes": peak, "step_time_s": time}
    return {"spec": spec, "result": res}


def test_goals_are_computed_from_the_results():
    gib = 2**30
    planned = {
        "prev_unet depth 1": 4.7 * gib,
        "prev_unet depth 1, chunks off": 5.4 * gib,
        "prev_unet depth 4": 5.0 * gib,
        fov.REFERENCE: 4.75 * gib,
        "unet_baseline 4 encoder blocks, checkpointing": 7.2 * gib,
    }
    results = [result(label, FULL, peak) for label, peak in planned.items()]
    results += [result("prev_unet depth 1", [64] * 3, 0.4 * gib, 13.0)]
    results += [result(fov.REFERENCE, [64] * 3, 0.38 * gib, 10.0)]
    lines, goals = fov.report(results)
    by = {name.split(" at ")[0].removeprefix("f. "): (value, met) for name, _, value, met in goals}
    assert by["prev_unet depth 1, chunks off / checkpointed baseline"] == (5.4 / 4.75, True)
    assert by["prev_unet depth 1 (chunks auto) / checkpointed baseline"] == (4.7 / 4.75, True)
    value, met = by["prev_unet depth 4 / baseline with 4 encoder blocks, checkpointing"]
    assert abs(value - 5.0 / 7.2) < 1e-12 and met
    value, met = by["prev_unet depth 4 peak, GB"]
    assert abs(value - 5.0 * gib / 1e9) < 1e-9 and met  # 5.37 GB <= 5.5
    value, met = by["prev_unet peak depth 4 / depth 1"]
    assert abs(value - 5.0 / 4.7) < 1e-12 and not met
    assert by["prev_unet step time / checkpointed baseline"] == (1.3, False)
    table = "\n".join(lines)
    assert "| prev_unet depth 1 | 0.40 | – | 1.053 | 13.00 | 4.70 | 0.989 |" in table
    assert "| hybrid_revnet | – | – | – | – | – | – |" in table  # no result: dashes, no error


def test_missing_results_give_no_verdict():
    _, goals = fov.report([])
    assert goals and all(value is None and met is None for _, _, value, met in goals)
