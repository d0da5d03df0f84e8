r"""The Hinton MNIST student (784-800-800-10) under the methods of the seeds, each next to the student alone.

All rows share the Hinton table's teacher (784-1200-1200-10, dropout, jitter,
max-norm, 60 epochs) and recipe (Adam 1e-3, cosine decay, batch 128). The students
train 10 epochs (`STUDENT_EPOCHS`), the length the 2-core CPU allows for 19 rows
times 3 seeds; at 10 epochs the student alone is within ~10 errors of its
60-epoch figure (hinton_mnist.py). `--config.epochs=60` runs every row at the
teacher's 60 epochs (a single `--config.epochs=N` sets all rows, teacher included).
Rows:
  teacher, student          as in hinton_mnist.py
  kd                        Hinton KD, T=20 (0.1 CE + 0.9 KD)
  logit_mse                 Ba & Caruana 2014: regress the teacher's logits (0.1 CE + 1.0 MSE)
  dkd                       Zhao et al. 2022: CE + DKD (α=1, β=8, T=4), warm-up over the first 20% of epochs
  fitnets_hint, fitnets     Romero et al. 2015: stage 1 regresses the teacher's middle (first hidden)
                            layer from the student's through a linear regressor (hint weight 1, short);
                            stage 2 starts from stage 1's weights and trains with KD
  dml                       Zhang et al. 2018: 2 students learning from each other (CE + KL), no teacher
  codistill                 Anil et al. 2018: 2 replicas on their own data, each distilling from the
                            other's parameters copied every 200 steps, after a burn-in of 2 epochs
  one                       Lan et al. 2018: ONE, the student's first layer shared by 3 branches (each its own
                            second layer and head) and a gate; the gated ensemble of the branches teaches
                            each of them (KL at T=3) besides their and its own CE; reports branch 0, a
                            784-800-800-10 network (kd_jax/models/one.py)
  ban_gen1, ban_gen2        Furlanello et al. 2018: generation 1 distils from `student` (same
                            architecture), generation 2 from generation 1; gen 2 also reports the
                            ensemble of student, gen 1 and gen 2
  takd_assistant, takd      Mirzadeh et al. 2020: teacher -> 1000-1000 assistant -> student
  tfkd                      Yuan et al. 2020: Tf-KD with a virtual teacher (0.9 on the true class), no teacher
  wd_generate, wd           weight distillation: phase 1 trains a generator of the student's weights from
                            the teacher's with KD through the generated student; phase 2 fine-tunes the
                            generated student with KD (kd_jax/distill/weight_distillation.py)

  python -m experiments.reproduce --config=experiments/configs/mnist_methods.py --seeds=3 --workdir=/tmp/mnist_methods
  python -m experiments.main --config=experiments/configs/mnist_methods.py:dml --workdir=/tmp/mnist_methods
"""
from kd_jax.train.tables import mnist_table
from kd_jax.train import row

TEACHER_EPOCHS = 60
STUDENT_EPOCHS = 10


def get_config(rows: str = ""):
  c = mnist_table()
  c.baseline_row = "student"  # every row against the student alone
  epochs = STUDENT_EPOCHS
  adam = {"name": "adam", "learning_rate": 1e-3}
  cosine = {"name": "cosine"}
  common = dict(optimizer=adam, schedule=cosine, epochs=epochs)
  student = dict(model="mlp_800", **common)
  # Rows that read only the teacher's logits on un-augmented inputs compute them once (the teacher cache).
  cached = lambda name: {"row": name, "cache": True}
  kd = {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 20.0}}

  c.rows.teacher = row(model="mlp_1200", terms={"ce": {}}, data={"augment": "jitter"}, paper=67,
                       optimizer={**adam, "max_norm": 3.5}, schedule=cosine, epochs=TEACHER_EPOCHS)
  c.rows.student = row(terms={"ce": {}}, paper=146, **student)
  c.rows.kd = row(teacher=cached("teacher"), terms=kd, paper=74, **student)
  c.rows.logit_mse = row(teacher=cached("teacher"), terms={"ce": {"weight": 0.1}, "logit_mse": {"weight": 1.0}},
                         **student)
  c.rows.dkd = row(teacher=cached("teacher"), **student, terms={
      "ce": {}, "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": epochs // 5}})
  c.rows.fitnets_hint = row(model="mlp_800", teacher="teacher", optimizer=adam, schedule=cosine,
                            epochs=max(1, epochs // 6),
                            terms={"hint": {"student_feature": "stage1", "teacher_feature": "stage1"}})
  c.rows.fitnets = row(teacher=cached("teacher"), init={"from": "fitnets_hint"}, terms=kd, **student)
  c.rows.dml = row(peers={"count": 2, "exchange": "predictions"}, terms={"ce": {}, "dml": {"temperature": 1.0}},
                   **student)
  c.rows.codistill = row(peers={"count": 2, "exchange": "stale", "every_steps": 200}, **student,
                         terms={"ce": {}, "codistill": {"temperature": 1.0, "start_epoch": 2}})
  c.rows.one = row(model="one", model_kwargs={"base": "mlp_800", "branches": 3}, terms={"one": {"temperature": 3.0}},
                   **common)
  c.rows.ban_gen1 = row(teacher=cached("student"), terms=kd, **student)
  c.rows.ban_gen2 = row(teacher=cached("ban_gen1"), terms=kd, ensemble_with=["student", "ban_gen1"], **student)
  c.rows.takd_assistant = row(model="mlp", model_kwargs={"widths": [1000, 1000]}, teacher=cached("teacher"), terms=kd,
                              **common)
  c.rows.takd = row(teacher=cached("takd_assistant"), terms=kd, **student)
  c.rows.tfkd = row(terms={"ce": {"weight": 0.1}, "tfkd": {"weight": 0.9, "correct_probability": 0.9,
                                                           "temperature": 20.0}}, **student)
  c.rows.wd_generate = row(model="mlp_800", teacher={"row": "teacher", "generator": r"layers_(\d+)"}, terms=kd,
                           optimizer=adam, schedule=cosine, epochs=max(1, epochs // 6))
  c.rows.wd = row(teacher=cached("teacher"), init={"from": "wd_generate"}, terms=kd, **student)
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
