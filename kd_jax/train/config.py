"""The run config: defaults, row builder, validation, and the resume fingerprint.

A config is one table: shared settings (seed, data, mesh, logging) and `rows`,
each a named training run (model, loss terms, teacher, optimizer, schedule,
epochs). A row's `teacher` names another row (trained first, in the same
workdir) or the directory of a trained model (`<workdir>/<row>/final`).
Multi-stage recipes are rows chained by `init` (FitNets: a hint stage,
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


# The options of a row's groups and their defaults; a key outside them is a ConfigError (row() and validate).
TEACHER = {"row": "", "input": "augmented", "cache": False, "generator": ""}
PEERS = {"count": 1, "exchange": "none", "every_steps": 1}
DATA = {"augment": "none", "start_epoch": 0, "labelled_examples": 0, "unlabelled": "keep"}
INIT = {"from": "", "partial": False}
OPTIMIZER = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
             "max_norm": 0.0, "freeze": []}  # momentum/nesterov/weight_decay: fillers other optimizers ignore
SCHEDULE = {"name": "constant", "boundaries": [], "factor": 0.1, "warmup_epochs": 0.0}


def _group(name: str, value: Any, defaults: Mapping[str, Any], shorthand: str = "") -> dict[str, Any]:
  """`defaults` updated with `value` (a mapping, or the value of the `shorthand` key); unknown keys refused."""
  given = dict(value) if isinstance(value, Mapping) else ({shorthand: value} if shorthand else value)
  if not isinstance(given, dict):
    raise ConfigError(f"row option {name!r} must be a mapping, got {value!r}")
  _check_keys(given, defaults, f"{name}.")
  return {**defaults, **given}


def _tuples(value: Any) -> Any:
  """Lists (at any depth) as tuples: ml_collections overrides tuple fields from the command line
  (`--config.rows.r.terms.at.student_features="('stage2', 'stage3')"`), not list fields."""
  if isinstance(value, Mapping):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def row(*, model: str, terms: Mapping[str, Mapping[str, Any]], model_kwargs: Mapping[str, Any] | None = None,
        teacher: str | Mapping[str, Any] = "", peers: int | Mapping[str, Any] = 1,
        optimizer: Mapping[str, Any] | None = None, schedule: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None, init: Mapping[str, Any] | None = None, epochs: int = 0,
        ensemble_with: Sequence[str] = (), paper: float | str = "") -> ml_collections.ConfigDict:
  """One row of a table: a model trained on loss `terms`, from what `teacher` or `peers` give.

  teacher: a row of the table (trained first) or a trained model's directory, or
    {"row": that, "input": "augmented" (the student's view, as KD needs) or "clean" (the
    un-augmented image: Noisy Student's un-noised teacher), "cache": compute its logits on
    the train set once and read them each step (a teacher that sees un-augmented inputs),
    "generator": weight distillation's phase 1 — train a generator of the student's weights
    from the teacher's; the value is the regex finding a layer index in a param path, "" off}.
  peers: K models trained together (online methods), laid out on the mesh axis "replica",
    or {"count": K, "exchange": "predictions" (every step, the peers' predictions on a shared
    batch: DML) or "stale" (each peer on its own data, distilling from copies of the others
    refreshed every "every_steps": co-distillation)}.
  optimizer: {"name", "learning_rate", ... (optim.py), "max_norm": cap on each unit's incoming
    weights after every update (Hinton et al.'s dropout nets; 0: off), "freeze": params the
    optimizer leaves unchanged — "student", "student/<module>[/...]" (the teacher's blocks of a
    progressive-blockwise hybrid), "terms" or "terms/<term>[/<param>...]" (a stage that trains
    only a connector: FT's paraphraser stage freezes "student"); a term's own `frozen_params`
    are frozen without being listed and must come from init}.
  schedule: {"name", "boundaries", "factor", "warmup_epochs", ...}, in epochs.
  data: {"augment": "none" / "jitter" / "crop_flip", "start_epoch": the row's batches are those
    of epochs start_epoch, start_epoch + 1, ... of the data order (snapshot distillation's cycle
    k continues where cycle k-1 stopped), "labelled_examples": N > 0 makes only a fixed subset of
    N training examples labelled (a pure function of config.seed), "unlabelled": "drop" trains
    on those N only, "keep" on all with a float mask "labelled" [B] the "ce" term applies}.
  init: {"from": a row (or trained-model directory) whose weights start this row, with the loss
    terms' params and connector state of the same name and shape (FT's paraphraser),
    "partial": take each param of the same path and shape only (the others keep their fresh
    init: a progressive-blockwise stage, a residual assistant joining a trained student)}.
  epochs: this row's epochs (unless config.epochs > 0 overrides all rows).
  ensemble_with: rows whose models are ensembled with this one at the end (born-again networks).
  Lists are stored as tuples, which the command line can override ("('a', 'b')").
  paper: the paper's figure for the report (e.g. test errors).
  checkpoint (set by override, not an argument): a trained model directory this row stands for; the row
    is then evaluated, never trained, and later rows that name it use that model.
  """
  return ml_collections.ConfigDict(_tuples({
      "model": model, "model_kwargs": dict(model_kwargs or {}),
      "terms": {k: dict(v) for k, v in terms.items()},
      "teacher": _group("teacher", teacher, TEACHER, "row"),
      "peers": _group("peers", peers, PEERS, "count"),
      # Checked by name and signature in validate (kd_jax.train.optim.check): each optimizer takes its own.
      "optimizer": {**OPTIMIZER, **dict(optimizer or {})},
      "schedule": {**SCHEDULE, **dict(schedule or {})},
      "data": _group("data", data or {}, DATA),
      "init": _group("init", init or {}, INIT),
      "epochs": epochs, "ensemble_with": list(ensemble_with),
      "paper": str(paper),  # text, so a table can mix numbers and notes
      # A trained model (a kd_jax row directory, its final/, or a converted teacher) this row stands for:
      # restored and evaluated, never trained (--config.rows.<row>.checkpoint=<dir>).
      "checkpoint": "",
  }))


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

  r, example, key = config.rows[name], row(model="mlp", terms={"ce": {}}), f"rows.{name}"
  _check_keys(r, example, f"{key}.")
  for group in ("teacher", "peers", "data", "init"):
    _check_keys(r[group], example[group], f"{key}.{group}.")
  from kd_jax.train import optim  # local: optim imports this module

  try:  # by name and signature: a stray option (b1 on sgd) is refused, naming it
    optim.check(r.optimizer, r.schedule)
  except ConfigError as e:
    message = str(e)
    if not message.startswith(("optimizer.", "schedule.")):  # an unknown name: name the group
      message = ("optimizer" if "optimizer" in message.split(";")[0] else "schedule") + ".name: " + message
    raise ConfigError(f"{key}.{message}") from None
  try:
    models.spec(r.model)  # unknown model: error listing the known ones
  except ValueError as e:
    raise ConfigError(f"{key}.model: {e}") from None
  terms = r.terms.to_dict() if hasattr(r.terms, "to_dict") else dict(r.terms)
  try:  # unknown term names and options, non-numeric weights: before anything trains
    distill.Objective(terms)
  except ValueError as e:
    raise ConfigError(f"{key}.terms: {e}") from e
  for path in r.optimizer.freeze:
    parts = str(path).split("/")
    if parts[0] not in ("student", "terms") or (parts[0] == "terms" and len(parts) > 1 and parts[1] not in terms):
      raise ConfigError(f"{key}.optimizer.freeze: {path!r} names no params of the row; use 'student', "
                        f"'student/<module>[/...]', 'terms' or 'terms/<term>[/...]' with a term of the row "
                        f"({sorted(terms)})")
  if r.data.labelled_examples < 0:
    raise ConfigError(f"{key}.data.labelled_examples must be >= 0 (0: every example labelled), got "
                      f"{r.data.labelled_examples}")
  if r.data.unlabelled not in ("keep", "drop"):
    raise ConfigError(f"{key}.data.unlabelled must be 'keep' (train on all examples, CE on the labelled ones) "
                      f"or 'drop' (train on the labelled ones only), got {r.data.unlabelled!r}")
  if r.init.partial and not r.init["from"]:
    raise ConfigError(f"{key}.init.partial is set but {key}.init.from is empty")
  if not isinstance(r.data.start_epoch, int) or r.data.start_epoch < 0:
    raise ConfigError(f"{key}.data.start_epoch must be a non-negative int, got {r.data.start_epoch!r}")
  if r.teacher.row == name:
    raise ConfigError(f"row {name!r} names itself as its teacher")
  if row_epochs(config, name) < 1 and not r.get("checkpoint", ""):
    raise ConfigError(f"row {name!r} has no epochs: set {key}.epochs or config.epochs")
  for other in r.ensemble_with:
    if other not in config.rows:
      raise ConfigError(f"row {name!r}: ensemble_with names {other!r}, which is not a row of this config")


def row_epochs(config: ml_collections.ConfigDict, name: str) -> int:
  return config.epochs if config.epochs > 0 else config.rows[name].epochs


def dependencies(config: ml_collections.ConfigDict, name: str) -> list[str]:
  """The rows that must be trained before row `name`."""
  r = config.rows[name]
  return [d for d in [r.teacher.row, r.init["from"], *r.ensemble_with] if d in config.rows]


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
