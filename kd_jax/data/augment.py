"""On-device normalisation and augmentation, inside the jitted step.

Random draws use global shapes, so with JAX's partitionable threefry they do not
depend on how the batch is sharded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigError

KINDS = ("none", "jitter", "crop_flip")


def normalize(images: jax.Array, *, scale: float, mean, std) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 (x * scale - mean) / std per channel."""
  x = images.astype(jnp.float32) * scale
  mean = jnp.asarray(mean, jnp.float32).reshape((1, 1, 1, -1))
  std = jnp.asarray(std, jnp.float32).reshape((1, 1, 1, -1))
  return (x - mean) / std


def _translate(rng, images, max_shift):
  """Shifts each image by an independent integer offset in [-max_shift, max_shift], zero fill."""
  b, h, w, _ = images.shape
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def augment(rng: jax.Array, images: jax.Array, *, kind: str, max_shift: int = 2) -> jax.Array:
  """Random augmentation of a float batch [B, H, W, C].

  kind: "none"; "jitter" (shift up to `max_shift` pixels, Hinton et al. 2015's
  MNIST teacher); "crop_flip" (CIFAR: 4-pixel padded random crop + horizontal flip).
  """
  if kind == "none":
    return images
  if kind == "jitter":
    return _translate(rng, images, max_shift)
  if kind == "crop_flip":
    crop_rng, flip_rng = jax.random.split(rng)
    images = _translate(crop_rng, images, 4)
    flip = jax.random.bernoulli(flip_rng, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)

  raise ConfigError(f"unknown augmentation {kind!r}; known: {KINDS}")
