"""Validation shared by the losses (clear errors at trace time) and zero-safe numerics."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def as_f32(x) -> jax.Array:
  """x as float32; raises TypeError for non-float input (integer logits are a caller bug)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def floating(x, *, what: str, name: str) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"{what}: {name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def same_shape(a, b, *, what: str, names: Sequence[str] = ("student", "teacher")) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(f"{what}: {names[0]} shape {jnp.shape(a)} and {names[1]} shape {jnp.shape(b)} must match")


def same_batch(a, b, *, what: str, names: Sequence[str] = ("student", "teacher")) -> None:
  if jnp.ndim(a) < 1 or jnp.ndim(b) < 1 or jnp.shape(a)[0] != jnp.shape(b)[0]:
    raise ValueError(f"{what}: {names[0]} shape {jnp.shape(a)} and {names[1]} shape {jnp.shape(b)} "
                     "must have the same batch size")


def rank(x, ranks: Sequence[int], *, what: str, name: str) -> None:
  if jnp.ndim(x) not in ranks:
    raise ValueError(f"{what}: {name} must have rank {' or '.join(map(str, ranks))}, got shape {jnp.shape(x)}")


def _concrete(value):
  """The value as numpy, or None when it is traced (unknowable until run time)."""
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value)


def positive(value, *, name: str, check: bool = False) -> None:
  """Checks concrete values (every element); a traced one (e.g. a learned temperature under jit) only with
  `check=True`, through `jax.experimental.checkify` (see `traced_check`)."""
  concrete = _concrete(value)
  if concrete is not None and concrete.size and not np.all(concrete > 0):
    raise ValueError(f"{name} must be > 0, got {concrete.min() if concrete.size > 1 else float(concrete)}")
  if check and concrete is None:
    traced_check(jnp.all(jnp.asarray(value) > 0), f"{name} must be > 0, got a minimum of {{value}}",
                 value=jnp.min(jnp.asarray(value)))


def traced_check(ok, message: str, **values) -> None:
  """A run-time check of traced values (`jax.experimental.checkify.check`): an eager call raises at once; a
  jitted function must be wrapped in `checkify.checkify` (whose error the caller throws), else JAX refuses
  to trace it, saying so. `message` may name `values` as `{name}`."""
  from jax.experimental import checkify

  checkify.check(ok, message, **values)


def not_nan(x, *, what: str, name: str, check: bool) -> None:
  """With `check=True`: x has no NaN and no +inf (−inf is allowed: a masked class); eager or checkified."""
  if check:
    x = jnp.asarray(x)
    bad = jnp.isnan(x) | (x == jnp.inf)
    traced_check(~jnp.any(bad), f"{what}: {name} has {{count}} NaN or +inf value(s)", count=jnp.sum(bad))


def scalar_or_batch(value, batch: int, *, what: str, name: str) -> None:
  """`value` is a scalar or a [batch] vector (per-example), nothing else: a [B, 1] would broadcast to [B, B]."""
  shape = jnp.shape(value)
  if shape not in ((), (batch,)):
    raise ValueError(f"{what}: {name} must be a scalar or per-example [B] = [{batch}], got shape {shape}")


def labels_in_range(labels, num_classes: int, *, what: str, check: bool = False) -> None:
  """Concrete labels are checked always, traced ones (under jit) only with `check=True` (see `traced_check`):
  unchecked, an out-of-range label under jit reads a clamped or filled value, a number with no error."""
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f"{what}: labels must be integers, got dtype {jnp.result_type(labels)}")
  values = _concrete(labels)
  if values is not None and values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got values from {values.min()} to {values.max()}")
  if check and values is None:
    labels = jnp.asarray(labels)
    traced_check(jnp.all((labels >= 0) & (labels < num_classes)),
                 f"{what}: labels must lie in [0, {num_classes}), got values from {{low}} to {{high}}",
                 low=jnp.min(labels), high=jnp.max(labels))


def safe_norm(x: jax.Array, axis=-1, keepdims: bool = False) -> jax.Array:
  """‖x‖₂ with a zero (not NaN) gradient at x = 0."""
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  nonzero = squared > 0
  # The inner where keeps sqrt's derivative away from 0 (double-where: no NaN flows back).
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis=-1) -> jax.Array:
  """x / ‖x‖₂ along `axis`; a zero vector stays zero, with finite (zero) gradients."""
  norm = safe_norm(x, axis=axis, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


def adaptive_avg_pool(x: jax.Array, height: int, width: int) -> jax.Array:
  """[B, H, W, C] -> [B, height, width, C], PyTorch's adaptive_avg_pool2d windows (exact for any sizes).

  Output cell i averages input rows floor(i·H/height) .. ceil((i+1)·H/height) − 1.
  """
  def weights(size, out):
    m = np.zeros((out, size), np.float32)
    for i in range(out):
      start, end = (i * size) // out, -((-(i + 1) * size) // out)
      m[i, start:end] = 1.0 / (end - start)
    return m

  _, h, w, _ = x.shape
  if (h, w) == (height, width):
    return x
  if height > h or width > w:
    raise ValueError(f"cannot pool spatial size {(h, w)} up to {(height, width)}")
  return jnp.einsum("bhwc,ih,jw->bijc", x, weights(h, height), weights(w, width))
