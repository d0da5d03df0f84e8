"""The device mesh and the placement of batches and state on it."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kd_jax.train.config import ConfigError

AXES = ("replica", "data")


def make_mesh(*, replica: int = 1, data: int = -1, devices=None) -> Mesh:
  """A ("replica", "data") mesh; `data=-1` takes every device left over."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if replica < 1:
    raise ConfigError(f"mesh.replica must be >= 1, got {replica}")
  if data == -1:
    if n % replica:
      raise ConfigError(f"{n} devices cannot be split into {replica} replicas")
    data = n // replica
  if data < 1 or replica * data > n or (replica * data < n and jax.process_count() > 1):
    raise ConfigError(
        f"mesh replica={replica} x data={data} = {replica * data} devices, but {n} are available; "
        f"set mesh.data=-1 or choose replica x data = {n}")
  # One process may run on fewer devices than it has (e.g. to compare device counts).
  return Mesh(np.asarray(devices[:replica * data]).reshape(replica, data), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(AXES))


def check_batch_size(batch_size: int, devices: int, *, what: str = "global batch size", axis: str = "") -> None:
  """A batch split over `devices` must divide evenly."""
  if batch_size % devices:
    where = f"the {devices} devices of mesh axis {axis!r}" if axis else f"the {devices} devices of the mesh"
    raise ConfigError(f"{what} {batch_size} is not divisible by {where}; "
                     f"use a multiple of {devices} (e.g. {max(devices, batch_size // devices * devices)})")


def local_block(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The block of a global array (a slice per axis) that this process's devices hold."""
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  block = []
  for axis, size in enumerate(global_shape):
    starts = [idx[axis].start or 0 for idx in index_map.values()]
    stops = [size if idx[axis].stop is None else idx[axis].stop for idx in index_map.values()]
    block.append(slice(min(starts), max(stops)))
  return tuple(block)


def put_local(local: dict[str, np.ndarray], sharding: NamedSharding, leading_shape: tuple[int, ...]):
  """Global arrays from this process's block of each (leading axes of the global shape given)."""
  return {key: jax.make_array_from_process_local_data(sharding, value, tuple(leading_shape) + value.shape[
      len(leading_shape):]) for key, value in local.items()}


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Places a global host batch: each process contributes only the block its devices hold."""
  out = {}
  for key, value in batch.items():
    block = local_block(sharding, value.shape)
    out[key] = jax.make_array_from_process_local_data(sharding, value[block], value.shape)
  return out
