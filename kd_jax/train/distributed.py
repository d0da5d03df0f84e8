"""Multi-host start-up: one process per host (TPU VM worker, GPU node)."""
from __future__ import annotations

import collections

import jax
import numpy as np


def initialize(*, multihost: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` when asked; a no-op for a single process.

  On TPU VMs and SLURM/Kubernetes GPU clusters `multihost=True` lets JAX detect
  the cluster. Elsewhere (e.g. several CPU processes on one machine) pass the
  coordinator address, the process count and this process's id; CPU processes
  exchange data through gloo collectives.
  """
  manual = coordinator_address is not None or num_processes is not None or process_id is not None
  if manual:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError("a manual multi-process start needs coordinator_address, num_processes and process_id")
    if jax.config.jax_platforms in (None, "", "cpu") or jax.config.jax_platforms.startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif multihost:
    jax.distributed.initialize()


class DispatchLimit:
  """Keeps at most `depth` dispatched steps unfinished: call it with each step's outputs.

  Why: jitted steps are dispatched asynchronously, so a loop that reads no result for many steps
  (hinton_mnist's 469 steps an epoch, metrics every 100) queues them all. On several CPU processes
  (gloo collectives) XLA:CPU then deadlocks once some 32-64 steps are queued per device: the
  per-device launches of one step wait on the device's in-flight semaphore, held by later steps
  that wait on that step, while the other devices sit in its all-reduce. Waiting for the step
  `depth` back keeps the devices busy (the next steps are queued) and the queue short.
  """

  def __init__(self, depth: int = 2):
    if depth < 1:
      raise ValueError(f"DispatchLimit depth must be >= 1, got {depth}")
    self.depth = depth
    self._pending: collections.deque = collections.deque()

  def __call__(self, outputs) -> None:
    self._pending.append(outputs)
    while len(self._pending) > self.depth:
      jax.block_until_ready(self._pending.popleft())


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (the same answer on every process); `flag` itself on one process.

  For decisions all hosts must take at the same step, e.g. stopping after a SIGTERM that reached only some
  of them: every process calls it at the same steps (say every few steps, as it waits for all of them),
  and all stop, checkpoint and exit together.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
