"""Multi-host start-up: one process per host (TPU VM worker, GPU node)."""
from __future__ import annotations

import jax


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
