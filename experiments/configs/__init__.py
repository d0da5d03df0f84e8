"""Table configs: one file per paper table, each row a named variant of get_config()."""


def mnist_table(*, paper_metric: str = "test_errors"):
  """`base_config()` with the settings every MNIST table shares: batch 128 (Hinton et al.'s
  recipe as the tables use it), evaluation in batches of 1000, logging every 100 steps, a
  checkpoint every 2000, and the paper's figures as test errors."""
  from kd_jax.train import base_config

  c = base_config()
  c.data.name = "mnist"
  c.data.batch_size = 128
  c.data.eval_batch_size = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.paper_metric = paper_metric
  return c


def select_rows(config, rows: str) -> None:
  """Keeps the comma-separated `rows` of `config` (shell-style patterns allowed, e.g.
  `resnet32x4__resnet8x4__*`) and the rows they depend on (teachers, earlier stages)."""
  import fnmatch

  patterns = [r for r in rows.split(",") if r]
  unknown = [p for p in patterns if not fnmatch.filter(list(config.rows), p)]
  if unknown:
    raise ValueError(f"unknown row(s) {unknown}; this config has rows {list(config.rows)}")
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
