"""`plan(config, row, dataset)` (kd_jax.train.plan): a row of a table config, read and checked once.

The plan is the only reader of the raw config and the only place config mistakes
are reported (as `ConfigError`, naming the key, the bad value and what is
allowed). Everything after it — loading the teacher, building the state, the fit
loop — reads the frozen `RowPlan`. `check(config, dataset)` plans every row of a
table, so a typo in the last row fails before the first row trains.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import data as data_lib
from kd_jax import models
from kd_jax.data import augment as augment_lib
from kd_jax.distill import Objective
from kd_jax.train import backend
from kd_jax.train import config as config_lib
from kd_jax.train import files
from kd_jax.train import optim
from kd_jax.train import sources as sources_lib
from kd_jax.train.config import ConfigError

EXCHANGES = ("none", "predictions", "stale")
TEACHER_INPUTS = ("augmented", "clean")


@dataclasses.dataclass(frozen=True)
class DataView:
  """Which examples a row trains on and how they are shown: batches of step s are those of step
  `offset + s` of the (seed, step) order; `labelled`: a subset of N labelled examples (0: all), kept
  with a mask ("keep") or alone ("drop"); inputs augmented by `augment`, then normalised."""

  batch_size: int
  eval_batch_size: int
  seed: int
  offset: int = 0
  labelled: int = 0
  unlabelled: str = "keep"
  augment: str = "none"


@dataclasses.dataclass(frozen=True)
class Options:
  """Settings that cannot change a row's results (outside the fingerprint)."""

  log_every_steps: int = 50
  checkpoint_every_steps: int = 1000
  checkpoint_every_seconds: float = 600.0
  keep_checkpoints: int = 2
  progress: bool = True
  skip_nonfinite: bool = False
  allow_config_change: bool = False


@dataclasses.dataclass(frozen=True)
class RowPlan:
  """One row, ready to train. `teacher`, `init_from`, `ensemble_with`: model directories (rows of the
  table resolve to `<workdir>/<row>/final`); `source`: what the student learns from besides labels
  (unloaded); `generator_pattern`: weight distillation's layer pattern ("" for none); `published`: the
  trained model this row stands for (evaluated, not trained), or ""; `rewrites`: the convolution rewrites
  of the platform (CPU), outside the fingerprint like the platform itself."""

  name: str
  published: str
  description: dict[str, Any]
  student: nn.Module
  objective: Objective
  source: sources_lib.Source | None
  teacher: str
  generator_pattern: str
  init_from: str
  init_partial: bool
  ensemble_with: tuple[str, ...]
  frozen: tuple[tuple[str, ...], ...]
  data: DataView
  normalize: Any
  input_dtype: np.dtype
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  peers: int
  epochs: int
  steps_per_epoch: int
  stop_step: int
  compute_dtype: str
  rewrites: backend.ConvRewrites
  options: Options
  fingerprint: dict[str, Any]


def input_dtype(dataset: data_lib.Dataset) -> np.dtype:
  """uint8 for pixels; a dataset of other inputs (token ids) says so in `input_dtype`."""
  return np.dtype(getattr(dataset, "input_dtype", np.uint8))


def normalizer(dataset: data_lib.Dataset):
  if input_dtype(dataset) != np.uint8:
    return lambda x: x  # token ids: nothing to normalise
  return lambda x: augment_lib.normalize(x, scale=dataset.scale, mean=dataset.mean, std=dataset.std)


def model_kwargs(row) -> dict[str, Any]:
  """The row's model options as plain JSON values (as they read back from model.json)."""
  kwargs = row.model_kwargs.to_dict() if hasattr(row.model_kwargs, "to_dict") else dict(row.model_kwargs)
  return json.loads(json.dumps(kwargs))


def _choice(value, allowed, key: str):
  if value not in allowed:
    raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
  return value


def _source(row, name: str, objective: Objective, *, has_teacher: bool) -> sources_lib.Source | None:
  """The row's source, from its `teacher` and `peers` groups."""
  key, teacher, peers = f"rows.{name}", row.teacher, row.peers
  exchange = _choice(peers.exchange, EXCHANGES, f"{key}.peers.exchange")
  _choice(teacher.input, TEACHER_INPUTS, f"{key}.teacher.input")
  if not isinstance(peers.count, int) or peers.count < 1:
    raise ConfigError(f"{key}.peers.count must be an int >= 1, got {peers.count!r}")
  if exchange != "none" and peers.count < 2:
    raise ConfigError(f"{key}.peers.exchange={exchange!r} needs at least 2 peers, got peers.count={peers.count}")
  if exchange == "none" and (objective.needs_peers or peers.count > 1):
    raise ConfigError(f"{key}: an online term (e.g. 'dml', 'codistill') or peers > 1 needs peers >= 2 and "
                      f"peers.exchange 'predictions' or 'stale', got count={peers.count}, exchange='none'")
  if exchange != "none" and (has_teacher or objective.needs_teacher):
    raise ConfigError(f"{key}: a row learns from a teacher or from its peers (peers.exchange={exchange!r}), "
                      "not both")
  if objective.needs_teacher and not has_teacher:
    raise ConfigError(f"{key} uses a teacher (terms {list(row.terms)}) but {key}.teacher.row is empty")
  if teacher.cache and not has_teacher:
    raise ConfigError(f"{key}.teacher.cache is set but the row has no teacher")
  if teacher.cache and row.data.augment != "none" and teacher.input != "clean":
    raise ConfigError(f"{key}.teacher.cache needs un-augmented teacher inputs, but data.augment="
                      f"{row.data.augment!r}: the teacher must see each step's random augmentation (or set "
                      "teacher.input='clean')")
  if not isinstance(peers.every_steps, int) or peers.every_steps < 1:
    raise ConfigError(f"{key}.peers.every_steps must be an int >= 1, got {peers.every_steps!r}")
  if exchange == "predictions":
    return sources_lib.create("peers", peers=peers.count)
  if exchange == "stale":
    return sources_lib.create("stale_peers", peers=peers.count, every_steps=peers.every_steps)
  if teacher.cache:
    return sources_lib.create("teacher_cache")
  return sources_lib.create("teacher", input=teacher.input) if has_teacher else None


def _frozen(row, name: str, objective: Objective, student: nn.Module, dataset) -> tuple[tuple[str, ...], ...]:
  """Param paths the optimizer leaves alone: the row's `freeze` (checked against the model's params) and
  the terms' own `frozen_params`."""
  paths = [tuple(str(p).split("/")) for p in row.optimizer.freeze]
  model_paths = None
  for f in paths:
    if f[0] == "student" and len(f) > 1:
      if model_paths is None:
        shapes = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0), jnp.zeros(
            (1,) + dataset.input_shape, input_dtype(dataset)), train=False))
        model_paths = [tuple(str(getattr(k, "key", k)) for k in path)
                       for path, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]]
      if not any(p[:len(f) - 1] == f[1:] for p in model_paths):
        raise ConfigError(f"rows.{name}.optimizer.freeze: {'/'.join(f)!r} names no params of the model; its top-level "
                          f"modules are {sorted({p[0] for p in model_paths})}")
  for term_name, term in objective.terms.items():
    paths += [("terms", term_name, key) for key in getattr(term, "frozen_params", ())]
  return tuple(paths)


def with_frozen(optimizer, frozen) -> optax.GradientTransformation:
  """`optimizer` on every param but those under the `frozen` paths, which get no update at all."""
  if not frozen:
    return optimizer

  def labels(params):
    def label(path, _):
      keys = tuple(str(getattr(k, "key", k)) for k in path)
      return "frozen" if any(keys[:len(f)] == f for f in frozen) else "trained"
    return jax.tree_util.tree_map_with_path(label, params)

  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def _check_data(config, row, name: str, dataset, mesh_shape) -> None:
  replica, data = mesh_shape
  if config.data.batch_size % data:
    raise ConfigError(f"data.batch_size {config.data.batch_size} is not divisible by the {data} devices of "
                      f"mesh axis 'data'; use a multiple of {data}")
  if row.peers.count % replica:
    raise ConfigError(f"row {name!r}: {row.peers.count} peers cannot be spread over mesh.replica={replica} replica "
                      f"groups; use a divisor of {row.peers.count} (or 1)")
  _choice(row.data.augment, augment_lib.KINDS, f"rows.{name}.data.augment")
  if input_dtype(dataset) != np.uint8 and row.data.augment != "none":
    raise ConfigError(f"rows.{name}.data.augment={row.data.augment!r} needs images, but dataset {dataset.name!r} has "
                      f"{input_dtype(dataset)} inputs, not uint8 images; use augment='none'")
  expected = models.input_shape(row.model)
  if expected is not None and expected != dataset.input_shape:
    raise ConfigError(f"rows.{name}.model {row.model!r} takes inputs {expected}, but dataset "
                      f"{dataset.name!r} has {dataset.input_shape}")


def published_dir(directory: str, *, key: str) -> str:
  """The model directory (holding model.json) of `directory`: itself, or a kd_jax row directory's final/."""
  for candidate in (directory, f"{directory.rstrip('/')}/final"):
    if files.exists(f"{candidate}/model.json"):
      return candidate
  raise ConfigError(f"{key}={directory!r} holds no trained model: neither it nor its final/ has a model.json "
                    "(a kd_jax row directory, its final/, or a teacher imported with kd_jax.models.import_teacher)")


def _model_dir(config, workdir: str, ref: str) -> str:
  """A row of the table -> its trained model (`<workdir>/<row>/final`, or the model its `checkpoint` names);
  else a directory as given."""
  if not ref:
    return ""
  if ref not in config.rows:
    return ref
  if config.rows[ref].get("checkpoint", ""):
    return published_dir(config.rows[ref].checkpoint, key=f"rows.{ref}.checkpoint")
  return f"{workdir.rstrip('/')}/{ref}/final"


def plan(config, name: str, dataset: data_lib.Dataset, *, workdir: str = "",
         mesh_shape: tuple[int, int] = (1, 1)) -> RowPlan:
  """Row `name` of `config` on `dataset`, checked; `mesh_shape`: the mesh's (replica, data) sizes."""
  config_lib.validate(config)
  if name not in config.rows:
    raise ConfigError(f"unknown row {name!r}; rows: {list(config.rows)}")
  row = config.rows[name]
  _check_data(config, row, name, dataset, mesh_shape)
  count = row.data.labelled_examples
  num_train = count if count and row.data.unlabelled == "drop" else dataset.num_train
  steps_per_epoch = data_lib.steps_per_epoch(num_train, config.data.batch_size)
  epochs = config_lib.row_epochs(config, name)
  total_steps = epochs * steps_per_epoch
  objective = Objective(row.terms.to_dict() if hasattr(row.terms, "to_dict") else dict(row.terms),
                        steps_per_epoch=steps_per_epoch, num_train=num_train)
  teacher = _model_dir(config, workdir, row.teacher.row)
  source = _source(row, name, objective, has_teacher=bool(teacher))
  generator = row.teacher.generator
  if generator and (not teacher or row.peers.count > 1 or row.teacher.cache):
    raise ConfigError(f"rows.{name}.teacher.generator needs a teacher (its weights are the generator's input; "
                      "and a term that uses it, e.g. 'kd'), a single peer and no teacher cache")
  student = models.create(row.model, num_classes=dataset.num_classes, **model_kwargs(row))
  if row.optimizer.max_norm and generator:
    raise ConfigError(f"rows.{name}.optimizer.max_norm caps the model's params, but with teacher.generator the "
                      "trained params are the generator's: set one of them")
  # max_norm: a projection at the end of the chain, on the model's kernels (peer axis first); freeze: labels.
  optimizer_options = {k: v for k, v in row.optimizer.items() if k != "freeze"}
  try:
    schedule = optim.make_schedule(row.schedule, base_lr=row.optimizer.learning_rate,
                                   steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"rows.{name}.schedule: {e}") from None
  try:
    optimizer = optim.make_optimizer(optimizer_options, schedule, steps_per_epoch=steps_per_epoch, batch_dims=1,
                                     max_norm_under=("student",))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"rows.{name}.optimizer: {e}") from None
  frozen = _frozen(row, name, objective, student, dataset)
  published = published_dir(row.checkpoint, key=f"rows.{name}.checkpoint") if row.get("checkpoint", "") else ""
  return RowPlan(
      name=name, published=published,
      description={"model": row.model, "model_kwargs": model_kwargs(row), "num_classes": dataset.num_classes,
                   "input_shape": list(dataset.input_shape), "dataset": dataset.name},
      student=student, objective=objective, source=source, teacher=teacher, generator_pattern=generator,
      init_from=_model_dir(config, workdir, row.init["from"]), init_partial=bool(row.init.partial),
      ensemble_with=tuple(_model_dir(config, workdir, r) for r in row.ensemble_with), frozen=frozen,
      data=DataView(batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size,
                    seed=config.seed, offset=row.data.start_epoch * steps_per_epoch,
                    labelled=count, unlabelled=row.data.unlabelled, augment=row.data.augment),
      normalize=normalizer(dataset), input_dtype=input_dtype(dataset), schedule=schedule,
      optimizer=with_frozen(optimizer, frozen),
      peers=row.peers.count, epochs=epochs, steps_per_epoch=steps_per_epoch,
      stop_step=min(total_steps, config.max_steps) if config.max_steps else total_steps,
      compute_dtype=config.compute_dtype, rewrites=backend.ConvRewrites.default(),
      options=Options(**{f.name: config.get(f.name, f.default) for f in dataclasses.fields(Options)}),
      fingerprint=config_lib.fingerprint(config, name))


def check(config, dataset: data_lib.Dataset, *, workdir: str = "", mesh_shape: tuple[int, int] = (1, 1)):
  """Plans every row of `config` in training order: {row: RowPlan}; the first mistake raises."""
  config_lib.validate(config)
  return {name: plan(config, name, dataset, workdir=workdir, mesh_shape=mesh_shape)
          for name in config_lib.row_order(config)}
