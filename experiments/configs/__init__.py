"""Table configs: one file per paper table, each row a named variant of get_config()."""


def select_rows(config, rows: str) -> None:
  """Keeps the comma-separated `rows` of `config` and the teacher rows they need."""
  wanted = [r for r in rows.split(",") if r]
  unknown = [r for r in wanted if r not in config.rows]
  if unknown:
    raise ValueError(f"unknown row(s) {unknown}; this config has rows {list(config.rows)}")
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
