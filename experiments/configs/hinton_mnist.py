r"""Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network"), section 3: MNIST.

Rows (paper's test errors on the 10,000 MNIST test images):
  teacher     784-1200-1200-10 ReLU MLP, dropout (20% input, 50% hidden), inputs
              jittered by up to 2 pixels, max-norm weight constraint      67
  student     784-800-800-10, no regularisation                          146
  student_kd  the student distilled from the teacher at T=20              74

The paper gives no optimiser details. This recipe keeps the regularisation it
names (dropout, jitter, and the max-norm 3.5 constraint on each unit's incoming
weights from Srivastava et al. 2014) and trains every row with Adam (lr 1e-3,
cosine decay to 0), batch 128. The student rows see unjittered inputs.

  python -m experiments.main --config=experiments/configs/hinton_mnist.py --workdir=/tmp/hinton
  python -m experiments.reproduce --config=experiments/configs/hinton_mnist.py --seeds=3 --workdir=/tmp/hinton
  # one row (its teacher row is trained first, or reused from the workdir):
  python -m experiments.main --config=experiments/configs/hinton_mnist.py:student_kd --workdir=/tmp/hinton
"""
from kd_jax.train.tables import mnist_table
from kd_jax.train import row


def get_config(rows: str = ""):
  c = mnist_table()
  c.baseline_row = "student"  # every row against the student alone
  epochs = 60
  adam = {"name": "adam", "learning_rate": 1e-3}
  decay = {"name": "cosine"}
  c.rows.teacher = row(model="mlp_1200", terms={"ce": {}}, optimizer={**adam, "max_norm": 3.5}, schedule=decay,
                       data={"augment": "jitter"}, epochs=epochs, paper=67)
  c.rows.student = row(model="mlp_800", terms={"ce": {}}, optimizer=adam, schedule=decay, epochs=epochs, paper=146)
  # The student sees un-augmented inputs: the teacher's logits on them are computed once (teacher cache).
  c.rows.student_kd = row(model="mlp_800", teacher={"row": "teacher", "cache": True}, optimizer=adam, schedule=decay,
                          epochs=epochs, paper=74,
                          terms={"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 20.0}})
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
