"""revseg.bench.report: the goals are data, the verdicts come from their limits."""

from __future__ import annotations

from revseg.bench import report


def _run(label: str, size: int, peak: float, time: float) -> dict:
    spec = {"section": "a", "label": label, "size": [size] * 3}
    result = {"peak_bytes": peak, "step_time_s": time, "params": 10, "voxels": size**3}
    return {"spec": spec, "result": result}


META = {
    "command": "python scripts/bench.py",
    "date": "today",
    "wall_s": 1.0,
    "load_start": None,
    "load_end": None,
    "machine": {
        "cpu": "cpu",
        "cores": 1,
        "device": "cpu",
        "platform": "linux",
        "python": "3",
        "versions": {"torch": "2", "revseg": "0", "memcnn": "-", "revlib": "-"},
    },
    "memory_method": "cpu_tensor_tracker",
    "threads": 1,
}


def test_goal_rows_follow_the_limits_in_goals():
    results = [
        _run("prev_unet", 64, 40.0, 1.3),
        _run("prev_unet (memory saving off)", 64, 100.0, 1.0),
        _run("unet_baseline", 64, 100.0, 1.0),
    ]
    text, values = report.report(results, META)
    assert values == {"a_peak_ratio_64": 0.4, "a_time_ratio_64": 1.3, "a_peak_on_off_64": 0.4}
    limit = report.GOALS["a_peak"].limit
    assert limit == 0.45
    assert "| a. peak reversible / baseline at 64³ | <= 0.45 (paper 0.62) | 0.400 | met |" in text
    assert "| a. step time memory saving on / off at 64³ | <= 1.35 (paper 1.5) | 1.300 | met |" in (
        text
    )
    assert "| a. peak memory saving on / off at 64³ | (info) | 0.400 | – |" in text
    slow = [_run("prev_unet", 64, 50.0, 2.0), *results[1:]]
    text, _ = report.report(slow, META)
    assert "| 0.500 | **missed** |" in text and "| 2.000 | **missed** |" in text
