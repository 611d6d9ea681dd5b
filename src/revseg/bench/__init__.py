"""The benchmark behind ``scripts/bench.py`` (its command line): :mod:`~revseg.bench.specs` (what
each process runs, as dataclasses), :mod:`~revseg.bench.runner` (one fresh process per spec),
:mod:`~revseg.bench.report` (``README.md``, the goals as data) and :mod:`~revseg.bench.plots`.
:mod:`revseg.bench.fov` is the headline: memory and time at the full field of view against
gradient checkpointing."""
