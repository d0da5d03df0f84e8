"""Workdir files through `etils.epath`: a local path and a `gs://bucket/...` path work alike.

Writes are atomic: a local file is written beside its target and renamed over it; a Cloud Storage object
appears only when its upload completes. Shared files (metrics, results, model descriptions) are written by
process 0 alone (`shared=True`, the default), which every process can then read after a `barrier`.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterable

import jax
from etils import epath

PathLike = str | os.PathLike


def path(value: PathLike) -> epath.Path:
  """`value` as an epath.Path; a local path made absolute (orbax needs absolute local paths)."""
  p = epath.Path(value)
  return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def is_remote(value: PathLike) -> bool:
  """Whether `value` names an object store (gs://, s3://, ...) rather than a local file."""
  return "://" in os.fspath(value)


def is_primary() -> bool:
  """Whether this process writes the shared files (process 0)."""
  return jax.process_index() == 0


def exists(value: PathLike) -> bool:
  return path(value).exists()


def makedirs(value: PathLike) -> epath.Path:
  """Creates the directory `value` and its parents (a no-op on object stores without directories)."""
  p = path(value)
  p.mkdir(parents=True, exist_ok=True)
  return p


def read_text(value: PathLike) -> str:
  return path(value).read_text()


def read_json(value: PathLike) -> Any:
  return json.loads(read_text(value))


def read_lines(value: PathLike) -> list[str]:
  """The non-empty lines of a text file ([] if it does not exist)."""
  p = path(value)
  if not p.exists():
    return []
  return [line for line in p.read_text().splitlines() if line.strip()]


def write_text(value: PathLike, text: str, *, shared: bool = True) -> None:
  """Writes `text` to `value` atomically (only on process 0 when `shared`)."""
  if shared and not is_primary():
    return
  p = path(value)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):  # an object is replaced whole when its upload completes
    p.write_text(text)
    return
  tmp = p.parent / f".{p.name}.{uuid.uuid4().hex}.tmp"
  try:
    tmp.write_text(text)
    os.replace(tmp, p)  # atomic on a POSIX filesystem
  finally:
    if tmp.exists():
      tmp.unlink()


def write_json(value: PathLike, obj: Any, *, shared: bool = True) -> None:
  """`obj` as indented, key-sorted JSON, written atomically (only on process 0 when `shared`)."""
  write_text(value, json.dumps(obj, indent=2, sort_keys=True) + "\n", shared=shared)


def write_lines(value: PathLike, lines: Iterable[str], *, shared: bool = True) -> None:
  """Replaces the file with `lines` (each without its newline), atomically: e.g. metrics.jsonl cut back on
  resume."""
  lines = list(lines)
  write_text(value, "".join(line + "\n" for line in lines), shared=shared)


def append_json_line(value: PathLike, record: Any, *, shared: bool = True) -> None:
  """Appends `record` as one JSON line (only on process 0 when `shared`).

  A local file is appended to; an object store has no append, so the object is rewritten whole (fine for
  the metrics of a run: one line every `log_every_steps` steps).
  """
  if shared and not is_primary():
    return
  line = json.dumps(record, sort_keys=True) + "\n"
  p = path(value)
  if is_remote(p):
    write_text(p, (p.read_text() if p.exists() else "") + line, shared=False)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  with p.open("a") as f:
    f.write(line)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (e.g. after process 0 wrote model.json, before
  the others read it); a no-op on one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
