"""A run's one hparams session in TensorBoard (see :func:`write_hparams`)."""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from revseg.files import write_bytes_atomic

__all__ = ["HPARAMS_SUFFIX", "write_hparams"]

HPARAMS_SUFFIX = ".hparams"
"""End of the name of the event file that holds a run's hparams session."""


def write_hparams(
    log_dir: str | os.PathLike,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, float],
    step: int = 0,
) -> Path:
    """Write the run's one hparams session into ``log_dir``, replacing any it held.

    TensorBoard's HPARAMS tab keys a session by the run (the folder) whose event files hold its
    start summary, and shows each metric's last value in that run. ``SummaryWriter.add_hparams``
    appends a new start summary and new metric values on each call, so a resumed run had two.
    Here the session is one event file of its own, ``events.out.tfevents.<time>.<host>.hparams``,
    written whole (atomically) and then the previous one deleted: the folder holds one session
    whose metrics are those of the last call, and a TensorBoard started later reads only it.

    Args:
        log_dir: the run's TensorBoard folder (the run directory).
        hparams: name -> bool, int, float or str.
        metrics: ``hparam/<name>`` -> value, logged as scalars at ``step``.
        step: the step of the metric values (the epochs completed).

    Returns:
        The event file written.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries
    from torch.utils.tensorboard.summary import scalar

    log_dir = Path(log_dir)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}{HPARAMS_SUFFIX}"
    records = io.BytesIO()
    writer = RecordWriter(records)  # TFRecord framing: lengths and masked CRC32C
    writer.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    summaries = list(hparams_summaries(dict(hparams), dict(metrics)))
    summaries += [scalar(tag, float(value)) for tag, value in metrics.items()]
    for summary in summaries:
        writer.write(Event(wall_time=now, step=step, summary=summary).SerializeToString())
    path = write_bytes_atomic(records.getvalue(), log_dir / name)
    for old in log_dir.glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"):
        if old != path:
            old.unlink(missing_ok=True)
    return path
