"""The train state and the jitted, sharded train and eval steps."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kd_jax import losses
from kd_jax.data import augment as augment_lib
from kd_jax.distill import Objective, Outputs
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import optim


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: checkpoint this and nothing else.

  params: {"student": ..., "terms": {term name: connector params}}, all trained.
  batch_stats: {"student": ...} BatchNorm running statistics.
  method_state: {term name: state} (memory banks, peers, ...).
  rng: raw uint32 [2] key; the step's randomness is fold_in(rng, step).
  nonfinite_step: -1, or the first step whose loss or gradients were not finite.
  nonfinite_values: at that step, [loss, grad norm, each term's mean] (see `value_names`).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  nonfinite_values: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static description of one training run's step."""

  student: nn.Module
  objective: Objective
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  normalize: Callable[[jax.Array], jax.Array]
  teacher: nn.Module | None = None
  augment: str = "none"
  max_norm: float = 0.0


def value_names(spec: StepSpec) -> tuple[str, ...]:
  """Names of `TrainState.nonfinite_values`."""
  return ("loss", "grad_norm") + tuple(f"loss/{name}" for name in spec.objective.terms)


def _variables(params, batch_stats):
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def teacher_outputs(spec: StepSpec, teacher_variables, images) -> Outputs | None:
  if spec.teacher is None:
    return None
  logits, features = spec.teacher.apply(teacher_variables, images, train=False, return_features=True)
  return jax.lax.stop_gradient(Outputs(logits, features))


def init_state(spec: StepSpec, rng: jax.Array, teacher_variables, example_images: jax.Array) -> TrainState:
  """A fresh state: a pure function of `rng` (call under jit for placement)."""
  init_rng, term_rng, dropout_rng = jax.random.split(rng, 3)
  images = spec.normalize(example_images)
  variables = spec.student.init({"params": init_rng, "dropout": dropout_rng}, images, train=False)
  logits, features = spec.student.apply(variables, images, train=False, return_features=True)
  teacher = teacher_outputs(spec, teacher_variables, images)
  term_params, method_state = spec.objective.init(term_rng, Outputs(logits, features), teacher)
  params = {"student": variables["params"], "terms": term_params}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats={"student": variables.get("batch_stats", {})},
      opt_state=spec.optimizer.init(params),
      method_state=method_state,
      rng=rng,
      nonfinite_step=jnp.full((), -1, jnp.int32),
      nonfinite_values=jnp.zeros((len(value_names(spec)),), jnp.float32))


def train_step(spec: StepSpec, state: TrainState, teacher_variables, batch) -> tuple[TrainState, dict]:
  """One optimisation step on a global batch {"image": uint8 [B,H,W,C], "label": int [B], "index": int [B]}."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  images = batch["image"].astype(jnp.float32)
  images = spec.normalize(augment_lib.augment(augment_rng, images, kind=spec.augment))
  teacher = teacher_outputs(spec, teacher_variables, images)

  def loss_fn(params):
    (logits, features), updates = spec.student.apply(
        _variables(params["student"], state.batch_stats["student"]), images, train=True,
        return_features=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss, metrics, method_state = spec.objective(
        params["terms"], state.method_state, Outputs(logits, features), teacher, batch, step=state.step)
    metrics["accuracy"] = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return loss, (metrics, updates.get("batch_stats", {}), method_state)

  (loss, (metrics, batch_stats, method_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = spec.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if spec.max_norm:
    params = {**params, "student": optim.max_norm(params["student"], spec.max_norm)}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  first_bad = (state.nonfinite_step < 0) & ~finite
  values = jnp.stack([loss, grad_norm] + [metrics[n] for n in value_names(spec)[2:]]).astype(jnp.float32)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats={"student": batch_stats}, opt_state=opt_state,
      method_state=method_state,
      nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
      nonfinite_values=jnp.where(first_bad, values, state.nonfinite_values))
  # A non-finite step leaves the state as it was (but for the step counter and the record of it);
  # the host then stops the run or, with config.skip_nonfinite, goes on.
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = new_state.replace(
      params=keep_old(new_state.params, state.params), opt_state=keep_old(new_state.opt_state, state.opt_state),
      batch_stats=keep_old(new_state.batch_stats, state.batch_stats),
      method_state=keep_old(new_state.method_state, state.method_state))
  metrics.update(grad_norm=grad_norm, learning_rate=spec.schedule(state.step), finite=finite.astype(jnp.float32))
  return new_state, metrics


def make_train_step(spec: StepSpec, mesh: Mesh, state_sharding):
  """`step(state, teacher_variables, batch) -> (state, metrics)`, jitted; the state is donated."""
  replicated = mesh_lib.replicated(mesh)
  return jax.jit(
      lambda state, teacher_variables, batch: train_step(spec, state, teacher_variables, batch),
      in_shardings=(state_sharding, replicated, mesh_lib.batch_sharding(mesh)),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,))


def make_eval_step(model: nn.Module, normalize, mesh: Mesh):
  """`eval(variables, batch) -> {"correct", "loss", "count"}` sums over the unmasked examples."""

  def eval_step(variables, batch):
    logits = model.apply(variables, normalize(batch["image"].astype(jnp.float32)), train=False)
    mask = batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    ce = losses.cross_entropy(logits, batch["label"])
    return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(ce * mask), "count": jnp.sum(mask)}

  return jax.jit(eval_step, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))
