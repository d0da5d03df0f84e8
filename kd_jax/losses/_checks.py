"""Validation shared by the losses: clear errors at trace time, float32 computation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_f32(x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def same_shape(a, b, *, what: str, names=("student", "teacher")) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(f"{what}: {names[0]} shape {jnp.shape(a)} and {names[1]} shape {jnp.shape(b)} must match")


def rank(x, ranks, *, what: str, name: str) -> None:
  if jnp.ndim(x) not in ranks:
    raise ValueError(f"{what}: {name} must have rank {' or '.join(map(str, ranks))}, got shape {jnp.shape(x)}")


def positive(value, *, name: str) -> None:
  """Checks Python numbers only (a traced value, e.g. a learned temperature, cannot be checked)."""
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def labels_in_range(labels, num_classes: int, *, what: str) -> None:
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{what}: labels must be integers, got dtype {labels.dtype}")
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got values from {values.min()} to {values.max()}")


def l2_normalize(x: jax.Array, axis=-1, eps: float = 1e-12) -> jax.Array:
  """x / max(‖x‖, eps): a zero vector stays zero, with finite gradients."""
  # max inside the sqrt: finite gradients at zero as well.
  norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps * eps))
  return x / norm
