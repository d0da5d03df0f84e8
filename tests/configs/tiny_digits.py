"""A tiny digits table for subprocess tests (kill/resume, multi-process)."""
from kd_jax.train import base_config, row


def get_config(rows: str = ""):
  c = base_config()
  c.epochs = 12
  c.data.name = "digits"
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.log_every_steps = 4
  c.checkpoint_every_steps = 8
  c.keep_checkpoints = 3
  c.progress = False
  adam = {"name": "adam", "learning_rate": 1e-2}
  c.rows.teacher = row(model="mlp", model_kwargs={"widths": [64], "dropout": 0.1}, terms={"ce": {}}, optimizer=adam)
  c.rows.student_kd = row(model="mlp", model_kwargs={"widths": [16]}, teacher="teacher", optimizer=adam,
                          terms={"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}})
  if rows:
    from experiments.configs import select_rows
    select_rows(c, rows)
  return c
