"""Section g of the benchmark: fp32/bf16/fp16 specs, CUDA rules for the planned sizes, goals."""

from __future__ import annotations

from revseg.bench import precision

FULL = [160, 192, 160]
GIB = 2**30


def test_specs_cover_every_config_and_precision_planned_with_cuda_rules():
    specs = precision.specs([64, 96], [tuple(FULL)], steps=1, threads=1)
    n = len(precision.CONFIGS) * len(precision.PRECISIONS)
    assert len(specs) == 3 * n
    planned = [s for s in specs if s.plan_only]
    assert len(planned) == n and all("trainer.device=cuda" in s.overrides for s in planned)
    measured = [s for s in specs if not s.plan_only]
    assert not any("trainer.device=cuda" in s.overrides for s in measured)
    for p in precision.PRECISIONS:
        assert sum(f"trainer.precision={p}" in s.overrides for s in specs) == len(specs) // 3
    video = [s for s in specs if s.video]
    assert {tuple(s.size) for s in video} == {(16, 128, 128), (24, 192, 192), (72, 240, 424)}
    assert all(
        s.size[0] * s.size[1] * s.size[2] in (64**3, 96**3) for s in video if not s.plan_only
    )


def result(label: str, precision_: str, size: list[int], peak: float, time=None) -> dict:
    spec = {"section": "g", "label": f"{label} | {precision_}", "size": size}
    if label == "hyperbolic_blr":
        spec["video"] = True
    if time is None:
        return {"spec": {**spec, "plan_only": True}, "result": {"planned_peak_bytes": peak}}
    return {"spec": spec, "result": {"peak_bytes": peak, "step_time_s": time}}


def test_goals_are_computed_from_the_results():
    ref, ref4 = precision.REFERENCE, precision.REFERENCE_4
    results = [
        result(precision.P1, "bf16", FULL, 4.5 * GIB),
        result(precision.P1_LOW, "bf16", FULL, 2.7 * GIB),
        result(ref, "bf16", FULL, 4.8 * GIB),
        result(precision.P4_LOW, "bf16", FULL, 2.9 * GIB),
        result(ref4, "bf16", FULL, 6.0 * GIB),
        result(precision.P1, "fp32", [96] * 3, 1.0 * GIB, 10.0),
        result(precision.P1, "bf16", [96] * 3, 0.9 * GIB, 14.0),
        result(precision.P1_LOW, "bf16", [96] * 3, 0.6 * GIB, 14.0),
        result(ref, "bf16", [96] * 3, 0.75 * GIB, 10.0),
        result("hyperbolic_blr", "bf16", [24, 192, 192], 0.2 * GIB, 3.0),
    ]
    lines, goals = precision.report(results)
    by = {
        name.split(" at ")[0].removeprefix("g. ") + (" (planned)" if "planner" in name else ""):
        (value, met)
        for name, _, value, met in goals
    }  # fmt: skip
    assert by["prev_unet depth 1 bf16 peak, GiB (planned)"] == (4.5, False)
    assert by["prev_unet depth 1 bf16, low-precision states, peak, GiB (planned)"] == (2.7, True)
    key = "prev_unet depth 1, low-precision states / checkpointed baseline, bf16"
    value, met = by[key + " (planned)"]
    assert abs(value - 2.7 / 4.8) < 1e-12 and met
    value, met = by[key]  # measured at 96³
    assert abs(value - 0.6 / 0.75) < 1e-12 and met
    value, met = by[
        "prev_unet depth 4, low-precision states / 4-block checkpointed baseline, bf16 (planned)"
    ]
    assert abs(value - 2.9 / 6.0) < 1e-12 and met
    assert by["prev_unet depth 4 bf16 peak, GiB (planned)"] == (None, None)  # no result, no verdict
    value, met = by["prev_unet depth 1 bf16 / fp32"]
    assert abs(value - 0.9) < 1e-12 and not met
    value, met = by["prev_unet depth 1 bf16, low-precision states / fp32"]
    assert abs(value - 0.6) < 1e-12 and met
    value, met = by["prev_unet step time / checkpointed baseline, bf16"]
    assert abs(value - 1.4) < 1e-12 and not met
    table = "\n".join(lines)
    assert "| prev_unet depth 1 | bf16 | 0.90 GiB | – | 1.20 | 14.00 | 4.50 | 0.94 |" in table
    assert "| hyperbolic_blr | bf16 | 0.20 GiB | – | – | 3.00 | – | – |" in table  # beside 96³
