"""What surrounds a row's fit loop: its teacher and source, its start from earlier stages, and what
its result reports besides accuracy (ensembles of generations, each early exit's cost).

A row's teacher is a trained model directory (model.json + weights: a row of the same table, or
published elsewhere); a multi-stage recipe starts a row from an earlier row's weights (`init`),
with the loss terms' connector params restored by name and shape.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import data as data_lib
from kd_jax import models
from kd_jax.distill import weight_distillation
from kd_jax.train import checkpoint as checkpoint_lib
from kd_jax.train import engine
from kd_jax.train.evaluation import device_multiple, evaluate, head_name
from kd_jax.train import mesh as mesh_lib
from kd_jax.train.config import ConfigError
from kd_jax.train.planning import RowPlan

log = logging.getLogger(__name__)


def load_teacher(directory: str, dataset: data_lib.Dataset, *, row_name: str):
  """A trained model from `directory` as (module, variables), checked against the data."""
  variables, description = checkpoint_lib.load_model(directory)
  if description["num_classes"] != dataset.num_classes:
    raise ConfigError(
        f"row {row_name!r}: the teacher in {directory} has {description['num_classes']} classes, "
        f"but dataset {dataset.name!r} has {dataset.num_classes}")
  if tuple(description["input_shape"]) != dataset.input_shape:
    raise ConfigError(
        f"row {row_name!r}: the teacher in {directory} was trained on inputs of shape "
        f"{tuple(description['input_shape'])}, but dataset {dataset.name!r} has {dataset.input_shape}")
  module = models.create(description["model"], num_classes=description["num_classes"], **description["model_kwargs"])
  return module, variables


def padded_split(images: np.ndarray, labels: np.ndarray, batch_size: int):
  """Yields fixed-size batches of whole arrays; the last is zero-padded and masked."""
  n = images.shape[0]
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    mask = np.concatenate([np.ones(stop - start, np.float32), np.zeros(pad, np.float32)])
    yield {
        "image": np.concatenate([images[start:stop], np.zeros((pad,) + images.shape[1:], images.dtype)]),
        "label": np.concatenate([labels[start:stop], np.zeros(pad, labels.dtype)]),
        "mask": mask,
    }


def teacher_cache(teacher, variables, dataset, normalize, mesh, batch_size: int, *, row_name: str,
                  rewrites=None) -> jax.Array:
  """The teacher's logits on every training example, [N, classes], computed once."""
  if not hasattr(dataset, "train_images"):
    raise ConfigError(f"row {row_name!r}: teacher.cache needs an in-memory dataset; {dataset.name!r} is streamed")
  logits_fn = engine.make_teacher_logits(teacher, normalize, mesh, rewrites=rewrites)
  chunks = [logits_fn(variables, mesh_lib.put_batch(batch, mesh_lib.batch_sharding(mesh)))
            for batch in padded_split(dataset.train_images, dataset.train_labels, device_multiple(batch_size, mesh))]
  return jnp.concatenate(chunks)[:dataset.num_train]


def load_source(plan: RowPlan, dataset, mesh):
  """(source, param map, constants) of the row: the teacher loaded, its logits cached, the weight
  generator planned from its params, as the row asks."""
  if not plan.teacher:
    source, constants = plan.source.load({}) if plan.source is not None else (None, {})
    return source, None, constants
  module, variables = load_teacher(plan.teacher, dataset, row_name=plan.name)
  variables = jax.device_put(variables, mesh_lib.replicated(mesh))
  dtype = engine.COMPUTE_DTYPES[plan.compute_dtype]
  context = {
      "teacher": (module, variables),
      "cache_logits": lambda m, v: teacher_cache(m, v, dataset, plan.normalize, mesh, plan.data.eval_batch_size,
                                                 row_name=plan.name, rewrites=plan.rewrites),
      # The teacher's params in the compute dtype once, not in every step (a generator reads them in float32).
      "cast": (lambda v: v) if plan.generator_pattern or dtype == jnp.float32 else (
          lambda v: {**v, "params": engine.cast_floats(v["params"], dtype)})}
  source, constants = plan.source.load(context)
  param_map = None
  if plan.generator_pattern:
    shapes = jax.eval_shape(lambda: plan.student.init(jax.random.PRNGKey(0), plan.normalize(
        jnp.zeros((1,) + dataset.input_shape, plan.input_dtype))))
    param_map = weight_distillation.Generator(weight_distillation.make_plan(
        shapes["params"], variables["params"], layer_pattern=plan.generator_pattern))
  return source, param_map, constants


def _restore_terms(saved: dict[str, Any], current: Any, *, peers: int, what: str, row_name: str):
  """`current` (peer-stacked [K, ...] term params or state) with the leaves of `saved` (one peer's)
  that have the same path and shape; returns (tree, restored paths)."""
  flat_saved = {tuple(str(getattr(k, "key", k)) for k in path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  restored = []

  def pick(path, leaf):
    key = tuple(str(getattr(k, "key", k)) for k in path)
    if key not in flat_saved:
      return leaf
    value = np.asarray(flat_saved[key])
    if value.shape != tuple(leaf.shape[1:]):
      log.warning("row %s: init's %s %s has shape %s, this row's %s: not restored", row_name, what,
                  "/".join(key), value.shape, tuple(leaf.shape[1:]))
      return leaf
    restored.append("/".join(key))
    return np.broadcast_to(value, (peers,) + value.shape).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(pick, current), restored


def _model_start(plan: RowPlan, current: dict[str, Any]) -> dict[str, Any]:
  """The model's {"params", "batch_stats"} [K, ...] from init_from: the same model whole, or (init_partial)
  each leaf of the same path and shape, the others kept from `current` (the fresh init)."""
  saved, description = checkpoint_lib.load_model(plan.init_from)
  if not plan.init_partial:
    if description["model"] != plan.description["model"] or \
        description["model_kwargs"] != plan.description["model_kwargs"]:
      raise ConfigError(
          f"row {plan.name!r}: init_from {plan.init_from} holds a {description['model']} "
          f"{description['model_kwargs']}, but the row trains a {plan.description['model']} "
          f"{plan.description['model_kwargs']}")
    peers = lambda tree: jax.tree.map(lambda x: np.broadcast_to(x, (plan.peers,) + np.shape(x)), tree)
    return {"params": peers(saved["params"]), "batch_stats": peers(saved.get("batch_stats", {}))}
  return partial_init(plan.init_from, current, peers=plan.peers, row_name=plan.name)


def partial_init(directory: str, current: dict[str, Any], *, peers: int, row_name: str) -> dict[str, Any]:
  """init_partial: the fresh {"params", "batch_stats"} (peer-stacked [K, ...]) with every leaf that `directory`'s
  model has at the same path and shape; the others keep their fresh init."""
  saved, description = checkpoint_lib.load_model(directory)
  out, restored = {}, []
  for collection in ("params", "batch_stats"):
    out[collection], got = _restore_terms(saved.get(collection, {}), current[collection], peers=peers,
                                          what=f"model {collection}", row_name=row_name)
    restored += got
  if not restored:
    raise ConfigError(f"row {row_name!r}: init_partial found no param of the same path and shape in init_from "
                      f"{directory} (a {description['model']} {description['model_kwargs']})")
  log.info("row %s: init_partial from %s: %d leaves restored (%s)", row_name, directory, len(restored),
           ", ".join(restored))
  return out


def _fetch(tree, mesh):
  """Host copies of arrays that may be split over other processes' devices (peers over "replica")."""
  return jax.device_get(jax.jit(lambda x: x, out_shardings=mesh_lib.replicated(mesh))(tree))


def initialise(plan: RowPlan, spec: engine.StepSpec, state: engine.TrainState, mesh, state_sharding):
  """A fresh state started from `plan.init_from` (an earlier stage): the model's weights and the terms'
  connector params and state of the same name and shape; checks that every frozen term param came."""
  restored_terms = []
  if plan.init_from:
    model = _model_start(plan, _fetch({"params": state.params["student"],
                                       "batch_stats": state.batch_stats["student"]}, mesh))
    saved_terms = checkpoint_lib.load_terms(plan.init_from)
    # Connector state only: memory banks (row-sharded) start afresh and never leave the devices.
    connector_state = {k: v for k, v in state.method_state.items() if not spec.objective.terms[k].shard_state_rows}
    current = _fetch({"params": state.params["terms"], "state": connector_state}, mesh)
    term_params, restored_terms = _restore_terms(saved_terms.get("params", {}), current["params"],
                                                 peers=plan.peers, what="term param", row_name=plan.name)
    term_state, _ = _restore_terms(saved_terms.get("state", {}), current["state"], peers=plan.peers,
                                   what="term state", row_name=plan.name)
    if restored_terms:
      log.info("row %s: term params restored from %s: %s", plan.name, plan.init_from, ", ".join(restored_terms))
    params = {**state.params, "student": model["params"], "terms": term_params}
    state = jax.device_put(state.replace(
        params=params, batch_stats={"student": model["batch_stats"]},
        method_state={**state.method_state, **term_state}, opt_state=spec.optimizer.init(params)), state_sharding)
  for path in plan.frozen:
    if path[0] == "terms" and len(path) > 2 and not any(
        r.startswith("/".join(path[1:]) + "/") for r in restored_terms):
      raise ConfigError(
          f"row {plan.name!r}: term {path[1]!r} keeps its {'/'.join(path[2:])!r} params frozen, but init_from "
          f"({plan.init_from or 'not set'}) does not provide them: train them first in a stage row (e.g. "
          f"FT's stage='paraphraser' row) and start this row from it with init_from")
  return state


def ensemble_accuracy(dirs: list[str], variables, model, normalize, dataset, batch_size: int, mesh, *,
                      rewrites=None) -> float:
  """Test accuracy of the mean of the probabilities of this row's model and the models in `dirs`."""
  members = [variables] + [checkpoint_lib.load_model(d)[0] for d in dirs]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *members)
  eval_step = engine.make_eval_step(model, normalize, mesh, heads=(), rewrites=rewrites)
  totals = evaluate(eval_step, stacked, dataset, batch_size, mesh)
  return totals["ensemble_test_accuracy"]


def _used_inputs(closed_jaxpr) -> list[bool]:
  """Which inputs of a jaxpr its outputs depend on (an equation counts whole: all its inputs if any output)."""
  jaxpr = closed_jaxpr.jaxpr
  needed = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal))
  return [v in needed for v in jaxpr.invars]


def head_costs(model, variables, example: jax.Array) -> dict[str, dict[str, int]]:
  """The inference cost of each output of a model with `eval_heads`, for one example: {"model" (its logits)
  or head name: {"flops": XLA's cost analysis of the function computing that output alone (what it does not
  need is dead code, removed), "params": the count of the params it depends on}}."""
  outputs = {"model": None, **{head_name(h): h for h in engine.eval_heads(model)}}
  example = example[:1]
  costs = {}
  for name, head in outputs.items():
    def predict(params, x, head=head):
      v = {**variables, "params": params}
      return model.apply(v, x, train=False) if head is None else model.apply(
          v, x, train=False, return_features=True)[1][head]

    compiled = jax.jit(predict).lower(variables["params"], example).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    leaves = jax.tree.leaves(variables["params"])
    used = _used_inputs(jax.make_jaxpr(predict)(variables["params"], example))[:len(leaves)]
    costs[name] = {"flops": int(round(float(analysis.get("flops", 0.0)))),
                   "params": int(sum(np.size(leaf) for leaf, u in zip(leaves, used) if u))}
  return costs


