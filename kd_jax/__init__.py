"""kd_jax: knowledge distillation in JAX/Flax.

Subpackages:
  losses   pure loss functions over arrays (`from kd_jax import losses`)
  models   flax.linen teachers and students with named features
  distill  methods: how student/teacher outputs become one objective
  train    mesh, sharded jitted step, checkpoints, the `run` entry point
  data     datasets as deterministic functions of (seed, step)
"""
from kd_jax import losses  # noqa: F401  (the most reused surface)

__version__ = "0.1.0"
