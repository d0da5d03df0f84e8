"""Helpers of the shipped table configs (experiments/configs/*.py, installed as kd_jax.experiments.configs).

They live in kd_jax so a config file imports them from an installed package as well as from a checkout.
"""
from __future__ import annotations


def table(data_name: str, *, log_every_steps: int = 100, paper_metric: str = "test_accuracy"):
  """`base_config()` with the settings the small-data tables share: batch 128, evaluation in
  batches of 1000, a checkpoint every 2000 steps."""
  from kd_jax.train import base_config

  c = base_config()
  c.data.name = data_name
  c.data.batch_size = 128
  c.data.eval_batch_size = 1000
  c.log_every_steps = log_every_steps
  c.checkpoint_every_steps = 2000
  c.paper_metric = paper_metric
  return c


def mnist_table(*, paper_metric: str = "test_errors"):
  """The MNIST tables' `table`: Hinton et al.'s batch of 128, the paper's figures as test errors."""
  return table("mnist", paper_metric=paper_metric)


def select_rows(config, rows: str) -> None:
  """Keeps the comma-separated `rows` of `config` (shell-style patterns allowed, e.g.
  `resnet32x4__resnet8x4__*`) and the rows they depend on (teachers, earlier stages)."""
  import fnmatch

  patterns = [r for r in rows.split(",") if r]
  unknown = [p for p in patterns if not fnmatch.filter(list(config.rows), p)]
  if unknown:
    from kd_jax.train.config import ConfigError

    raise ConfigError(f"unknown row(s) {unknown}; this config has rows {list(config.rows)}")
  wanted = [name for name in config.rows if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
  from kd_jax.train.config import dependencies

  keep = set()
  todo = list(wanted)
  while todo:
    name = todo.pop()
    if name not in keep:
      keep.add(name)
      todo.extend(dependencies(config, name))
  for name in list(config.rows):
    if name not in keep:
      del config.rows[name]
  if config.get("baseline_row") and config.baseline_row not in keep:  # not selected: nothing to compare with
    config.baseline_row = ""
