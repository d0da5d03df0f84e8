"""Optimizers and learning-rate schedules from config (optax)."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from kd_jax.train.config import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "exponential")


def make_schedule(cfg: Mapping[str, Any], *, base_lr: float, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Schedules in epochs: `step` multiplies by `factor` at each epoch in `boundaries`."""
  name = cfg.get("name", "constant")
  warmup = int(round(cfg.get("warmup_epochs", 0) * steps_per_epoch))
  if name == "constant":
    schedule = optax.constant_schedule(base_lr)
  elif name == "step":
    boundaries = {int(round(e * steps_per_epoch)): cfg.get("factor", 0.1) for e in cfg.get("boundaries", ())}
    schedule = optax.piecewise_constant_schedule(base_lr, boundaries)
  elif name == "cosine":
    schedule = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup, 1), alpha=cfg.get("final_fraction", 0.0))
  elif name == "exponential":
    # Multiplies the rate by `factor` after every epoch (Hinton-style decay).
    schedule = optax.exponential_decay(base_lr, steps_per_epoch, cfg.get("factor", 0.998), staircase=True)
  else:
    raise ConfigError(f"unknown schedule {name!r}; known: {SCHEDULES}")
  if warmup:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), schedule], [warmup])
  return schedule


def make_optimizer(cfg: Mapping[str, Any], schedule: optax.Schedule) -> optax.GradientTransformation:
  name = cfg.get("name", "sgd")
  weight_decay = cfg.get("weight_decay", 0.0)
  if name == "sgd":
    # Coupled L2 as in PyTorch's SGD(weight_decay=...), which the paper recipes use.
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.sgd(schedule, momentum=cfg.get("momentum", 0.9) or None, nesterov=cfg.get("nesterov", False)))
  if name == "adam":
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.adam(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999)))
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay)
  raise ConfigError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")


def max_norm(params: Any, limit: float, *, stacked: bool = False) -> Any:
  """Caps the L2 norm of each unit's incoming weights (Dense kernels [in, out]) at `limit`.

  The weight constraint of Srivastava et al. 2014 that Hinton et al. 2015 used
  with dropout; biases and other leaves are left alone. `stacked`: leaves carry
  a leading peer axis.
  """

  def cap(path, leaf):
    if getattr(path[-1], "key", None) != "kernel" or leaf.ndim != 2 + int(stacked):
      return leaf
    norms = jnp.sqrt(jnp.sum(jnp.square(leaf), axis=-2, keepdims=True))
    return leaf * jnp.minimum(1.0, limit / jnp.maximum(norms, 1e-12))

  return jax.tree_util.tree_map_with_path(cap, params)
