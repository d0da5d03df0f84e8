"""Table configs: one file per paper table, each row a named variant of get_config().

The helpers they share live in kd_jax.train.tables, so the configs load from an installed package too.
"""
from kd_jax.train.tables import mnist_table, select_rows, table  # noqa: F401
