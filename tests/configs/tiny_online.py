"""A tiny DML table for subprocess tests: 2 peers on the replica axis of a 2 x 4 mesh."""
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
  c.mesh.replica = 2
  c.mesh.data = -1
  c.rows.dml = row(model="mlp", model_kwargs={"widths": [32]}, peers={"count": 2, "exchange": "predictions"},
                   terms={"ce": {}, "dml": {"temperature": 1.0}}, optimizer={"name": "adam", "learning_rate": 1e-2})
  if rows:
    from experiments.configs import select_rows
    select_rows(c, rows)
  return c
