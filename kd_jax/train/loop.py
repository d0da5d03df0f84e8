"""`run(config, workdir)`: trains every row of a table config, in dependency order.

Each row lives in `workdir/<row>/`: `checkpoints/` (resumable train state),
`metrics.jsonl` (training metrics every `log_every_steps`, test metrics every
epoch), `final/` (the trained model, which later rows load as a teacher, with
its loss terms' connector params, which a later stage row restores) and
`result.json`. `workdir/results.json` maps each row to its result. Running the
same command again resumes an interrupted row and skips finished ones.

The path of a row: `plan` (read and check the config: every row before any
trains) -> `stages.load_source` (teacher, cache, generator) -> a fresh or
restored state -> `fit` (the step loop: metrics, checkpoints, preemption,
evaluation) -> export of the trained model and its result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from kd_jax import data as data_lib
from kd_jax.train import backend
from kd_jax.train import checkpoint as checkpoint_lib
from kd_jax.train import config as config_lib
from kd_jax.train import distributed
from kd_jax.train import files
from kd_jax.train import engine
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import planning as plan_lib
from kd_jax.train import stages
from kd_jax.train import summaries as summaries_lib
from kd_jax.train.evaluation import evaluate, head_name  # noqa: F401  (public: kd_jax.train.evaluate)

log = logging.getLogger(__name__)


class Preempted(SystemExit):
  """Raised after SIGTERM (143) or Ctrl-C (130), once the state at the current step is checkpointed."""

  def __init__(self, step: int, code: int = 143):
    super().__init__(code)
    self.step = step


class NonFiniteLoss(FloatingPointError):
  pass


@contextlib.contextmanager
def _stop_signals():
  """SIGTERM (a TPU preemption notice) and SIGINT (Ctrl-C) become a flag checked at each step boundary:
  the loop checkpoints and exits. A second Ctrl-C aborts at once."""
  received = {"signal": None}

  def handler(signum, frame):
    del frame
    if signum == signal.SIGINT and received["signal"] == signal.SIGINT:
      raise KeyboardInterrupt
    received["signal"] = signum

  previous = {}
  for signum in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: no handler, no flag
      pass
  try:
    yield received
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


class _MetricsLog:
  """Training and test metrics to metrics.jsonl (JSON lines; on resume, lines past the restored step are
  dropped) and to TensorBoard (`train/<metric>` with `train/images_per_s`, `eval/<figure>`), process 0 only."""

  def __init__(self, row_dir: str, *, resume_step: int, images_per_step: int):
    self.path = f"{row_dir}/metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self.images_per_step = images_per_step
    self.last: tuple[int, float] | None = None  # (step, time) of the last train record
    if self.enabled and files.exists(self.path):
      files.write_lines(self.path, [line for line in files.read_lines(self.path)
                                    if json.loads(line)["step"] <= resume_step])
    # TensorBoard's writer takes local directories (a remote workdir keeps metrics.jsonl only).
    self.summaries = summaries_lib.Summaries(row_dir if self.enabled and not files.is_remote(row_dir) else None)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    files.append_json_line(self.path, record)
    split, step = record["split"], record["step"]
    scalars = {f"{'train' if split == 'train' else 'eval'}/{k}": v for k, v in record.items()
               if k not in ("step", "split") and isinstance(v, (int, float))}
    if split == "train":
      now = time.time()
      if self.last is not None and step > self.last[0] and now > self.last[1]:
        scalars["train/images_per_s"] = (step - self.last[0]) * self.images_per_step / (now - self.last[1])
      self.last = (step, now)
    self.summaries.scalars(step, scalars)

  def close(self) -> None:
    self.summaries.close()


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


def _labelled_split(data: plan_lib.DataView, dataset):
  """(the row's training data, labelled mask [N] float32 or None): the labelled subset alone
  (unlabelled="drop"), or all examples with the mask ("keep")."""
  if not data.labelled:
    return dataset, None
  labelled = data_lib.labelled_subset(dataset.num_train, data.labelled, seed=data.seed)
  if data.unlabelled == "drop":
    return data_lib.train_subset(dataset, labelled), None
  mask = np.zeros(dataset.num_train, np.float32)
  mask[labelled] = 1.0
  return dataset, mask


@dataclasses.dataclass
class _Row:
  """A row in training: its plan, step, data, state's placement, files and history so far."""

  plan: plan_lib.RowPlan
  spec: engine.StepSpec
  dataset: Any
  labelled: np.ndarray | None
  mesh: Any
  constants: Any
  state_sharding: Any
  checkpointer: checkpoint_lib.Checkpointer
  row_dir: str
  history: list
  elapsed: float

  def variables(self, state):
    """All peers' model variables, stacked [K, ...] (mapped by the param map, e.g. generated)."""
    params = jax.vmap(lambda p: engine.model_params(self.spec, p, self.constants))(state.params["student"])
    return engine._variables(params, state.batch_stats["student"])

  def evaluate(self, state) -> dict[str, Any]:
    return evaluate(self.eval_step, self.variables(state), self.dataset, self.plan.data.eval_batch_size, self.mesh)

  @property
  def eval_step(self):
    if not hasattr(self, "_eval_step"):
      self._eval_step = engine.make_eval_step(self.spec.student, self.plan.normalize, self.mesh,
                                              sequential=self.spec.sequential_peers,
                                              compute_dtype=self.spec.compute_dtype, rewrites=self.spec.rewrites)
    return self._eval_step

  def save(self, state, step: int, started: float) -> None:
    self.checkpointer.save(step, state, {"fingerprint": self.plan.fingerprint, "history": self.history,
                                         "elapsed": self.elapsed + time.time() - started})

  def check_finite(self, state) -> int:
    """The first non-finite step (-1: none); raises unless the row skips such steps."""
    bad_step, values = jax.device_get((state.nonfinite_step, state.nonfinite_values))
    if bad_step >= 0 and not self.plan.options.skip_nonfinite:
      names = engine.value_names(self.spec)
      detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values))
      bad = [k for k, v in zip(names, values) if not np.isfinite(v)]
      raise NonFiniteLoss(
          f"row {self.plan.name!r}: non-finite {', '.join(bad)} at step {int(bad_step)} ({detail}); the last "
          f"checkpoint in {self.checkpointer.directory} holds a state before it. Set "
          "--config.skip_nonfinite=True to skip such steps instead.")
    return int(bad_step)


def step_spec(plan: plan_lib.RowPlan, source, param_map, mesh) -> engine.StepSpec:
  """The train step's static description for the planned row and its loaded source."""
  return engine.StepSpec(
      student=plan.student, objective=plan.objective, optimizer=plan.optimizer, schedule=plan.schedule,
      normalize=plan.normalize, source=source, param_map=param_map, augment=plan.data.augment, peers=plan.peers,
      sequential_peers=mesh.shape["replica"] == 1, compute_dtype=plan.compute_dtype, rewrites=plan.rewrites)


def _start(plan: plan_lib.RowPlan, dataset, mesh, row_dir: str) -> tuple[_Row, engine.TrainState]:
  """The row's step and its state: restored from the latest checkpoint (same fingerprint), or fresh."""
  dataset, labelled = _labelled_split(plan.data, dataset)
  source, param_map, constants = stages.load_source(plan, dataset, mesh)
  spec = step_spec(plan, source, param_map, mesh)
  example = jnp.zeros((mesh.devices.size,) + dataset.input_shape, plan.input_dtype)
  rng = jax.random.PRNGKey(plan.data.seed)
  abstract = jax.eval_shape(lambda: engine.init_state(spec, rng, constants, example))
  state_sharding = engine.state_shardings(mesh, abstract, spec)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
  checkpointer = checkpoint_lib.Checkpointer(f"{row_dir}/checkpoints",
                                             keep=plan.options.keep_checkpoints)
  row = _Row(plan, spec, dataset, labelled, mesh, constants, state_sharding, checkpointer, row_dir, [], 0.0)
  restored = checkpointer.restore_latest(abstract)
  if restored is None:
    state = backend.jit(engine.init_state, static_argnums=0, out_shardings=state_sharding)(
        spec, rng, constants, example)
    return row, stages.initialise(plan, spec, state, mesh, state_sharding)
  state, meta = restored
  config_lib.check_resume(meta.get("fingerprint", {}), plan.fingerprint, allow=plan.options.allow_config_change,
                          row=plan.name)
  row.history, row.elapsed = list(meta.get("history", [])), float(meta.get("elapsed", 0.0))
  return row, state


def _agreed_stop(stop, done: int, stop_step: int, every: int = 10) -> bool:
  """Whether every process stops after step `done`: a signal seen by any process, agreed on (an all-gather)
  every `every` steps and at the last step when there are several processes, at each step on one."""
  if jax.process_count() > 1 and done % every and done != stop_step:
    return False
  return distributed.any_process(stop["signal"] is not None)


def _batches(row: _Row, start: int):
  """The placed global batches of steps start.. (read and placed 2 steps ahead in a background thread)."""
  plan, sharding = row.plan, engine.batch_sharding(row.mesh, row.spec)
  shape = (row.spec.streams, plan.data.batch_size)
  local = mesh_lib.local_block(sharding, shape)
  return data_lib.prefetch((mesh_lib.put_local(_train_batch(
      row.dataset, plan.data.batch_size, seed=plan.data.seed, step=plan.data.offset + step,
      streams=row.spec.streams, block=local, labelled=row.labelled), sharding, shape)
      for step in range(start, plan.stop_step)), 2)


def _progress(plan: plan_lib.RowPlan, start: int):
  """The row's progress bar (process 0, when `progress` is on)."""
  return tqdm.tqdm(total=plan.stop_step, initial=start, desc=plan.name, unit="step", dynamic_ncols=True,
                   leave=False, disable=not plan.options.progress or jax.process_index() != 0,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)


def _preempt(row: _Row, state, done: int, started: float, signum) -> None:
  """Checkpoints step `done` and exits: 130 after Ctrl-C, 143 after SIGTERM (or another host's signal)."""
  row.check_finite(state)
  row.save(state, done, started)
  row.checkpointer.close()
  name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
  log.warning("row %s: %s received; checkpointed step %d, exiting", row.plan.name, name, done)
  raise Preempted(done, 130 if signum == signal.SIGINT else 143)


def fit(row: _Row, state: engine.TrainState, wrap_step=None) -> engine.TrainState:
  """The step loop: train, log, evaluate each epoch, checkpoint (by steps and by wall time), and on
  SIGTERM / Ctrl-C checkpoint the current step and exit (`Preempted`). `wrap_step(step) -> step` wraps the
  compiled train step (to time or profile it)."""
  plan, options = row.plan, row.plan.options
  start = int(jax.device_get(state.step))
  if start:
    log.info("row %s: resuming at step %d of %d", plan.name, start, plan.stop_step)
  train_step = engine.make_train_step(row.spec, row.mesh, row.state_sharding)
  train_step = wrap_step(train_step) if wrap_step is not None else train_step
  metrics_log = _MetricsLog(row.row_dir, resume_step=start,
                            images_per_step=row.spec.streams * plan.data.batch_size)
  started = last_save = time.time()
  pending: list = []  # (step, device metrics): read one interval later, so the host never waits on the step
  bar = _progress(plan, start)

  def drain():
    for step, device_metrics in pending:
      values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not values.pop("finite", 1.0):
        row.check_finite(state)  # names the exact step and term (unless skipping is on)
      metrics_log.write({"step": step, "split": "train", **values})
      bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}")
    pending.clear()

  dispatched = distributed.DispatchLimit()  # a bounded queue of steps: several CPU processes deadlock on more
  with _stop_signals() as stop, bar, contextlib.closing(metrics_log), \
      contextlib.closing(_batches(row, start)) as batches:
    for step, batch in zip(range(start, plan.stop_step), batches):
      state, metrics = train_step(state, row.constants, batch)
      dispatched(metrics)
      done = step + 1
      bar.update(1)
      if done % options.log_every_steps == 0 or done == plan.stop_step:
        drain()
        pending.append((done, metrics))
      if done % plan.steps_per_epoch == 0:
        drain()
        row.check_finite(state)
        test = row.evaluate(state)
        row.history.append({"epoch": done // plan.steps_per_epoch, "step": done, **test})
        metrics_log.write({"step": done, "split": "test", "epoch": done // plan.steps_per_epoch, **test})
      if _agreed_stop(stop, done, plan.stop_step):
        drain()
        _preempt(row, state, done, started, stop["signal"])
      by_time = time.time() - last_save >= options.checkpoint_every_seconds
      if (done % options.checkpoint_every_steps == 0 or by_time) and done < plan.stop_step:
        row.check_finite(state)
        row.save(state, done, started)
        last_save = time.time()
    drain()
  row.elapsed += time.time() - started
  return state


def _finish(row: _Row, state: engine.TrainState) -> dict[str, Any]:
  """The last checkpoint, the exported model (peer 0) in final/, and the row's result."""
  plan = row.plan
  if row.check_finite(state) >= 0:
    log.warning("row %s: some steps had non-finite loss and were skipped (first: %d)", plan.name,
                int(jax.device_get(state.nonfinite_step)))
  if plan.stop_step not in row.checkpointer.steps():
    row.save(state, plan.stop_step, time.time())
  row.checkpointer.close()
  history = row.history
  if not history or history[-1]["step"] != plan.stop_step:  # a run that stops mid-epoch (max_steps)
    history.append({"epoch": round(plan.stop_step / plan.steps_per_epoch, 4), "step": plan.stop_step,
                    **row.evaluate(state)})
  final = dict(history[-1])
  model = engine.unstack(stages._fetch(row.variables(state), row.mesh))
  # Memory banks (per-example rows) are this run's, not a connector: they stay out of final/.
  keep = {k: v for k, v in state.method_state.items() if not row.spec.objective.terms[k].shard_state_rows}
  checkpoint_lib.save_model(f"{row.row_dir}/final", model, plan.description,
                            terms=engine.unstack(stages._fetch({"params": state.params["terms"], "state": keep},
                                                               row.mesh)))
  if plan.ensemble_with:
    final["ensemble_test_accuracy"] = stages.ensemble_accuracy(
        list(plan.ensemble_with), model, plan.student, plan.normalize, row.dataset, plan.data.eval_batch_size,
        row.mesh, rewrites=plan.rewrites)
  if engine.eval_heads(plan.student):  # early exits: what each exit costs, next to its accuracy
    example = jnp.zeros((1,) + row.dataset.input_shape, plan.input_dtype)
    final["cost"] = stages.head_costs(plan.student, model, plan.normalize(engine.model_inputs(example)))
  return {
      **final,
      "best_test_accuracy": max([h["test_accuracy"] for h in history] + [final["test_accuracy"]]),
      "epochs": plan.epochs, "steps": plan.stop_step, "model": plan.description["model"],
      "num_params": int(sum(np.size(x) for x in jax.tree.leaves(model["params"]))),
      "wall_time_s": round(row.elapsed, 2), "history": history,
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "fingerprint": plan.fingerprint,
  }


def train_row(plan: plan_lib.RowPlan, dataset: data_lib.Dataset, mesh, workdir: str, *,
              wrap_step=None) -> dict[str, Any]:
  """Trains the planned row (resuming if interrupted; a finished row is read back); returns its result."""
  row_dir = f"{workdir.rstrip('/')}/{plan.name}"
  files.makedirs(row_dir)
  result_path = f"{row_dir}/result.json"
  if files.exists(result_path):  # finished: skipped, unless its config was another one
    done = files.read_json(result_path)
    config_lib.check_resume(done.get("fingerprint", {}), plan.fingerprint, allow=plan.options.allow_config_change,
                            row=plan.name, made=f"the finished {result_path} was made")
    return done
  if plan.published:
    result = _evaluate_published(plan, dataset, mesh)
  else:
    row, state = _start(plan, dataset, mesh, row_dir)
    state = fit(row, state, wrap_step)
    result = _finish(row, state)
  files.write_json(result_path, result)
  return result


def _evaluate_published(plan: plan_lib.RowPlan, dataset, mesh) -> dict[str, Any]:
  """The result of a row that stands for a trained model (`checkpoint`): its test figures, not trained."""
  module, variables = stages.load_teacher(plan.published, dataset, row_name=plan.name)
  eval_step = engine.make_eval_step(module, plan.normalize, mesh, compute_dtype=plan.compute_dtype,
                                    rewrites=plan.rewrites)
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], variables)
  result = evaluate(eval_step, stacked, dataset, plan.data.eval_batch_size, mesh)
  log.info("row %s: the trained model in %s, evaluated (not trained): %s", plan.name, plan.published, result)
  model = files.read_json(f"{plan.published}/model.json")["model"]
  return {**result, "published": plan.published, "history": [], "steps": 0, "epochs": 0, "model": model,
          "num_params": int(sum(np.size(x) for x in jax.tree.leaves(variables["params"]))),
          "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "fingerprint": plan.fingerprint}


def run(config: ml_collections.ConfigDict, workdir: str, *, wrap_step=None) -> dict[str, dict[str, Any]]:
  """Trains every row of `config` under `workdir`; returns {row: result}. Every row is planned (its config
  checked) before the first trains. `wrap_step`: see `fit` (the benchmark times the loop with it)."""
  config = config_lib.validate(config)
  files.makedirs(workdir)
  dataset = data_lib.load(config.data.name, directory=config.data.dir or None)
  mesh = mesh_lib.make_mesh(replica=config.mesh.replica, data=config.mesh.data)
  plans = plan_lib.check(config, dataset, workdir=workdir, mesh_shape=(mesh.shape["replica"], mesh.shape["data"]))
  results = {}
  for name, plan in plans.items():
    results[name] = train_row(plan, dataset, mesh, workdir, wrap_step=wrap_step)
    log.info("row %s: %s", name, {k: v for k, v in results[name].items() if k != "history"})
  files.write_json(f"{workdir.rstrip('/')}/results.json", results)
  return results
