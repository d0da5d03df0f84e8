"""A tiny CRD table for subprocess tests: teacher, then a student with CRD + KD (bank rows over "data")."""
from kd_jax.train import base_config, row


def get_config(rows: str = ""):
  c = base_config()
  c.epochs = 1
  c.data.name = "digits"
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.log_every_steps = 2
  c.checkpoint_every_steps = 8
  c.progress = False
  sgd = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}
  c.rows.teacher = row(model="mlp", model_kwargs={"widths": [64]}, terms={"ce": {}}, optimizer=sgd)
  c.rows.crd = row(model="mlp", model_kwargs={"widths": [32]}, teacher="teacher", optimizer=sgd,
                   terms={"ce": {}, "kd": {}, "crd": {"weight": 0.8, "num_negatives": 128, "dim": 32}})
  if rows:
    from experiments.configs import select_rows
    select_rows(c, rows)
  return c
