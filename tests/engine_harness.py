"""The train room as the engine tests see it: one row of a config, built as `kd_jax.train.run` builds it.

The engine tests (tests/test_engine.py) talk to the engine only through this
module, so a redesign of kd_jax/train re-implements `build` and `Harness` here
and leaves the tests alone. It plans the row (`kd_jax.train.plan`), loads its
source and builds its step as `kd_jax/train/loop.py` does, minus checkpoints,
logging and `init`.

Param groups are named "student" (the trained model) and "terms/<term>" (a loss
term's connector params); every leaf has a leading peer axis [K, ...].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import models
from kd_jax.distill import Objective
from kd_jax.train import backend
from kd_jax.train import checkpoint as checkpoint_lib
from kd_jax.train import engine
from kd_jax.train import loop
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import planning
from kd_jax.train import stages


def save_random_model(directory: str, model: str, dataset, *, seed: int = 0, **model_kwargs) -> str:
  """A freshly initialised zoo model written where a row's `teacher` can name it; returns `directory`."""
  module = models.create(model, num_classes=dataset.num_classes, **model_kwargs)
  example = jnp.zeros((2,) + dataset.input_shape, jnp.float32)
  variables = jax.device_get(module.init(jax.random.PRNGKey(seed), example, train=False))
  checkpoint_lib.save_model(directory, variables, {
      "model": model, "model_kwargs": dict(model_kwargs), "num_classes": dataset.num_classes,
      "input_shape": list(dataset.input_shape), "dataset": dataset.name})
  return directory


@dataclasses.dataclass
class Harness:
  """One row's compiled train and eval steps and what a test needs to check them by hand."""

  config: ml_collections.ConfigDict
  row: ml_collections.ConfigDict
  dataset: Any
  mesh: Any
  spec: engine.StepSpec
  teacher_variables: Any
  state_sharding: Any
  _train_step: Any
  _eval_step: Any

  @property
  def student(self):
    """The trained flax module (one peer)."""
    return self.spec.student

  @property
  def teacher(self):
    """The frozen teacher module, or None."""
    return getattr(self.spec.source, "module", None)

  @property
  def objective(self) -> Objective:
    return self.spec.objective

  @property
  def optimizer(self):
    return self.spec.optimizer

  @property
  def peers(self) -> int:
    return self.spec.peers

  def normalize(self, images) -> jax.Array:
    """Raw batch images [B, ...] -> the model's float inputs (no augmentation)."""
    return self.spec.normalize(engine.model_inputs(jnp.asarray(images)))

  def _init_args(self):
    example = jnp.zeros((self.mesh.devices.size,) + self.dataset.input_shape, np.uint8)
    return self.spec, jax.random.PRNGKey(self.config.seed), self.teacher_variables, example

  def init_state(self):
    """The row's fresh state, as a run starts it (params, optimizer and term state from the seed)."""
    init = backend.jit(engine.init_state, static_argnums=0, out_shardings=self.state_sharding)
    return init(*self._init_args())

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The global training batch of `step` (host arrays): [B, ...] for one data stream, [S, B, ...] for S."""
    batch = loop._train_batch(self.dataset, self.config.data.batch_size, seed=self.config.seed, step=step,
                              streams=self.spec.streams)
    return batch if self.spec.streams > 1 else {k: v[0] for k, v in batch.items()}

  def step(self, state, batch) -> tuple[Any, dict[str, float]]:
    """One train step on `batch` (as `batch` returns it); `state` itself is left intact (the step donates a copy)."""
    stacked = batch if self.spec.streams > 1 else {k: np.asarray(v)[None] for k, v in batch.items()}
    placed = mesh_lib.put_batch(stacked, engine.batch_sharding(self.mesh, self.spec))
    state, metrics = self._train_step(jax.tree.map(jnp.copy, state), self.teacher_variables, placed)
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  def step_index(self, state) -> int:
    return int(jax.device_get(state.step))

  def evaluate(self, state, batch_size: int) -> dict[str, Any]:
    """Test-set metrics as the run reports them (`kd_jax.train.evaluate`)."""
    return loop.evaluate(self._eval_step, self.student_variables(state), self.dataset, batch_size, self.mesh)

  def student_variables(self, state) -> dict[str, Any]:
    """Every peer's {"params", "batch_stats"}, stacked [K, ...]."""
    return engine._variables(state.params["student"], state.batch_stats["student"])

  def param_groups(self, state) -> dict[str, Any]:
    """{"student": ..., "terms/<term>": ...} host copies, [K, ...]."""
    params = jax.device_get(state.params)
    return {"student": params["student"], **{f"terms/{k}": v for k, v in params["terms"].items()}}

  def with_param_groups(self, state, groups: dict[str, Any]):
    """`state` with the named param groups replaced (same structure)."""
    params = dict(state.params)
    terms = dict(params["terms"])
    for name, tree in groups.items():
      if name == "student":
        params["student"] = tree
      else:
        terms[name.removeprefix("terms/")] = tree
    params["terms"] = terms
    return jax.device_put(state.replace(params=params), self.state_sharding)

  def term_state(self, state) -> dict[str, Any]:
    """The terms' state (connector BatchNorm statistics, memory banks), [K, ...]."""
    return jax.device_get(state.method_state)

  def objective_rngs(self, state) -> jax.Array:
    """The key each peer's objective reads as batch["rng"] at the state's step, [K, 2]: the step key is
    fold_in(seed key, step); its second half, folded with 1 and then the peer index, goes to the objective."""
    step_rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), state.step)
    _, dropout_rng = jax.random.split(step_rng)
    terms_rng = jax.random.fold_in(dropout_rng, 1)
    return jnp.stack([jax.random.fold_in(terms_rng, k) for k in range(self.peers)])

  def save(self, state, directory: str) -> None:
    checkpointer = checkpoint_lib.Checkpointer(directory)
    checkpointer.save(self.step_index(state), state, {})
    checkpointer.close()

  def restore(self, directory: str):
    """The newest state saved under `directory`, placed as the run places it."""
    spec, *args = self._init_args()
    abstract = jax.eval_shape(lambda *a: engine.init_state(spec, *a), *args)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_sharding)
    checkpointer = checkpoint_lib.Checkpointer(directory)
    state, _ = checkpointer.restore_latest(abstract)
    checkpointer.close()
    return state


def build(config: ml_collections.ConfigDict, row_name: str, dataset) -> Harness:
  """Row `row_name` of `config` on `dataset` (a `kd_jax.data.Dataset`), ready to step."""
  mesh = mesh_lib.make_mesh(replica=config.mesh.replica, data=config.mesh.data)
  plan = planning.plan(config, row_name, dataset, mesh_shape=(mesh.shape["replica"], mesh.shape["data"]))
  source, param_map, constants = stages.load_source(plan, dataset, mesh)
  spec = loop.step_spec(plan, source, param_map, mesh)
  example = jnp.zeros((mesh.devices.size,) + dataset.input_shape, np.uint8)
  abstract = jax.eval_shape(lambda: engine.init_state(spec, jax.random.PRNGKey(config.seed), constants, example))
  state_sharding = engine.state_shardings(mesh, abstract, spec)
  return Harness(config=config, row=config.rows[row_name], dataset=dataset, mesh=mesh, spec=spec,
                 teacher_variables=constants, state_sharding=state_sharding,
                 _train_step=engine.make_train_step(spec, mesh, state_sharding),
                 _eval_step=engine.make_eval_step(spec.student, plan.normalize, mesh, sequential=spec.sequential_peers,
                                                  compute_dtype=spec.compute_dtype, rewrites=spec.rewrites))
