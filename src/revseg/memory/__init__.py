"""revseg.memory: measuring and planning the memory of training.

:mod:`~revseg.memory.tracker` is the one storage ledger (a ``TorchDispatchMode``); the CPU peak
meter (:mod:`~revseg.memory.measure`) and the planner's tracer (:mod:`~revseg.memory.trace`) are
built on it; :mod:`~revseg.memory.plan` plans a config or a run.
"""

from revseg.memory.measure import (
    MemoryMeasurement,
    PeakMemoryMeter,
    SavedTensorsCounter,
    format_bytes,
    live_tensor_bytes,
    rss_peak_bytes,
)

__all__ = [
    "MemoryMeasurement",
    "PeakMemoryMeter",
    "SavedTensorsCounter",
    "format_bytes",
    "live_tensor_bytes",
    "rss_peak_bytes",
]
