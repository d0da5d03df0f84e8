"""Sources: what a student learns from besides its labels, registered like loss terms.

The train step asks its source for the outputs the loss terms compare the student
with, and never names a method. A source is a small frozen object:

  - `load(context)` (host side, once per row): the source with what it needs at
    trace time (a teacher's module) and its constants (a teacher's variables, a
    cache of its logits), which the step receives as an argument;
  - `init_state` / `update_state`: state kept in the train state (stale peer
    copies), checkpointed with it;
  - `outputs(constants, state, inputs)`: the targets, computed before the
    student's forward and outside its gradient (a frozen teacher, stale copies);
  - `from_students(logits, features)`: the targets computed from the peers' own
    outputs inside the loss (peers exchanging predictions), as constants;
  - `init_outputs`: what the terms see at init, for their connector shapes.

Outputs are shared by every peer (`per_peer = False`: one teacher for all) or
stacked per peer on a leading axis [K, ...] (`per_peer = True`).
A new teacher topology is a new source: `@register_source("name")`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.distill import Outputs

_SOURCES: dict[str, type] = {}


def register_source(name: str):
  def wrap(cls):
    if name in _SOURCES and _SOURCES[name] is not cls:
      raise ValueError(f"source {name!r} is registered twice")
    _SOURCES[name] = cls
    cls.kind = name
    return cls

  return wrap


def source_names() -> list[str]:
  return sorted(_SOURCES)


def create(name: str, **options) -> "Source":
  from kd_jax.train.config import ConfigError  # local: config imports nothing of train

  if name not in _SOURCES:
    raise ConfigError(f"unknown source {name!r}; known: {source_names()}")
  return _SOURCES[name](**options)


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a source may read in a step. images / clean_images: normalised [S, B, ...] (augmented, and not);
  batch: the global batch {"image", "label", "index", ...} [S, B, ...]; `forward(module, variables, images)`:
  (logits, features) of an inference forward in the step's compute dtype; `apply_student(params, batch_stats,
  images)`: the student's inference logits; `map_peers(fn, args, in_axes)` runs fn over the peer axis."""

  images: jax.Array
  clean_images: jax.Array
  batch: Mapping[str, jax.Array]
  forward: Callable
  apply_student: Callable
  map_peers: Callable


@dataclasses.dataclass(frozen=True)
class Source:
  kind: ClassVar[str] = ""
  per_peer: ClassVar[bool] = False  # outputs stacked [K, ...] (else one for all peers)
  online: ClassVar[bool] = False  # targets from the peers' own outputs (`from_students`)

  def streams(self, peers: int) -> int:
    """Data streams the row needs: one shared by all peers, or one per peer."""
    del peers
    return 1

  def load(self, context: Mapping[str, Any]) -> tuple["Source", Any]:
    """(this source ready to trace, its constants); `context` has "teacher" (module, variables) when the
    row names a teacher, "cache_logits(module, variables)" (its logits on the train set) and "cast(variables)"
    (the teacher's params in the compute dtype)."""
    del context
    return self, {}

  def init_outputs(self, constants, images, logits, features, forward) -> Outputs | None:
    """What the terms see at init (shapes): `images` [B, ...], the student's `logits` and `features`."""
    del constants, images, logits, features, forward
    return None

  def init_state(self, params, batch_stats) -> Any:
    del params, batch_stats
    return {}

  def update_state(self, state, params, batch_stats, step) -> Any:
    del params, batch_stats, step
    return state

  def outputs(self, constants, state, inputs: Inputs) -> Outputs | None:
    del constants, state, inputs
    return None

  def from_students(self, logits, features) -> Outputs | None:
    del logits, features
    return None


def _shared(x: jax.Array) -> jax.Array:
  """The shared stream [1, B, ...] -> [B, ...]."""
  return x[0]


@register_source("teacher")
@dataclasses.dataclass(frozen=True)
class Teacher(Source):
  """A frozen teacher run in inference mode on the student's augmented view ("augmented") or on the
  un-augmented image ("clean": Noisy Student's un-noised teacher)."""

  input: str = "augmented"
  module: nn.Module | None = None

  def load(self, context):
    module, variables = context["teacher"]
    return dataclasses.replace(self, module=module), context.get("cast", lambda v: v)(variables)

  def init_outputs(self, constants, images, logits, features, forward):
    del logits, features
    return jax.lax.stop_gradient(Outputs(*forward(self.module, constants, images)))

  def outputs(self, constants, state, inputs):
    del state
    images = inputs.images if self.input == "augmented" else inputs.clean_images
    return jax.lax.stop_gradient(Outputs(*inputs.forward(self.module, constants, _shared(images))))


@register_source("teacher_cache")
@dataclasses.dataclass(frozen=True)
class TeacherCache(Source):
  """A teacher's logits on every training example, computed once ([N, classes]) and read by the batch's
  "index" each step, instead of running the teacher."""

  def load(self, context):
    module, variables = context["teacher"]
    return self, {"cache": context["cache_logits"](module, variables)}

  def init_outputs(self, constants, images, logits, features, forward):
    del logits, features, forward
    return Outputs(jnp.zeros((images.shape[0], constants["cache"].shape[-1]), jnp.float32))

  def outputs(self, constants, state, inputs):
    del state
    return Outputs(jax.lax.stop_gradient(constants["cache"][_shared(inputs.batch["index"])]))


def _others(stacked: jax.Array, peers: int) -> jax.Array:
  """[K, ...] -> [K, K-1, ...]: for each peer, the other peers' values (rolls over the peer axis)."""
  return jnp.stack([jnp.roll(stacked, shift, axis=0) for shift in range(1, peers)], axis=1)


@register_source("peers")
@dataclasses.dataclass(frozen=True)
class Peers(Source):
  """K peers on one shared batch exchanging predictions every step (DML, co-distillation's "predictions"
  mode, AFD): each peer sees the others' logits and features [K-1, B, ...] as constants; a roll over the
  peer axis, which XLA lowers to a collective across the replica axis. XLA drops the exchange of the
  features no term reads."""

  per_peer: ClassVar[bool] = True
  online: ClassVar[bool] = True
  peers: int = 2

  def init_outputs(self, constants, images, logits, features, forward):
    del constants, images, forward
    stack = lambda x: jnp.broadcast_to(x, (self.peers - 1,) + x.shape)
    return Outputs(stack(logits), jax.tree.map(stack, dict(features)))

  def from_students(self, logits, features):
    others = lambda x: jax.lax.stop_gradient(_others(x, self.peers))
    return Outputs(others(logits), jax.tree.map(others, dict(features)))


@register_source("stale_peers")
@dataclasses.dataclass(frozen=True)
class StalePeers(Source):
  """Co-distillation with stale parameters (Anil et al. 2018): each of K peers trains on its own data
  stream and distils from copies of the other peers' parameters, refreshed every `every_steps` steps;
  the copies live in the train state, and are evaluated on the peer's own batch."""

  per_peer: ClassVar[bool] = True
  peers: int = 2
  every_steps: int = 1

  def streams(self, peers: int) -> int:
    return peers

  def init_outputs(self, constants, images, logits, features, forward):
    del constants, images, features, forward
    return Outputs(jnp.broadcast_to(logits, (self.peers - 1,) + logits.shape))

  def init_state(self, params, batch_stats):
    return {"params": params, "batch_stats": batch_stats}

  def update_state(self, state, params, batch_stats, step):
    refresh = (step % self.every_steps) == 0
    current = {"params": params, "batch_stats": batch_stats}
    return jax.tree.map(lambda n, o: jnp.where(refresh, n, o), current, state)

  def outputs(self, constants, state, inputs):
    del constants
    # Peer k reads the copy of peer (k - shift) for each shift: its own stale peers, on its own batch.
    stale = [inputs.map_peers(inputs.apply_student, (
        *jax.tree.map(lambda x: jnp.roll(x, shift, axis=0), (state["params"], state["batch_stats"])),
        inputs.images), (0, 0, 0)) for shift in range(1, self.peers)]
    return Outputs(jax.lax.stop_gradient(jnp.stack(stale, axis=1)))  # [K, K-1, B, classes]
