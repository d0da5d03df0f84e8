"""Temperatures of logit terms: fixed, scheduled over training (curriculum), or learned adversarially (CTKD).

A logit term's `temperature` option is one of
  4.0                                             a constant
  {"start": 1.0, "end": 8.0, "epochs": 100,       from `start` to `end` over `epochs` ("linear" or
   "shape": "linear"}                             "cosine"), then `end`
  {"learnable": True, "initial": 1.0,             CTKD (Li et al. 2023): a global temperature trained to
   "reversal_epochs": 10, "max_reversal": 1.0,    *increase* the distillation loss through a gradient-
   "minimum": 1.0, "maximum": 20.0}               reversal layer whose weight ramps (cosine) from 0 to
                                                  `max_reversal` over `reversal_epochs`; clipped to [minimum, maximum]
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp


@jax.custom_vjp
def reverse_gradient(x, weight):
  """Identity forward; multiplies the gradient by −weight backward (Ganin & Lempitsky 2015)."""
  return x


def _forward(x, weight):
  return x, weight


def _backward(weight, g):
  return (-weight * g, jnp.zeros_like(weight))


reverse_gradient.defvjp(_forward, _backward)


class Temperature:
  """Turns a term's `temperature` option into a value per step (and CTKD's param)."""

  def __init__(self, option: float | Mapping[str, Any]):
    if isinstance(option, (int, float)):
      if option <= 0:
        raise ValueError(f"temperature must be > 0, got {option}")
      self.option = {"start": float(option), "end": float(option), "epochs": 0}
    else:
      self.option = dict(option)
      unknown = set(self.option) - {"start", "end", "epochs", "shape", "learnable", "initial", "reversal_epochs",
                                    "max_reversal", "minimum", "maximum"}
      if unknown:
        raise ValueError(f"unknown temperature option(s) {sorted(unknown)}")
      if self.option.get("shape", "linear") not in ("linear", "cosine"):
        raise ValueError(f"temperature shape must be 'linear' or 'cosine', got {self.option['shape']!r}")
    self.learnable = bool(self.option.get("learnable", False))

  def init(self) -> dict[str, jax.Array]:
    return {"temperature": jnp.asarray(self.option.get("initial", 1.0), jnp.float32)} if self.learnable else {}

  def __call__(self, params, step: jax.Array, steps_per_epoch: int) -> jax.Array:
    epoch = step.astype(jnp.float32) / steps_per_epoch
    if self.learnable:
      ramp_epochs = self.option.get("reversal_epochs", 10)
      progress = jnp.clip(epoch / ramp_epochs, 0.0, 1.0) if ramp_epochs else 1.0
      weight = self.option.get("max_reversal", 1.0) * 0.5 * (1.0 - jnp.cos(jnp.pi * progress))
      value = reverse_gradient(params["temperature"], weight)
      return jnp.clip(value, self.option.get("minimum", 1.0), self.option.get("maximum", 20.0))
    start, end, epochs = self.option["start"], self.option["end"], self.option["epochs"]
    if not epochs:
      return jnp.asarray(start, jnp.float32)
    progress = jnp.clip(epoch / epochs, 0.0, 1.0)
    if self.option.get("shape", "linear") == "cosine":
      progress = 0.5 * (1.0 - jnp.cos(jnp.pi * progress))
    return start + (end - start) * progress
