"""The objective and its terms: `Outputs`, `Term`, `Objective`, `register_term`, `feature`.

The method families (logits.py, features.py, ...) import this module, and the package's `__init__`
imports them, so a family never imports the package back.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.errors import ConfigError

__all__ = ["Outputs", "Term", "Objective", "register_term", "term_names"]


@flax.struct.dataclass
class Outputs:
  """What a model produced on a batch: logits [B, K] and named features."""

  logits: jax.Array
  features: Mapping[str, jax.Array] = flax.struct.field(default_factory=dict)


class Term:
  """One part of an objective. Subclasses set `needs_teacher` and define `__call__`."""

  needs_teacher: bool = False
  needs_peers: bool = False
  steps_per_epoch: int = 1  # set by the Objective, for terms with schedules in epochs
  num_train: int = 0  # set by the Objective: the training-set size (memory banks)
  # Terms whose state holds per-example rows (a memory bank [N, ...]) have them
  # split over the mesh axis "data", so no device holds more than its share.
  shard_state_rows: bool = False

  def init(self, rng: jax.Array, student: Outputs, teacher: Outputs | None) -> tuple[Any, Any]:
    """Returns (trainable connector params, state); both empty by default."""
    del rng, student, teacher
    return {}, {}

  def __call__(self, student: Outputs, teacher: Outputs | None, batch: Mapping[str, jax.Array],
               params: Any, state: Any, *, step: jax.Array) -> tuple[jax.Array, Any]:
    raise NotImplementedError

  def metrics(self, params: Any, state: Any) -> Mapping[str, jax.Array]:
    """Scalars to log besides the loss, {name: value}, logged as `<name>/<term>`; nothing by default."""
    del params, state
    return {}


_TERMS: dict[str, Callable[..., Term]] = {}


def register_term(name: str):
  def wrap(cls):
    if name in _TERMS:
      raise ValueError(f"term {name!r} is registered twice")
    _TERMS[name] = cls
    return cls

  return wrap


def term_names() -> list[str]:
  return sorted(_TERMS)


def _make_term(name: str, kwargs: Mapping[str, Any]) -> Term:

  if name not in _TERMS:
    close = difflib.get_close_matches(name, list(_TERMS), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"unknown loss term {name!r}.{hint} Known terms: {', '.join(term_names())}")
  cls = _TERMS[name]
  accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ConfigError(f"loss term {name!r} got unknown option(s) {unknown}; it accepts {accepted}")
  return cls(**kwargs)


class Objective:
  """The weighted sum of a method's terms: loss = Σ weight · mean(term)."""

  def __init__(self, terms: Mapping[str, Mapping[str, Any]], *, steps_per_epoch: int = 1, num_train: int = 0):
    if not terms:
      raise ValueError("a method needs at least one loss term, e.g. {'ce': {'weight': 1.0}}")
    self.weights: dict[str, float] = {}
    self.starts: dict[str, int] = {}
    self.warmups: dict[str, int] = {}
    self.warmup_epochs: dict[str, float] = {}
    self.warmup_shapes: dict[str, str] = {}
    self.steps_per_epoch = steps_per_epoch
    self.terms: dict[str, Term] = {}
    for name, options in terms.items():
      options = dict(options)
      weight = options.pop("weight", 1.0)
      if not isinstance(weight, (int, float)):
        raise ValueError(f"loss term {name!r}: weight must be a number, got {weight!r}")
      self.weights[name] = float(weight)
      self.starts[name] = int(round(options.pop("start_epoch", 0) * steps_per_epoch))
      self.warmup_epochs[name] = float(options.pop("warmup_epochs", 0))
      self.warmups[name] = int(round(self.warmup_epochs[name] * steps_per_epoch))
      self.warmup_shapes[name] = options.pop("warmup_shape", "linear")
      if self.warmup_shapes[name] not in ("linear", "epoch"):
        raise ValueError(f"loss term {name!r}: warmup_shape must be 'linear' or 'epoch', "
                         f"got {self.warmup_shapes[name]!r}")
      self.terms[name] = _make_term(name, options)
      self.terms[name].steps_per_epoch = steps_per_epoch
      self.terms[name].num_train = num_train
    if self.needs_teacher and self.needs_peers:
      raise ValueError(f"terms {list(terms)} mix teacher terms and online (peer) terms")

  @property
  def needs_teacher(self) -> bool:
    return any(t.needs_teacher for t in self.terms.values())

  @property
  def needs_peers(self) -> bool:
    return any(t.needs_peers for t in self.terms.values())

  def weight(self, name: str, step: jax.Array) -> jax.Array:
    """The term's weight at `step`: 0 before its start, then its warm-up (per step, or per epoch from 1)."""
    since_start = step - self.starts[name]
    if not self.warmups[name]:
      ramp = 1.0
    elif self.warmup_shapes[name] == "epoch":
      epoch = (since_start // self.steps_per_epoch + 1).astype(jnp.float32)
      ramp = jnp.minimum(epoch / self.warmup_epochs[name], 1.0)
    else:
      ramp = jnp.clip(since_start.astype(jnp.float32) / self.warmups[name], 0.0, 1.0)
    return self.weights[name] * jnp.where(since_start >= 0, ramp, 0.0)

  def init(self, rng, student: Outputs, teacher: Outputs | None):
    params, state = {}, {}
    for i, (name, term) in enumerate(self.terms.items()):
      p, s = term.init(jax.random.fold_in(rng, i), student, teacher)
      if p:
        params[name] = p
      if s:
        state[name] = s
    return params, state

  def __call__(self, params, state, student: Outputs, teacher: Outputs | None, batch, *, step):
    total = jnp.zeros((), jnp.float32)
    metrics, new_state = {}, {}
    for name, term in self.terms.items():
      value, term_state = term(student, teacher, batch, params.get(name, {}), state.get(name, {}), step=step)
      value = jnp.mean(value.astype(jnp.float32))
      metrics[f"loss/{name}"] = value
      for key, extra in term.metrics(params.get(name, {}), state.get(name, {})).items():
        metrics[f"{key}/{name}"] = jnp.asarray(extra, jnp.float32)
      total = total + self.weight(name, step) * value
      if term_state:
        new_state[name] = term_state
    metrics["loss"] = total
    return total, metrics, new_state



def feature(outputs: Outputs, name: str, *, who: str) -> jax.Array:
  """outputs.features[name], or a clear error listing the features there are."""
  if name not in outputs.features:
    raise KeyError(f"the {who} has no feature {name!r}; available features: {sorted(outputs.features)}")
  return outputs.features[name]
