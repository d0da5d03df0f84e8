"""Optimizers and learning-rate schedules from config (optax), built by signature.

Each optimizer and schedule name maps to a factory whose keyword parameters are
its options (as big_vision builds optax transforms from config): an option the
factory does not take is an error naming it, never ignored. `check` validates a
row's two dicts without building anything, so a table can be checked up front.

  optimizer = make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}, schedule)

`learning_rate` (the schedule's base rate) is an option of every optimizer, and
`warmup_epochs` (a linear ramp from 0) one of every schedule. A momentum is a
float or a ramp `{"start": 0.5, "end": 0.99, "epochs": 500}`: linear in the epoch
index up to `epochs`, then constant (Hinton et al. 2012, appendix A.1).
`max_norm` > 0 puts `max_norm_projection` at the end of the optimizer's chain.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kd_jax.train.config import ConfigError

# Values that `kd_jax.train.config.row()` puts on every optimizer / schedule dict whether the row set them or
# not; a key a factory does not take is accepted (and dropped) only with exactly this value.
ROW_FILLERS = {
    "optimizer": {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    "schedule": {"boundaries": [], "factor": 0.1, "warmup_epochs": 0.0},
}
_RAMP_KEYS = ("start", "end", "epochs")


@dataclasses.dataclass(frozen=True)
class EpochSchedule:
  """A learning-rate schedule with the epoch length its options are counted in (a momentum ramp reads it)."""
  fn: optax.Schedule
  steps_per_epoch: int

  def __call__(self, count):
    return self.fn(count)


@dataclasses.dataclass(frozen=True)
class _Context:
  """What a factory needs besides its options."""
  schedule: optax.Schedule | None = None
  steps_per_epoch: int | None = None
  total_steps: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Transforms.


def momentum_schedule(momentum: float | Mapping[str, Any], steps_per_epoch: int | None) -> optax.Schedule:
  """A momentum as a function of the step: a constant, or a ramp linear in the epoch index, then constant."""
  if not isinstance(momentum, Mapping):
    return optax.constant_schedule(float(momentum))
  if not steps_per_epoch:
    raise ConfigError("a momentum ramp counts epochs: make_optimizer needs steps_per_epoch (or an EpochSchedule)")
  start, end, epochs = (float(momentum[k]) for k in _RAMP_KEYS)

  def schedule(count):
    epoch = jnp.floor_divide(count, steps_per_epoch).astype(jnp.float32)
    return start + (end - start) * jnp.minimum(epoch / epochs, 1.0)

  return schedule


class TraceState(NamedTuple):
  count: jax.Array
  trace: Any


def scale_by_momentum(momentum: optax.Schedule, *, nesterov: bool = False) -> optax.GradientTransformation:
  """optax.trace with a momentum schedule: trace = p_t * trace + g; the update is the trace
  (nesterov: g + p_t * trace). With a constant p_t it equals optax.trace."""

  def init(params):
    return TraceState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    p = momentum(state.count)
    trace = jax.tree.map(lambda g, t: g + p * t, updates, state.trace)
    out = jax.tree.map(lambda g, t: g + p * t, updates, trace) if nesterov else trace
    return out, TraceState(optax.safe_increment(state.count), trace)

  return optax.GradientTransformation(init, update)


def dropout_momentum(learning_rate: optax.Schedule, momentum: optax.Schedule) -> optax.GradientTransformation:
  """Hinton et al. 2012's update for dropout nets (appendix A.1): delta_t = p_t delta_{t-1} - (1 - p_t) eps_t g_t;
  the update is delta_t. The learning rate scales only the new gradient, and (1 - p_t) keeps the step's size
  about eps_t as the momentum rises."""

  def init(params):
    return TraceState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    p, eps = momentum(state.count), learning_rate(state.count)
    delta = jax.tree.map(lambda g, d: p * d - (1.0 - p) * eps * g, updates, state.trace)
    return delta, TraceState(optax.safe_increment(state.count), delta)

  return optax.GradientTransformation(init, update)


def _unit_norms(kernel: jax.Array, batch_dims: int) -> jax.Array:
  """L2 norm of each unit's incoming weights: over every axis but the last (the unit) and `batch_dims` leading."""
  axes = tuple(range(batch_dims, kernel.ndim - 1))
  return jnp.sqrt(jnp.sum(jnp.square(kernel), axis=axes, keepdims=True))


def _capped(kernel: jax.Array, limit: float, batch_dims: int) -> jax.Array:
  return kernel * jnp.minimum(1.0, limit / jnp.maximum(_unit_norms(kernel, batch_dims), 1e-12))


def _is_kernel(path, leaf, batch_dims: int, under: tuple[str, ...]) -> bool:
  keys = tuple(str(getattr(k, "key", k)) for k in path)
  return keys[:len(under)] == under and keys[-1] == "kernel" and leaf.ndim >= 2 + batch_dims


def max_norm_projection(limit: float, *, batch_dims: int = 0,
                        under: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """Caps the L2 norm of each unit's incoming weights at `limit` after the update (the last element of a chain).

  A weight vector the update would take past the limit is rescaled onto it (Hinton et al. 2012, appendix A:
  "renormalize the weights of the hidden unit by division"; Srivastava et al. 2014's max-norm). Applies to the
  leaves named `kernel` (Dense [in, out], conv [..., in, out]) under the path prefix `under`; `batch_dims`
  leading axes index independent models (peers). Returns the update u' with params + u' = cap(params + u),
  as optax.keep_params_nonnegative does for its constraint.
  """

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("max_norm_projection needs params: call update(updates, state, params)")

    def project(path, u, p):
      if not _is_kernel(path, p, batch_dims, under):
        return u
      return _capped(p + u, limit, batch_dims) - p

    return jax.tree_util.tree_map_with_path(project, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def max_norm(params: Any, limit: float, *, stacked: bool = False) -> Any:
  """Caps the L2 norm of each unit's incoming weights (Dense kernels [in, out]) at `limit`.

  The engine's post-update form of `max_norm_projection` (Srivastava et al. 2014; Hinton et al. 2015); biases
  and other leaves are left alone. `stacked`: leaves carry a leading peer axis.
  """

  def cap(path, leaf):
    if getattr(path[-1], "key", None) != "kernel" or leaf.ndim != 2 + int(stacked):
      return leaf
    return _capped(leaf, limit, int(stacked))

  return jax.tree_util.tree_map_with_path(cap, params)


# ---------------------------------------------------------------------------------------------------------------
# Factories: the keyword parameters are the options.


def _decayed(weight_decay: float, chain: optax.GradientTransformation) -> optax.GradientTransformation:
  # Coupled L2 as in PyTorch's SGD/Adam(weight_decay=...), which the paper recipes use. The identity keeps the
  # optimizer state's structure the same with and without decay (checkpoints of either resume).
  return optax.chain(optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(), chain)


def _sgd(ctx: _Context, *, momentum: float | Mapping[str, Any] = 0.9, nesterov: bool = False,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  if isinstance(momentum, Mapping):
    sgd = optax.chain(scale_by_momentum(momentum_schedule(momentum, ctx.steps_per_epoch), nesterov=nesterov),
                      optax.scale_by_learning_rate(ctx.schedule))
  else:
    sgd = optax.sgd(ctx.schedule, momentum=momentum or None, nesterov=nesterov)
  return _decayed(weight_decay, sgd)


def _dropout_sgd(ctx: _Context, *, momentum: float | Mapping[str, Any] | None = None,
                 weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Hinton et al. 2012 (appendix A.1): momentum 0.5 -> 0.99 over 500 epochs, steps scaled by (1 - momentum)."""
  momentum = {"start": 0.5, "end": 0.99, "epochs": 500} if momentum is None else momentum
  return _decayed(weight_decay, dropout_momentum(ctx.schedule, momentum_schedule(momentum, ctx.steps_per_epoch)))


def _adam(ctx: _Context, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
  return _decayed(weight_decay, optax.adam(ctx.schedule, b1=b1, b2=b2, eps=eps))


def _adamw(ctx: _Context, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 0.0) -> optax.GradientTransformation:
  return optax.adamw(ctx.schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def _constant(ctx: _Context, base_lr: float) -> optax.Schedule:
  return optax.constant_schedule(base_lr)


def _step(ctx: _Context, base_lr: float, *, boundaries: list[float], factor: float = 0.1) -> optax.Schedule:
  """Multiplies the rate by `factor` at each epoch in `boundaries`."""
  steps = [int(round(e * ctx.steps_per_epoch)) for e in boundaries]
  return optax.piecewise_constant_schedule(base_lr, {s: factor for s in steps})


def _cosine(ctx: _Context, base_lr: float, *, final_fraction: float = 0.0, warmup: int = 0) -> optax.Schedule:
  """Cosine decay to `final_fraction` of the base rate at the last step."""
  return optax.cosine_decay_schedule(base_lr, max(ctx.total_steps - warmup, 1), alpha=final_fraction)


def _exponential(ctx: _Context, base_lr: float, *, factor: float = 0.998) -> optax.Schedule:
  """Multiplies the rate by `factor` after every epoch (Hinton et al. 2012, appendix A.1: f = 0.998)."""
  return optax.exponential_decay(base_lr, ctx.steps_per_epoch, factor, staircase=True)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": _sgd, "dropout_sgd": _dropout_sgd, "adam": _adam, "adamw": _adamw}
SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "constant": _constant, "step": _step, "cosine": _cosine, "exponential": _exponential}
# Options every optimizer / schedule takes besides its factory's: consumed by make_optimizer / make_schedule.
# Options of every optimizer / schedule; "freeze" (the params the optimizer leaves alone) is applied by the
# plan around the optimizer (`planning.with_frozen`).
_COMMON = {"optimizer": {"learning_rate": 0.1, "max_norm": 0.0, "freeze": ()}, "schedule": {"warmup_epochs": 0.0}}
_INTERNAL = ("warmup",)  # factory parameters that are not options


def _options(factory) -> dict[str, inspect.Parameter]:
  return {n: p for n, p in inspect.signature(factory).parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _INTERNAL}


def _plain(value: Any) -> Any:
  """Tuples (how row() stores lists, for command-line overrides) as lists."""
  return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _split(cfg: Mapping[str, Any], kind: str, table: Mapping[str, Callable]) -> tuple[Callable, dict, dict]:
  """(factory, its options, the common options) of an optimizer or schedule dict; ConfigError on a bad one."""
  cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  name = cfg.pop("name", "sgd" if kind == "optimizer" else "constant")
  if name not in table:
    raise ConfigError(f"unknown {kind} {name!r}; known: {sorted(table)}")
  factory, allowed = table[name], _options(table[name])
  common = {k: cfg.pop(k, v) for k, v in _COMMON[kind].items()}
  options = {}
  for key, value in cfg.items():
    if key in allowed:
      options[key] = value
    elif key in ROW_FILLERS[kind] and _plain(value) == ROW_FILLERS[kind][key]:
      continue  # row()'s filler, not set by the row
    else:
      raise ConfigError(f"{kind}.{key}={value!r}: {kind} {name!r} takes no option {key!r}; its options: "
                        f"{sorted(list(allowed) + list(_COMMON[kind]))}")
  missing = [k for k, p in allowed.items() if p.default is inspect.Parameter.empty and k not in options]
  if missing:
    raise ConfigError(f"{kind} {name!r} needs option(s) {missing}")
  momentum = options.get("momentum")
  if isinstance(momentum, Mapping) and sorted(momentum) != sorted(_RAMP_KEYS):
    raise ConfigError(f"{kind}.momentum={dict(momentum)!r}: a momentum ramp has exactly the keys {list(_RAMP_KEYS)}")
  if isinstance(momentum, Mapping) and float(momentum["epochs"]) <= 0:
    raise ConfigError(f"{kind}.momentum.epochs must be > 0, got {momentum['epochs']!r}")
  if kind == "optimizer" and common["max_norm"] < 0:
    raise ConfigError(f"optimizer.max_norm must be >= 0 (0: no constraint), got {common['max_norm']!r}")
  return factory, options, common


def check(optimizer_cfg: Mapping[str, Any], schedule_cfg: Mapping[str, Any]) -> None:
  """Validates a row's optimizer and schedule dicts (names, options, momentum ramps) without building them."""
  _split(optimizer_cfg, "optimizer", OPTIMIZERS)
  _split(schedule_cfg, "schedule", SCHEDULES)


def make_schedule(cfg: Mapping[str, Any], *, base_lr: float, steps_per_epoch: int,
                  total_steps: int) -> EpochSchedule:
  """The learning-rate schedule of `cfg` (options counted in epochs), after a linear warmup of `warmup_epochs`."""
  factory, options, common = _split(cfg, "schedule", SCHEDULES)
  warmup = int(round(common["warmup_epochs"] * steps_per_epoch))
  ctx = _Context(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  if factory is _cosine:
    options["warmup"] = warmup
  schedule = factory(ctx, base_lr, **options)
  if warmup:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), schedule], [warmup])
  return EpochSchedule(schedule, steps_per_epoch)


def make_optimizer(cfg: Mapping[str, Any], schedule: optax.Schedule, *, steps_per_epoch: int | None = None,
                   batch_dims: int = 0, max_norm_under: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """The optimizer of `cfg` on `schedule`; `max_norm` > 0 ends the chain with `max_norm_projection`.

  steps_per_epoch: the epoch length of a momentum ramp (default: the EpochSchedule's). batch_dims, max_norm_under:
  see `max_norm_projection` (the engine's params: batch_dims=1 for the peer axis, under=("student",)).
  """
  factory, options, common = _split(cfg, "optimizer", OPTIMIZERS)
  steps_per_epoch = steps_per_epoch or getattr(schedule, "steps_per_epoch", None)
  optimizer = factory(_Context(schedule, steps_per_epoch), **options)
  if common["max_norm"]:
    optimizer = optax.chain(optimizer, max_norm_projection(common["max_norm"], batch_dims=batch_dims,
                                                           under=tuple(max_norm_under)))
  return optimizer
