r"""The demo table: Hinton KD on scikit-learn's bundled digits (8x8, no download).

A 64-512-512-10 MLP teacher with dropout, a 64-256-10 student trained alone,
and the same student distilled from the teacher at T=8 (soft-target weight 0.9,
hard labels 0.1). All rows: Adam, lr 1e-2 with cosine decay, 100 epochs.

  python -m experiments.reproduce --config=experiments/configs/digits_demo.py --seeds=3 --workdir=/tmp/demo
  python -m experiments.main --config=experiments/configs/digits_demo.py:student_kd --workdir=/tmp/demo1
"""
from kd_jax.train import base_config, row


def get_config(rows: str = ""):
  c = base_config()
  c.baseline_row = "student"  # every row against the student alone
  c.epochs = 100
  c.data.name = "digits"
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  adam = {"name": "adam", "learning_rate": 1e-2}
  cosine = {"name": "cosine"}
  c.rows.teacher = row(model="mlp", model_kwargs={"widths": [512, 512], "dropout": 0.3}, terms={"ce": {}},
                       optimizer=adam, schedule=cosine)
  c.rows.student = row(model="mlp", model_kwargs={"widths": [256]}, terms={"ce": {}},
                       optimizer=adam, schedule=cosine)
  c.rows.student_kd = row(model="mlp", model_kwargs={"widths": [256]}, teacher="teacher",
                          terms={"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 8.0}},
                          optimizer=adam, schedule=cosine)
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
