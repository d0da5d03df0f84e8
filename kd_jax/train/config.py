"""The run config: defaults, row builder, validation, and the resume fingerprint.

A config is one table: shared settings (seed, data, mesh, logging) and `rows`,
each a named training run (model, loss terms, teacher, optimizer, schedule,
epochs). A row's `teacher` names another row (trained first, in the same
workdir) or the directory of a trained model (`<workdir>/<row>/final`).
Multi-stage recipes are rows chained by `init_from` (FitNets: a hint stage,
then KD from its weights), each stage with its own optimizer and epochs.
`config.epochs`, when > 0, overrides every row's epochs (`--config.epochs=3`
for a quick run of a whole table); `config.max_steps`, when > 0, stops every
row after that many steps (smoke runs: the schedule is still the full one).
"""
from __future__ import annotations

import difflib
import json
import logging
from typing import Any, Mapping, Sequence

import ml_collections

from kd_jax.errors import ConfigError  # noqa: F401  (defined at the bottom of the house, raised everywhere)

log = logging.getLogger(__name__)

# Settings that cannot change a row's results: everything else of the run and of the row enters the
# resume fingerprint (a new config key does too, unless it is added here).
HARMLESS = ("epochs", "max_steps", "log_every_steps", "checkpoint_every_steps", "checkpoint_every_seconds",
            "keep_checkpoints", "progress", "allow_config_change", "paper_metric", "baseline_row", "data.dir",
            "data.eval_batch_size", "mesh", "rows")
HARMLESS_ROW = ("paper", "epochs")


def base_config() -> ml_collections.ConfigDict:
  """Settings every table shares; a config file adds `rows` and overrides the rest."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.epochs = 0  # > 0: overrides every row's epochs
  c.max_steps = 0  # > 0: every row stops after this many steps (smoke runs)
  c.data = ml_collections.ConfigDict({"name": "digits", "dir": "", "batch_size": 64, "eval_batch_size": 200})
  c.mesh = ml_collections.ConfigDict({"replica": 1, "data": -1})
  # "bfloat16": models compute in bf16 from float32 master params (GPU/TPU; slow on CPU).
  c.compute_dtype = "float32"
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.checkpoint_every_seconds = 600.0  # also checkpoint when this much wall time passed since the last one
  c.keep_checkpoints = 2
  c.progress = True
  c.skip_nonfinite = False
  c.allow_config_change = False
  # What the rows' `paper` figures measure, for experiments/reproduce.py:
  # "test_accuracy" (percent) or "test_errors" (a count).
  c.paper_metric = "test_accuracy"
  # A row the others are compared with in the report (e.g. "student": the student alone), or "".
  c.baseline_row = ""
  c.rows = ml_collections.ConfigDict(sort_keys=False)  # table order as written
  return c


def row(*, model: str, terms: Mapping[str, Mapping[str, Any]], teacher: str = "",
        model_kwargs: Mapping[str, Any] | None = None, optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None, augment: str = "none", max_norm: float = 0.0,
        peers: int = 1, exchange: str = "none", exchange_every_steps: int = 1, epochs: int = 0,
        init_from: str = "", ensemble_with: Sequence[str] = (), cache_teacher: bool = False,
        weight_generator: bool = False, layer_pattern: str = r"layers_(\d+)",
        freeze: Sequence[str] = (), data_start_epoch: int = 0, init_partial: bool = False,
        labelled_examples: int = 0, unlabelled: str = "keep", teacher_input: str = "augmented",
        paper: float | str = "") -> ml_collections.ConfigDict:
  """One row of a table. `paper` is the paper's figure for the report (e.g. test errors).

  peers: K models trained together (online methods: DML, co-distillation), laid
    out on the mesh axis "replica". exchange: "predictions" (every step, the
    peers' predictions on a shared batch) or "stale" (each peer on its own data,
    distilling from copies of the others refreshed every `exchange_every_steps`).
  epochs: this row's epochs (unless config.epochs > 0 overrides all rows).
  init_from: a row (or trained-model directory) whose weights start this row;
    the loss terms' params (and connector state) saved with it are restored too
    where this row has a term param of the same name and shape (FT's paraphraser).
  freeze: params the optimizer leaves unchanged (no update, no weight decay):
    "student", "student/<module>[/...]" (part of the model: the teacher's blocks
    of a progressive-blockwise hybrid), "terms", or "terms/<term>[/<param>...]"
    (a stage row that trains only a connector: FT's paraphraser stage freezes
    "student"). A term's own
    frozen params (`frozen_params`, e.g. FT's paraphraser in its transfer stage)
    are frozen without being listed, and must come from init_from.
  init_partial: init_from may hold another model: each of this row's model params
    (and BatchNorm statistics) with the same path and shape there is taken from it,
    the others keep their fresh init (a progressive-blockwise stage starts from the
    teacher's or the previous stage's blocks; a residual assistant joins a trained student).
  labelled_examples: N > 0 makes only a fixed subset of N training examples labelled
    (a pure function of config.seed, `kd_jax.data.labelled_subset`); with
    unlabelled="drop" the row trains on those N examples only, with "keep" on all
    examples, each batch carrying a float mask "labelled" [B] that the "ce" term
    applies (semi-supervised rows: Noisy Student's CE on labelled, pseudo-labels on all).
  checkpoint (set by override, not an argument): a trained model directory this row stands for; the row
    is then evaluated, never trained, and later rows that name it use that model.
  ensemble_with: rows whose models are ensembled with this one at the end
    (born-again networks' ensemble of generations).
  cache_teacher: compute the teacher's logits on the train set once and read
    them each step (logit methods whose teacher sees un-augmented inputs).
  teacher_input: what the teacher sees: "augmented" (the student's own augmented
    view, as KD needs) or "clean" (the un-augmented image, while the student sees the
    augmented one: Noisy Student's un-noised teacher; such a teacher can be cached).
  data_start_epoch: the row's batches are those of epochs data_start_epoch, data_start_epoch + 1, ... of
    the data order (a stage recipe that continues one run: snapshot distillation's cycle k starts at the
    epoch where cycle k-1 stopped, rather than repeat its batches).
  weight_generator: weight distillation's phase 1: train a generator of the
    student's weights from the teacher's (kd_jax.distill.weight_distillation);
    `layer_pattern` finds the layer index in a param path.
  """
  opt = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
  opt.update(optimizer or {})
  sched = {"name": "constant", "boundaries": [], "factor": 0.1, "warmup_epochs": 0.0}
  sched.update(schedule or {})
  return ml_collections.ConfigDict({
      "model": model, "model_kwargs": dict(model_kwargs or {}), "teacher": teacher,
      "terms": {k: dict(v) for k, v in terms.items()}, "optimizer": opt, "schedule": sched,
      "augment": augment, "max_norm": float(max_norm), "peers": peers,
      "exchange": {"mode": exchange, "every_steps": exchange_every_steps}, "epochs": epochs,
      "init_from": init_from, "ensemble_with": list(ensemble_with), "cache_teacher": cache_teacher,
      "weight_generator": {"enabled": weight_generator, "layer_pattern": layer_pattern},
      "freeze": list(freeze), "data_start_epoch": data_start_epoch, "init_partial": bool(init_partial),
      "labelled_examples": int(labelled_examples), "unlabelled": unlabelled,
      "teacher_input": teacher_input,
      "paper": str(paper),  # text, so a table can mix numbers and notes
      # A trained model (a kd_jax row directory, its final/, or a converted teacher) this row stands for:
      # restored and evaluated, never trained (--config.rows.<row>.checkpoint=<dir>).
      "checkpoint": "",
  })


def _suggest(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=2)
  return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def _check_keys(cfg: Mapping[str, Any], known: Mapping[str, Any], where: str) -> None:
  for key in cfg:
    if key not in known:
      raise ConfigError(f"unknown config key {where + key!r}{_suggest(key, known)}; known: {sorted(known)}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks a config before anything is built; returns it unchanged."""
  base = base_config()
  _check_keys(config, base, "")
  _check_keys(config.data, base.data, "data.")
  _check_keys(config.mesh, base.mesh, "mesh.")
  if not isinstance(config.epochs, int) or config.epochs < 0:
    raise ConfigError(f"epochs must be a non-negative int, got {config.epochs!r}")
  if not isinstance(config.max_steps, int) or config.max_steps < 0:
    raise ConfigError(f"max_steps must be a non-negative int, got {config.max_steps!r}")
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"compute_dtype must be 'float32' or 'bfloat16', got {config.compute_dtype!r}")
  for key in ("batch_size", "eval_batch_size"):
    if config.data[key] < 1:
      raise ConfigError(f"data.{key} must be positive, got {config.data[key]}")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[key] < 1:
      raise ConfigError(f"{key} must be positive, got {config[key]}")
  if not config.rows:
    raise ConfigError("the config has no rows: add at least one to config.rows")
  if config.get("baseline_row") and config.baseline_row not in config.rows:
    raise ConfigError(f"baseline_row {config.baseline_row!r} is not a row of this config; rows: {list(config.rows)}")
  from kd_jax import data  # local: keeps config importable on its own

  if config.data.name not in data.names():
    raise ConfigError(f"unknown dataset {config.data.name!r}{_suggest(config.data.name, data.names())}; "
                     f"known: {data.names()}")
  for name in config.rows:
    _validate_row(config, name)
  row_order(config)
  return config


def _validate_row(config: ml_collections.ConfigDict, name: str) -> None:
  """The keys and values of row `name` that can be checked without the data."""
  from kd_jax import distill, models  # local: keeps config importable on its own

  r, example = config.rows[name], row(model="mlp", terms={"ce": {}})
  _check_keys(r, example, f"rows.{name}.")
  _check_keys(r.optimizer, example.optimizer, f"rows.{name}.optimizer.")
  _check_keys(r.schedule, example.schedule, f"rows.{name}.schedule.")
  _check_keys(r.exchange, example.exchange, f"rows.{name}.exchange.")
  _check_keys(r.weight_generator, example.weight_generator, f"rows.{name}.weight_generator.")
  try:
    models.spec(r.model)  # unknown model: error listing the known ones
  except ValueError as e:
    raise ConfigError(f"rows.{name}.model: {e}") from None
  terms = r.terms.to_dict() if hasattr(r.terms, "to_dict") else dict(r.terms)
  try:  # unknown term names and options, non-numeric weights: before anything trains
    distill.Objective(terms)
  except ValueError as e:
    raise ConfigError(f"rows.{name}.terms: {e}") from e
  for path in r.get("freeze", ()):
    parts = str(path).split("/")
    if parts[0] not in ("student", "terms") or (parts[0] == "terms" and len(parts) > 1 and parts[1] not in terms):
      raise ConfigError(f"rows.{name}.freeze: {path!r} names no params of the row; use 'student', "
                       f"'student/<module>[/...]', 'terms' or 'terms/<term>[/...]' with a term of the row "
                       f"({sorted(terms)})")
  if r.get("labelled_examples", 0) < 0:
    raise ConfigError(f"rows.{name}.labelled_examples must be >= 0 (0: every example labelled), got "
                     f"{r.labelled_examples}")
  if r.get("unlabelled", "keep") not in ("keep", "drop"):
    raise ConfigError(f"rows.{name}.unlabelled must be 'keep' (train on all examples, CE on the labelled ones) "
                     f"or 'drop' (train on the labelled ones only), got {r.unlabelled!r}")
  if r.get("teacher_input", "augmented") not in ("augmented", "clean"):
    raise ConfigError(f"rows.{name}.teacher_input must be 'augmented' (the student's view) or 'clean' (the "
                     f"un-augmented image), got {r.teacher_input!r}")
  if r.get("init_partial", False) and not r.init_from:
    raise ConfigError(f"rows.{name}.init_partial is set but rows.{name}.init_from is empty")
  start = r.get("data_start_epoch", 0)
  if not isinstance(start, int) or start < 0:
    raise ConfigError(f"rows.{name}.data_start_epoch must be a non-negative int, got {start!r}")
  if r.teacher == name:
    raise ConfigError(f"row {name!r} names itself as its teacher")
  if row_epochs(config, name) < 1:
    raise ConfigError(f"row {name!r} has no epochs: set rows.{name}.epochs or config.epochs")
  for other in r.ensemble_with:
    if other not in config.rows:
      raise ConfigError(f"row {name!r}: ensemble_with names {other!r}, which is not a row of this config")


def row_epochs(config: ml_collections.ConfigDict, name: str) -> int:
  return config.epochs if config.epochs > 0 else config.rows[name].epochs


def dependencies(config: ml_collections.ConfigDict, name: str) -> list[str]:
  """The rows that must be trained before row `name`."""
  r = config.rows[name]
  return [d for d in [r.teacher, r.init_from, *r.ensemble_with] if d in config.rows]


def row_order(config: ml_collections.ConfigDict) -> list[str]:
  """Rows in an order where each row comes after its teacher, init and ensemble rows."""
  order: list[str] = []
  visiting: set[str] = set()

  def visit(name: str, chain: tuple[str, ...]):
    if name in order:
      return
    if name in visiting:
      raise ConfigError(f"teacher cycle among rows: {' -> '.join(chain + (name,))}")
    visiting.add(name)
    for dependency in dependencies(config, name):
      visit(dependency, chain + (name,))
    order.append(name)

  for name in config.rows:
    visit(name, ())
  return order


def _flat(value: Any, prefix: str) -> dict[str, Any]:
  """A nested config as {dotted key: leaf}; lists and tuples are leaves."""
  value = value.to_dict() if hasattr(value, "to_dict") else value
  if isinstance(value, Mapping) and value:
    out = {}
    for key, sub in value.items():
      out.update(_flat(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out
  return {prefix: value}


def _harmless(key: str, names: Sequence[str]) -> bool:
  return any(key == h or key.startswith(h + ".") for h in names)


def fingerprint(config: ml_collections.ConfigDict, row_name: str) -> dict[str, Any]:
  """The settings a resumed run of `row_name` must share with the run that saved it: every key of the
  run and of the row (flattened, with the row's resolved epochs), but the `HARMLESS` ones."""
  out = {k: v for k, v in _flat(config, "").items() if not _harmless(k, HARMLESS)}
  out["epochs"] = row_epochs(config, row_name)
  row = _flat(config.rows[row_name], "")
  out.update({f"rows.{row_name}.{k}": v for k, v in row.items() if not _harmless(k, HARMLESS_ROW)})
  return json.loads(json.dumps(out))  # as it reads back from the checkpoint


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], *, allow: bool, row: str,
                 made: str = "the checkpoint was made") -> None:
  """Raises (or, with `allow`, warns) when a resumed or skipped row's `saved` fingerprint differs from
  the `current` config's, naming each differing setting."""
  differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if not differing:
    return
  detail = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
  if allow:
    log.warning("row %s: resuming with a changed config (%s)", row, detail)
    return
  raise ConfigError(
      f"row {row!r}: {made} with a different config ({detail}). Resuming or reusing it would mix two "
      "runs; use a new workdir, or set --config.allow_config_change=True if the change is safe.")
