"""The device mesh and the placement of batches and state on it."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kd_jax.train.config import ConfigError

AXES = ("replica", "data")


class MeshError(ValueError):
  """A device layout the training code cannot use (names the mesh axis and the processes involved)."""


def make_mesh(*, replica: int = 1, data: int = -1, devices=None) -> Mesh:
  """A ("replica", "data") mesh; `data=-1` takes every device left over.

  The device order is `jax.make_mesh`'s (topology-aware on TPU: rings along the axes), with Auto axes (the
  shardings are named explicitly everywhere). Each process must hold one contiguous block of the mesh
  (`check_process_blocks`): a process reads only its rows of each batch.
  """
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
  mesh = jax.make_mesh((replica, data), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices[:replica * data])
  check_process_blocks(mesh)
  return mesh


def _runs(positions: list[int]) -> bool:
  """Whether sorted `positions` are consecutive integers."""
  return positions == list(range(positions[0], positions[0] + len(positions)))


def check_process_blocks(mesh: Mesh) -> None:
  """Raises MeshError unless each process's devices are one contiguous run along "data" in every
  replica row it has, and one contiguous run of the flattened ("replica", "data") order (the eval batch)."""
  grid = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  for process in np.unique(grid):
    flat = [int(i) for i in np.flatnonzero(grid.ravel() == process)]
    if not _runs(flat):
      raise MeshError(
          f"process {process} holds mesh positions {flat} of {grid.size} in ('replica', 'data') order, not one "
          "contiguous block: each process must hold one contiguous slice of the batch (device order "
          f"by process: {grid.tolist()})")
    for row in range(grid.shape[0]):
      cols = [int(i) for i in np.flatnonzero(grid[row] == process)]
      if cols and not _runs(cols):
        raise MeshError(f"process {process} holds positions {cols} of mesh axis 'data' in replica {row}, not a "
                        f"contiguous share (device order by process: {grid.tolist()})")


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
  """The block of a global array (a slice per axis) that this process's devices hold.

  Raises MeshError if this process's shards do not tile one block (interleaved devices): a block read from
  the host would then put other processes' rows on its devices.
  """
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  tiles = {tuple((idx.start or 0, size if idx.stop is None else idx.stop) for idx, size in zip(index, global_shape))
           for index in index_map.values()}
  block = tuple(slice(min(t[axis][0] for t in tiles), max(t[axis][1] for t in tiles))
                for axis in range(len(global_shape)))
  volume = lambda spans: int(np.prod([stop - start for start, stop in spans]))
  if sum(volume(t) for t in tiles) != volume([(b.start, b.stop) for b in block]):
    raise MeshError(
        f"process {jax.process_index()}'s shards of an array of shape {tuple(global_shape)} ({sorted(tiles)}) do not "
        f"form one contiguous block over {sharding.spec}: order the mesh's devices so that each process holds "
        "one contiguous share of the 'data' axis")
  return block


def padded_size(batch_size: int, devices: int) -> int:
  """The smallest multiple of `devices` that holds `batch_size` examples (an evaluation batch of any size)."""
  if batch_size < 1 or devices < 1:
    raise ValueError(f"padded_size needs batch_size >= 1 and devices >= 1, got {batch_size} and {devices}")
  return -(-batch_size // devices) * devices


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """`batch` zero-padded along its leading axis to `size` rows, with "mask" [size] float32: the batch's own
  mask (1 where absent) on its rows, 0 on the padding, so masked sums count every example once."""
  rows = {value.shape[0] for value in batch.values()}
  if len(rows) != 1:
    raise ValueError(f"pad_batch: the arrays of a batch need one leading size, got {sorted(rows)}")
  (n,) = rows
  if size < n:
    raise ValueError(f"pad_batch: cannot pad a batch of {n} examples to {size}")
  mask = np.asarray(batch.get("mask", np.ones(n, np.float32)), np.float32)
  out = {key: np.concatenate([value, np.zeros((size - n,) + value.shape[1:], value.dtype)])
         for key, value in batch.items() if key != "mask"}
  out["mask"] = np.concatenate([mask, np.zeros(size - n, np.float32)])
  return out


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
