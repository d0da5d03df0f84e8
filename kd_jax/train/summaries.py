"""TensorBoard summaries of a run: scalars per step (train metrics, learning rate, temperatures, images/s)
and per epoch (eval figures), written by process 0 only, asynchronously.

Through tensorboardX (no TensorFlow): its event writer queues each event and a background thread writes and
flushes the file, so `scalars` costs the step a conversion to float and a queue put. Open them with
`tensorboard --logdir=<workdir>` (pip install tensorboard; it needs no TensorFlow either).

  summaries = Summaries(os.path.join(workdir, row_name))
  summaries.scalars(step, {"train/loss": 0.31, "train/lr": 0.05, "train/images_per_s": 5120.0})
  summaries.scalars(step, {"eval/test_accuracy": 0.981, "eval/epoch": 3})
  summaries.close()

Tag names are the caller's; the loop's convention is `train/<metric>`, `train/lr`,
`train/temperature/<term>`, `train/images_per_s` per logged step and `eval/<figure>` per epoch.
"""
from __future__ import annotations

import contextlib
import glob
import os
import struct
import sys
from typing import Any, Iterator, Mapping

import numpy as np


@contextlib.contextmanager
def _without_torch():
  """Imports tensorboardX without torch: it imports torch when installed (seconds) only to accept torch
  tensors, which these scalars never are."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
  try:
    yield
  finally:
    if blocked:
      del sys.modules["torch"]


def _summary_writer_class():
  with _without_torch():
    from tensorboardX import SummaryWriter
  return SummaryWriter


class Summaries:
  """Writes scalars to TensorBoard event files under `logdir`; a no-op on processes other than 0.

  Args:
    logdir: the directory of the event files (created); "" or None: nothing is written.
    process_index: this process's index (default: `jax.process_index()`); only process 0 writes.
    flush_secs: the background writer flushes at least this often (and on `flush` / `close`).
  """

  def __init__(self, logdir: str | os.PathLike | None, *, process_index: int | None = None,
               flush_secs: float = 30.0, max_queue: int = 1000):
    if process_index is None:
      import jax

      process_index = jax.process_index()
    self.logdir = os.fspath(logdir) if logdir else ""
    self.active = bool(self.logdir) and process_index == 0
    self._writer = None
    if self.active:
      self._writer = _summary_writer_class()(self.logdir, flush_secs=flush_secs, max_queue=max_queue)

  def scalars(self, step: int, values: Mapping[str, Any], *, walltime: float | None = None) -> None:
    """Queues one event per `values` item (a Python or NumPy/JAX scalar, host side) at `step`.

    A non-scalar value is an error naming its tag; non-finite values are written as they are (TensorBoard
    shows NaN and inf), so a diverging run is visible.
    """
    if not self.active:
      return
    if self._writer is None:
      raise RuntimeError(f"Summaries({self.logdir!r}) is closed")
    step = int(step)
    for tag, value in values.items():
      array = np.asarray(value)
      if array.size != 1:
        raise ValueError(f"summary {tag!r} must be a scalar, got shape {array.shape}")
      self._writer.add_scalar(str(tag), float(array.reshape(())), global_step=step, walltime=walltime)

  def flush(self) -> None:
    """Asks the background writer to write the queued events (it may finish after this returns; `close`
    waits for them)."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file; later `scalars` calls are an error. Idempotent."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "Summaries":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _records(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file (length, its CRC, data, its CRC); a truncated last record ends it."""
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        return
      yield data


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """Reads back the scalars of every event file under `logdir` (tests, notebooks): {tag: [(step, value)]}
  in file and write order."""
  with _without_torch():
    from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(os.fspath(logdir), "**", "events.out.tfevents.*"), recursive=True)):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return out

