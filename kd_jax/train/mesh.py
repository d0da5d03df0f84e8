"""The device mesh and the placement of batches and state on it."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("replica", "data")


def make_mesh(*, replica: int = 1, data: int = -1, devices=None) -> Mesh:
  """A ("replica", "data") mesh; `data=-1` takes every device left over."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if replica < 1:
    raise ValueError(f"mesh.replica must be >= 1, got {replica}")
  if data == -1:
    if n % replica:
      raise ValueError(f"{n} devices cannot be split into {replica} replicas")
    data = n // replica
  if data < 1 or replica * data > n or (replica * data < n and jax.process_count() > 1):
    raise ValueError(
        f"mesh replica={replica} x data={data} = {replica * data} devices, but {n} are available; "
        f"set mesh.data=-1 or choose replica x data = {n}")
  # One process may run on fewer devices than it has (e.g. to compare device counts).
  return Mesh(np.asarray(devices[:replica * data]).reshape(replica, data), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(AXES))


def check_batch_size(batch_size: int, mesh: Mesh, *, what: str = "global batch size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
        f"{what} {batch_size} is not divisible by the {n} devices of the mesh; "
        f"use a multiple of {n} (e.g. {max(n, batch_size // n * n)})")


def local_rows(sharding: NamedSharding, global_rows: int) -> slice:
  """The rows of a batch-sharded global array that this process holds."""
  index_map = sharding.addressable_devices_indices_map((global_rows,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_rows if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return slice(min(starts), max(stops))


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Places a global host batch: each process contributes the rows its devices hold."""
  out = {}
  for key, value in batch.items():
    rows = local_rows(sharding, value.shape[0])
    out[key] = jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
  return out
