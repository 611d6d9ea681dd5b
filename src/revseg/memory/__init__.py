"""revseg.memory: measuring the memory of training (peak tensor bytes, saved activations)."""

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
