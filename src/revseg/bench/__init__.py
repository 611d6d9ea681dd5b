"""Benchmark specifications and reports, run by ``scripts/bench.py`` (one process per
configuration). :mod:`revseg.bench.fov` is the headline: memory and time at the full field of
view against gradient checkpointing."""
