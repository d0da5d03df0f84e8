"""`run(config, workdir)`: trains every row of a table config, in dependency order.

Each row lives in `workdir/<row>/`: `checkpoints/` (resumable train state),
`metrics.jsonl` (training metrics every `log_every_steps`, test metrics every
epoch), `final/` (the trained model, which later rows load as a teacher, with
its loss terms' connector params, which a later stage row restores) and
`result.json`. `workdir/results.json` maps each row to its result. Running the
same command again resumes an interrupted row and skips finished ones.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from kd_jax import data as data_lib
from kd_jax import models
from kd_jax.data import augment as augment_lib
from kd_jax.data.imagenet import prefetch
from kd_jax.distill import Objective
from kd_jax.distill import weight_distillation
from kd_jax.train import backend
from kd_jax.train import checkpoint as checkpoint_lib
from kd_jax.train import config as config_lib
from kd_jax.train import engine
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import optim

log = logging.getLogger(__name__)


class Preempted(SystemExit):
  """Raised after SIGTERM, once the state at the current step is checkpointed."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


class NonFiniteLoss(FloatingPointError):
  pass


@contextlib.contextmanager
def _sigterm_flag():
  """Turns SIGTERM (a TPU preemption notice) into a flag checked at each step boundary."""
  received = {"flag": False}

  def handler(signum, frame):
    del signum, frame
    received["flag"] = True

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: no handler, no flag
    previous = None
  try:
    yield received
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _fetch(tree, mesh):
  """Host copies of arrays that may be split over other processes' devices (peers over "replica")."""
  return jax.device_get(jax.jit(lambda x: x, out_shardings=mesh_lib.replicated(mesh))(tree))


def _write_json(path: str, value: Any) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class _MetricsLog:
  """Appends JSON lines to metrics.jsonl; on resume, drops lines past the restored step."""

  def __init__(self, path: str, *, resume_step: int):
    self.path = path
    self.enabled = jax.process_index() == 0
    if self.enabled and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(path, "w") as f:
        f.writelines(kept)

  def write(self, record: Mapping[str, Any]) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _padded_split(images: np.ndarray, labels: np.ndarray, batch_size: int):
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


def evaluate(eval_step, variables, dataset, batch_size: int, mesh) -> dict[str, float]:
  """Test-set accuracy, error count and mean cross-entropy (each process reads only its rows)."""
  sharding = mesh_lib.batch_sharding(mesh)
  (rows,) = mesh_lib.local_block(sharding, (batch_size,))
  totals = None
  for batch in dataset.test_batches(batch_size, rows=rows):
    sums = eval_step(variables, mesh_lib.put_local(batch, sharding, (batch_size,)))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals["count"])
  correct = np.rint(totals["correct"]).astype(int)  # [K]: one entry per peer
  result = {"test_accuracy": float(correct.mean()) / count, "test_errors": int(round(count - correct.mean())),
            "test_loss": float(totals["loss"].mean()) / count}
  if correct.size > 1:
    result["peer_test_accuracy"] = [int(c) / count for c in correct]
    result["ensemble_test_accuracy"] = float(totals["ensemble_correct"]) / count
  for name, head_correct in totals.get("head_correct", {}).items():  # early exits, SLA's heads (mean over peers)
    result[f"test_accuracy/{head_name(name)}"] = float(np.rint(head_correct).mean()) / count
  return result


def head_name(feature_name: str) -> str:
  """The metric name of an eval head: `exit_stage1_logits` -> `exit_stage1`."""
  return feature_name[:-len("_logits")] if feature_name.endswith("_logits") else feature_name


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


def _input_dtype(dataset: data_lib.Dataset) -> np.dtype:
  """uint8 for pixels; a dataset of other inputs (token ids) says so in `input_dtype`."""
  return np.dtype(getattr(dataset, "input_dtype", np.uint8))


def _normalizer(dataset: data_lib.Dataset):
  if _input_dtype(dataset) != np.uint8:
    return lambda x: x  # token ids: nothing to normalise
  return lambda x: augment_lib.normalize(x, scale=dataset.scale, mean=dataset.mean, std=dataset.std)


def _model_kwargs(row) -> dict[str, Any]:
  """The row's model options as plain JSON values (as they read back from model.json)."""
  kwargs = row.model_kwargs.to_dict() if hasattr(row.model_kwargs, "to_dict") else dict(row.model_kwargs)
  return json.loads(json.dumps(kwargs))


def _model_description(row, dataset) -> dict[str, Any]:
  return {"model": row.model, "model_kwargs": _model_kwargs(row), "num_classes": dataset.num_classes,
          "input_shape": list(dataset.input_shape), "dataset": dataset.name}


def load_teacher(directory: str, dataset: data_lib.Dataset, *, row_name: str):
  """A trained model from `directory` as (module, variables), checked against the data."""
  variables, description = checkpoint_lib.load_model(directory)
  if description["num_classes"] != dataset.num_classes:
    raise ValueError(
        f"row {row_name!r}: the teacher in {directory} has {description['num_classes']} classes, "
        f"but dataset {dataset.name!r} has {dataset.num_classes}")
  if tuple(description["input_shape"]) != dataset.input_shape:
    raise ValueError(
        f"row {row_name!r}: the teacher in {directory} was trained on inputs of shape "
        f"{tuple(description['input_shape'])}, but dataset {dataset.name!r} has {dataset.input_shape}")
  module = models.create(description["model"], num_classes=description["num_classes"], **description["model_kwargs"])
  return module, variables


def _load_init(directory: str, row, name: str):
  """Weights that start row `name` (a multi-stage recipe's previous stage): same model only."""
  variables, description = checkpoint_lib.load_model(directory)
  if description["model"] != row.model or description["model_kwargs"] != _model_kwargs(row):
    raise ValueError(
        f"row {name!r}: init_from {directory} holds a {description['model']} {description['model_kwargs']}, "
        f"but the row trains a {row.model} {_model_kwargs(row)}")
  return variables


def _labelled_split(row, dataset, *, seed: int):
  """(the row's training data, labelled mask [N] float32 or None) for `row.labelled_examples`:
  the labelled subset alone (unlabelled="drop"), or all examples with the mask ("keep")."""
  count = row.get("labelled_examples", 0)
  if not count:
    return dataset, None
  labelled = data_lib.labelled_subset(dataset.num_train, count, seed=seed)
  if row.unlabelled == "drop":
    return data_lib.train_subset(dataset, labelled), None
  mask = np.zeros(dataset.num_train, np.float32)
  mask[labelled] = 1.0
  return dataset, mask


def _load_partial_init(directory: str, current: dict[str, Any], *, peers: int, name: str) -> dict[str, Any]:
  """init_partial: the fresh {"params", "batch_stats"} (peer-stacked [K, ...]) with every leaf that `directory`'s
  model has at the same path and shape; the others keep their fresh init."""
  saved, description = checkpoint_lib.load_model(directory)
  out, restored = {}, []
  for collection in ("params", "batch_stats"):
    out[collection], got = _restore_terms(saved.get(collection, {}), current[collection], peers=peers,
                                          what=f"model {collection}", row_name=name)
    restored += got
  if not restored:
    raise ValueError(f"row {name!r}: init_partial found no param of the same path and shape in init_from "
                     f"{directory} (a {description['model']} {description['model_kwargs']})")
  fresh = [path for path, _ in jax.tree_util.tree_flatten_with_path(current["params"])[0]
           if "/".join(str(getattr(k, "key", k)) for k in path) not in restored]
  log.info("row %s: init_partial from %s: %d leaves restored (%s), %d fresh", name, directory, len(restored),
           ", ".join(restored), len(fresh))
  return out


def _check_frozen_model_paths(frozen: list[tuple[str, ...]], student_params: Any, *, name: str) -> None:
  """Each frozen "student/<module>[/...]" path names params of the row's model."""
  paths = [tuple(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(student_params)[0]]
  for f in frozen:
    if f[0] == "student" and len(f) > 1 and not any(p[:len(f) - 1] == f[1:] for p in paths):
      modules = sorted({p[0] for p in paths})
      raise ValueError(f"row {name!r}: freeze {'/'.join(f)!r} names no params of the model; its top-level "
                       f"modules are {modules}")


def _frozen_paths(row, objective: Objective) -> list[tuple[str, ...]]:
  """Param paths the optimizer leaves alone: the row's `freeze` and the terms' own `frozen_params`."""
  paths = [tuple(str(p).split("/")) for p in row.get("freeze", ())]
  for term_name, term in objective.terms.items():
    paths += [("terms", term_name, key) for key in getattr(term, "frozen_params", ())]
  return paths


def _with_frozen(optimizer, frozen: list[tuple[str, ...]]):
  """`optimizer` on every param but those under the `frozen` paths, which get no update at all."""
  if not frozen:
    return optimizer

  def labels(params):
    def label(path, _):
      keys = tuple(str(getattr(k, "key", k)) for k in path)
      return "frozen" if any(keys[:len(f)] == f for f in frozen) else "trained"
    return jax.tree_util.tree_map_with_path(label, params)

  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


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
      log.warning("row %s: init_from's %s %s has shape %s, this row's %s: not restored", row_name, what,
                  "/".join(key), value.shape, tuple(leaf.shape[1:]))
      return leaf
    restored.append("/".join(key))
    return np.broadcast_to(value, (peers,) + value.shape).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(pick, current), restored


def _ensemble_accuracy(dirs: list[str], variables, model, normalize, dataset, batch_size: int, mesh) -> float:
  """Test accuracy of the mean of the probabilities of this row's model and the models in `dirs`."""
  members = [variables] + [checkpoint_lib.load_model(d)[0] for d in dirs]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *members)
  eval_step = engine.make_eval_step(model, normalize, mesh, heads=(), rewrites=backend.ConvRewrites.default())
  totals = evaluate(eval_step, stacked, dataset, batch_size, mesh)
  return totals["ensemble_test_accuracy"]


def _teacher_cache(teacher, teacher_variables, dataset, normalize, mesh, batch_size: int) -> jax.Array:
  """The teacher's logits on every training example, [N, classes], computed once."""
  if not hasattr(dataset, "train_images"):
    raise ValueError(f"cache_teacher needs an in-memory dataset; {dataset.name!r} is streamed")
  logits_fn = engine.make_teacher_logits(teacher, normalize, mesh, rewrites=backend.ConvRewrites.default())
  chunks = [logits_fn(teacher_variables, mesh_lib.put_batch(batch, mesh_lib.batch_sharding(mesh)))
            for batch in _padded_split(dataset.train_images, dataset.train_labels, batch_size)]
  return jnp.concatenate(chunks)[:dataset.num_train]


def train_row(name: str, config: ml_collections.ConfigDict, dataset: data_lib.Dataset, mesh, workdir: str,
              *, teacher_dir: str | None = None, init_dir: str | None = None,
              ensemble_dirs: tuple[str, ...] = ()) -> dict[str, Any]:
  """Trains row `name` (resuming if interrupted); returns its result dict."""
  row = config.rows[name]
  row_dir = os.path.join(workdir, name)
  os.makedirs(row_dir, exist_ok=True)
  result_path = os.path.join(row_dir, "result.json")
  if os.path.exists(result_path):  # finished: skipped, unless its config was another one
    with open(result_path) as f:
      done = json.load(f)
    if "fingerprint" in done:
      config_lib.check_resume(done["fingerprint"], config_lib.fingerprint(config, name),
                              allow=config.allow_config_change, row=name, made=f"the finished {result_path} was made")
    else:
      log.warning("row %s: %s has no config fingerprint (an older run); reusing it unchecked", name, result_path)
    return done

  batch_size = config.data.batch_size
  dataset, labelled_mask = _labelled_split(row, dataset, seed=config.seed)
  mesh_lib.check_batch_size(batch_size, mesh.shape["data"], what="data.batch_size", axis="data")
  mesh_lib.check_batch_size(config.data.eval_batch_size, mesh.devices.size, what="data.eval_batch_size")
  if row.peers % mesh.shape["replica"]:
    raise ValueError(f"row {name!r}: {row.peers} peers cannot be spread over mesh.replica="
                     f"{mesh.shape['replica']} replica groups; use a divisor of {row.peers} (or 1)")
  steps_per_epoch = data_lib.steps_per_epoch(dataset.num_train, batch_size)
  epochs = config_lib.row_epochs(config, name)
  total_steps = epochs * steps_per_epoch
  # A smoke run stops early (config.max_steps) on the full run's schedule.
  stop_step = min(total_steps, config.max_steps) if config.max_steps else total_steps
  normalize = _normalizer(dataset)
  if _input_dtype(dataset) != np.uint8 and row.augment != "none":
    raise ValueError(f"row {name!r}: augment={row.augment!r} needs images, but dataset {dataset.name!r} has "
                     f"{_input_dtype(dataset)} inputs (token ids); use augment='none'")

  objective = Objective(row.terms.to_dict() if hasattr(row.terms, "to_dict") else row.terms,
                        steps_per_epoch=steps_per_epoch, num_train=dataset.num_train)
  teacher, teacher_variables = None, {}
  if objective.needs_teacher:
    if not teacher_dir:
      raise ValueError(f"row {name!r} uses a teacher (terms {list(row.terms)}) but rows.{name}.teacher is empty")
    teacher, teacher_variables = load_teacher(teacher_dir, dataset, row_name=name)
  student = models.create(row.model, num_classes=dataset.num_classes, **_model_kwargs(row))
  expected_shape = models.input_shape(row.model)
  if expected_shape is not None and expected_shape != dataset.input_shape:
    raise ValueError(f"row {name!r}: model {row.model!r} takes inputs {expected_shape}, "
                     f"but dataset {dataset.name!r} has {dataset.input_shape}")

  generator = None
  if row.weight_generator.enabled:
    if teacher is None:
      raise ValueError(f"row {name!r}: weight_generator needs a teacher (and a term that uses it, e.g. 'kd')")
    shapes = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0),
                                                 normalize(jnp.zeros((1,) + dataset.input_shape,
                                                                     _input_dtype(dataset)))))
    generator = weight_distillation.make_plan(shapes["params"], teacher_variables["params"],
                                              layer_pattern=row.weight_generator.layer_pattern)
  schedule = optim.make_schedule(row.schedule, base_lr=row.optimizer.learning_rate,
                                 steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  frozen = _frozen_paths(row, objective)
  spec = engine.StepSpec(
      student=student, objective=objective,
      optimizer=_with_frozen(optim.make_optimizer(row.optimizer, schedule), frozen),
      schedule=schedule, normalize=normalize, teacher=teacher, augment=row.augment, max_norm=row.max_norm,
      teacher_input=row.teacher_input, peers=row.peers, exchange=row.exchange.mode, exchange_every=row.exchange.every_steps,
      teacher_cache=row.cache_teacher, generator=generator, sequential_peers=mesh.shape["replica"] == 1,
      compute_dtype=config.compute_dtype, rewrites=backend.ConvRewrites.default())

  replicated = mesh_lib.replicated(mesh)
  teacher_variables = jax.device_put(teacher_variables, replicated)
  if row.cache_teacher:
    if teacher is None:
      raise ValueError(f"row {name!r}: cache_teacher is set but the row has no teacher")
    teacher_variables = {"cache": _teacher_cache(teacher, teacher_variables, dataset, normalize, mesh,
                                                 config.data.eval_batch_size)}
  example = jnp.zeros((mesh.devices.size,) + dataset.input_shape, _input_dtype(dataset))
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(lambda: engine.init_state(spec, rng, teacher_variables, example))
  state_sharding = engine.state_shardings(mesh, abstract_state, spec)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sharding)

  _check_frozen_model_paths(frozen, abstract_state.params["student"], name=name)
  fingerprint = config_lib.fingerprint(config, name)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(row_dir, "checkpoints"), keep=config.keep_checkpoints)
  restored = checkpointer.restore_latest(abstract_state)
  if restored is None:
    state = backend.jit(engine.init_state, static_argnums=0, out_shardings=state_sharding)(
        spec, rng, teacher_variables, example)
    restored_terms = []
    if init_dir:
      peers = lambda tree: jax.tree.map(lambda x: np.broadcast_to(x, (row.peers,) + x.shape), tree)
      if row.get("init_partial", False):
        start = _load_partial_init(init_dir, _fetch({"params": state.params["student"],
                                                     "batch_stats": state.batch_stats["student"]}, mesh),
                                   peers=row.peers, name=name)
        peers = lambda tree: tree  # already one entry per peer
      else:
        start = _load_init(init_dir, row, name)
      saved_terms = checkpoint_lib.load_terms(init_dir)
      # Connector state only: memory banks (row-sharded) start afresh and never leave the devices.
      connector_state = {k: v for k, v in state.method_state.items()
                         if not spec.objective.terms[k].shard_state_rows}
      current = _fetch({"params": state.params["terms"], "state": connector_state}, mesh)
      term_params, restored_terms = _restore_terms(saved_terms.get("params", {}), current["params"],
                                                   peers=row.peers, what="term param", row_name=name)
      term_state, _ = _restore_terms(saved_terms.get("state", {}), current["state"], peers=row.peers,
                                     what="term state", row_name=name)
      if restored_terms:
        log.info("row %s: term params restored from %s: %s", name, init_dir, ", ".join(restored_terms))
      params = {**state.params, "student": peers(start["params"]), "terms": term_params}
      state = jax.device_put(state.replace(
          params=params, batch_stats={"student": peers(start.get("batch_stats", {}))},
          method_state={**state.method_state, **term_state}, opt_state=spec.optimizer.init(params)),
          state_sharding)
    for path in frozen:
      if path[0] == "terms" and len(path) > 2 and not any(
          r.startswith("/".join(path[1:]) + "/") for r in restored_terms):
        raise ValueError(
            f"row {name!r}: term {path[1]!r} keeps its {'/'.join(path[2:])!r} params frozen, but init_from "
            f"({row.init_from or 'not set'}) does not provide them: train them first in a stage row (e.g. "
            f"FT's stage='paraphraser' row) and start this row from it with init_from")
    history, elapsed = [], 0.0
  else:
    state, meta = restored
    config_lib.check_resume(meta.get("fingerprint", {}), fingerprint, allow=config.allow_config_change, row=name)
    history, elapsed = list(meta.get("history", [])), float(meta.get("elapsed", 0.0))
  start_step = int(jax.device_get(state.step))
  if start_step:
    log.info("row %s: resuming at step %d of %d", name, start_step, stop_step)

  train_step = engine.make_train_step(spec, mesh, state_sharding)
  eval_step = engine.make_eval_step(student, normalize, mesh, sequential=spec.sequential_peers,
                                    compute_dtype=spec.compute_dtype, rewrites=spec.rewrites)
  metrics_log = _MetricsLog(os.path.join(row_dir, "metrics.jsonl"), resume_step=start_step)
  batch_sharding = engine.batch_sharding(mesh, spec)

  def student_variables(state):
    """All peers' variables, stacked [K, ...] (generated, for a weight generator)."""
    params = jax.vmap(lambda p: engine.student_params(spec, p, teacher_variables))(state.params["student"])
    return engine._variables(params, state.batch_stats["student"])

  def save(state, step):
    checkpointer.save(step, state, {"fingerprint": fingerprint, "history": history,
                                    "elapsed": elapsed + time.time() - t0})

  def drain(pending, bar):
    """Host-side handling of metrics the device has (almost surely) finished computing."""
    for step, device_metrics in pending:
      values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not values.pop("finite", 1.0):
        check_finite(state)  # names the exact step and term (unless skipping is on)
      metrics_log.write({"step": step, "split": "train", **values})
      bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}")
    pending.clear()

  def check_finite(state):
    bad_step, values = jax.device_get((state.nonfinite_step, state.nonfinite_values))
    if bad_step >= 0 and not config.skip_nonfinite:
      detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(engine.value_names(spec), values))
      bad = [k for k, v in zip(engine.value_names(spec), values) if not np.isfinite(v)]
      raise NonFiniteLoss(
          f"row {name!r}: non-finite {', '.join(bad)} at step {int(bad_step)} ({detail}); the last checkpoint "
          f"in {checkpointer.directory} holds a state before it. Set --config.skip_nonfinite=True to skip "
          "such steps instead.")
    return int(bad_step)

  local = mesh_lib.local_block(batch_sharding, (spec.streams, batch_size))
  data_offset = row.get("data_start_epoch", 0) * steps_per_epoch  # a stage that continues a run's data order
  # Read and placed on the devices in a background thread, 2 steps ahead: the host-to-device copy overlaps
  # the step in flight.
  batches = prefetch((mesh_lib.put_local(_train_batch(dataset, batch_size, seed=config.seed, step=data_offset + step,
                                                      streams=spec.streams, block=local, labelled=labelled_mask),
                                         batch_sharding, (spec.streams, batch_size))
                      for step in range(start_step, stop_step)), 2)
  t0 = time.time()
  pending: list = []
  bar = tqdm.tqdm(total=stop_step, initial=start_step, desc=name, unit="step", dynamic_ncols=True, leave=False,
                  disable=not config.progress or jax.process_index() != 0,
                  mininterval=0.1 if sys.stderr.isatty() else 10.0)
  with _sigterm_flag() as sigterm, bar, contextlib.closing(batches):
    for step, batch in zip(range(start_step, stop_step), batches):
      state, metrics = train_step(state, teacher_variables, batch)
      done = step + 1
      bar.update(1)
      if done % config.log_every_steps == 0:
        drain(pending, bar)  # the previous interval's metrics: no wait on this step
        pending.append((done, metrics))
      if done % steps_per_epoch == 0:
        drain(pending, bar)
        check_finite(state)
        epoch = done // steps_per_epoch
        test = evaluate(eval_step, student_variables(state), dataset, config.data.eval_batch_size, mesh)
        history.append({"epoch": epoch, "step": done, **test})
        metrics_log.write({"step": done, "split": "test", "epoch": epoch, **test})
      if sigterm["flag"]:
        drain(pending, bar)  # else the last logged step's metrics are lost: the resumed run starts after it
        check_finite(state)
        save(state, done)
        checkpointer.close()
        log.warning("row %s: SIGTERM received; checkpointed step %d, exiting", name, done)
        raise Preempted(done)
      if done % config.checkpoint_every_steps == 0 and done < stop_step:
        check_finite(state)
        save(state, done)
    drain(pending, bar)

  if check_finite(state) >= 0:
    log.warning("row %s: some steps had non-finite loss and were skipped (first: %d)", name,
                int(jax.device_get(state.nonfinite_step)))
  if stop_step not in checkpointer.steps():
    save(state, stop_step)
  checkpointer.close()
  final = history[-1] if history and history[-1]["step"] == stop_step else {
      **evaluate(eval_step, student_variables(state), dataset, config.data.eval_batch_size, mesh)}
  # The exported model is peer 0 (the only one, but for online methods).
  # Memory banks (per-example rows) are this run's, not a connector: they stay out of final/.
  keep_state = {k: v for k, v in state.method_state.items() if not spec.objective.terms[k].shard_state_rows}
  checkpoint_lib.save_model(os.path.join(row_dir, "final"), engine.unstack(_fetch(student_variables(state), mesh)),
                            _model_description(row, dataset),
                            terms=engine.unstack(_fetch({"params": state.params["terms"], "state": keep_state}, mesh)))
  if ensemble_dirs:
    final["ensemble_test_accuracy"] = _ensemble_accuracy(
        list(ensemble_dirs), engine.unstack(_fetch(student_variables(state), mesh)), student, normalize,
        dataset, config.data.eval_batch_size, mesh)
  if engine.eval_heads(student):  # early exits: what each exit costs, next to its accuracy
    final["cost"] = head_costs(student, engine.unstack(_fetch(student_variables(state), mesh)),
                               normalize(engine.model_inputs(example)))
  result = {
      **final,
      "best_test_accuracy": max([h["test_accuracy"] for h in history] + [final["test_accuracy"]]),
      "epochs": epochs, "steps": stop_step, "model": row.model,
      "num_params": int(sum(np.size(x) for x in jax.tree.leaves(student_variables(state)["params"]))) // row.peers,
      "wall_time_s": round(elapsed + time.time() - t0, 2), "history": history,
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "fingerprint": fingerprint,
  }
  _write_json(result_path, result)
  return result


def _train_batch(dataset, batch_size: int, *, seed: int, step: int, streams: int = 1,
                 block: tuple[slice, slice] = (slice(None), slice(None)),
                 labelled: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """This process's block of the global batch {"image": [S, B, ...], "label": [S, B], "index": [S, B]}
  (and "labelled": float32 [S, B], 1 on labelled examples, when `labelled` [N] is given)."""
  stream_range = range(streams)[block[0]]
  parts = [dataset.train_batch(seed, step, batch_size, rows=block[1], stream=s) for s in stream_range]
  if labelled is not None:
    parts = [{**p, "labelled": labelled[p["index"]]} for p in parts]
  return {key: np.stack([p[key] for p in parts]) for key in parts[0]}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
  """Trains every row of `config` under `workdir`; returns {row: result}."""
  config = config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  dataset = data_lib.load(config.data.name, directory=config.data.dir or None)
  mesh = mesh_lib.make_mesh(replica=config.mesh.replica, data=config.mesh.data)
  results = {}
  model_dir = lambda ref: (os.path.join(workdir, ref, "final") if ref in config.rows else ref) if ref else None
  for name in config_lib.row_order(config):
    row = config.rows[name]
    results[name] = train_row(name, config, dataset, mesh, workdir, teacher_dir=model_dir(row.teacher),
                              init_dir=model_dir(row.init_from),
                              ensemble_dirs=tuple(model_dir(r) for r in row.ensemble_with))
    summary = {k: v for k, v in results[name].items() if k != "history"}
    log.info("row %s: %s", name, summary)
  _write_json(os.path.join(workdir, "results.json"), results)
  return results
