"""Temperatures of logit terms: fixed, scheduled over training (curriculum), or learned adversarially (CTKD).

A logit term's `temperature` option is one of
  4.0                                             a constant
  {"start": 1.0, "end": 8.0, "epochs": 100,       from `start` to `end` over `epochs` ("linear" or
   "shape": "linear"}                             "cosine"), then `end`
  {"learnable": True, "t_start": 1.0,             CTKD (Li et al. 2023), as its code (zhengli97/CTKD):
   "t_end": 20.0, "initial": 1.0,                 T = t_start + t_end · sigmoid(g), g a global parameter
   "reversal_epochs": 10, "max_reversal": 1.0}    initialised to `initial` (T ≈ 15.6 at the start), trained
                                                  to *increase* the distillation loss through a gradient-
                                                  reversal layer on g whose weight λ follows the code's
                                                  per-epoch cosine, λ(e) = max_reversal · (1 − cos(π·min(e, N)/N)) / 2
                                                  with epochs e counted from 1 and N = reversal_epochs.
                                                  Never clipped; g gets the row's weight decay like every
                                                  param, as CTKD's SGD applies it to the temperature module too.
The learned value is logged as `temperature/<term>` in metrics.jsonl.
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
      learned = {"learnable", "t_start", "t_end", "initial", "reversal_epochs", "max_reversal"}
      unknown = set(self.option) - {"start", "end", "epochs", "shape"} - learned
      if unknown:
        raise ValueError(f"unknown temperature option(s) {sorted(unknown)}; a schedule takes start, end, epochs, "
                         f"shape; a learned (CTKD) temperature takes {sorted(learned)}")
      if self.option.get("shape", "linear") not in ("linear", "cosine"):
        raise ValueError(f"temperature shape must be 'linear' or 'cosine', got {self.option['shape']!r}")
    self.learnable = bool(self.option.get("learnable", False))

  def init(self) -> dict[str, jax.Array]:
    """CTKD's raw parameter g (its `Global_T`, torch.ones(1) in the code); nothing for a fixed schedule."""
    return {"temperature": jnp.asarray(self.option.get("initial", 1.0), jnp.float32)} if self.learnable else {}

  def learned(self, raw: jax.Array) -> jax.Array:
    """T = t_start + t_end · sigmoid(g): always within (t_start, t_start + t_end), with a gradient everywhere."""
    return self.option.get("t_start", 1.0) + self.option.get("t_end", 20.0) * jax.nn.sigmoid(raw)

  def reversal_weight(self, step: jax.Array, steps_per_epoch: int) -> jax.Array:
    """CTKD's λ for the epoch holding `step` (epochs counted from 1, as the code's loop)."""
    ramp_epochs = self.option.get("reversal_epochs", 10)
    if not ramp_epochs:
      return jnp.asarray(self.option.get("max_reversal", 1.0), jnp.float32)
    epoch = jnp.minimum(step // steps_per_epoch + 1, ramp_epochs).astype(jnp.float32)
    return self.option.get("max_reversal", 1.0) * 0.5 * (1.0 - jnp.cos(jnp.pi * epoch / ramp_epochs))

  def metrics(self, params) -> dict[str, jax.Array]:
    """{"temperature": T} for a learned temperature (logged as temperature/<term>), else nothing."""
    return {"temperature": self.learned(params["temperature"])} if self.learnable and params else {}

  def __call__(self, params, step: jax.Array, steps_per_epoch: int) -> jax.Array:
    if self.learnable:
      return self.learned(reverse_gradient(params["temperature"], self.reversal_weight(step, steps_per_epoch)))
    epoch = step.astype(jnp.float32) / steps_per_epoch
    start, end, epochs = self.option["start"], self.option["end"], self.option["epochs"]
    if not epochs:
      return jnp.asarray(start, jnp.float32)
    progress = jnp.clip(epoch / epochs, 0.0, 1.0)
    if self.option.get("shape", "linear") == "cosine":
      progress = 0.5 * (1.0 - jnp.cos(jnp.pi * progress))
    return start + (end - start) * progress
