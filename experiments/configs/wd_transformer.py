r"""Weight distillation on a small Transformer encoder-decoder, on synthetic sequence reversal.

The seed (weight distillation for Transformer MT) claims that a student whose
weights are generated from the teacher's and then fine-tuned with KD beats a
student of the same size trained with KD alone. Here on `reverse` (kd_jax.data.
sequences: 12 tokens of a 16-id vocabulary, the target the source reversed,
teacher forcing; accuracy is per token), pre-LN Transformers (kd_jax.models.
transformer), Adam with a cosine decay. Rows:
  teacher         6 + 6 layers, width 64, 4 heads, FFN 256
  student         2 + 2 layers, width 32, 4 heads, FFN 128, cross-entropy only
  kd              the student with word-level KD from the teacher (0.5 CE + 0.5 KD, T=1), as
                  many epochs as the two weight-distillation phases together
  wd_generate     phase 1: a generator maps the teacher's weights to the student's (each class of
                  weights, e.g. every decoder FFN first-layer kernel, shares W_I, W_O, W_L; each
                  student layer comes from 3 adjacent teacher layers); only the generator is
                  trained, with the KD objective through the generated student
  wd              phase 2: the generated student fine-tuned with the same KD objective

Measured on CPU, 2 seeds (per-token test accuracy; tests/test_transformer_wd.py, slow): KD 96.50% / 93.00%,
weight distillation 100% / 100% (phase 1 alone 99.996% / 100%); the teacher 99.95% / 99.75%.

  python -m experiments.main --config=experiments/configs/wd_transformer.py --workdir=/tmp/wd_transformer
  python -m experiments.reproduce --config=experiments/configs/wd_transformer.py --seeds=2 --workdir=/tmp/wd_transformer
"""
from kd_jax.train.tables import table
from kd_jax.train import row


def get_config(rows: str = ""):
  c = table("reverse", log_every_steps=50)
  teacher_epochs, phase1_epochs, phase2_epochs = 2, 1, 1
  adam = {"name": "adam", "learning_rate": 1e-3}
  cosine = {"name": "cosine", "warmup_epochs": 0.5}
  teacher = {"layers": 6, "width": 64, "heads": 4, "ffn": 256}
  student = {"layers": 2, "width": 32, "heads": 4, "ffn": 128}
  kd = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 1.0}}
  common = dict(model="transformer", optimizer=adam, schedule=cosine)

  c.rows.teacher = row(model_kwargs=teacher, terms={"ce": {}}, epochs=teacher_epochs, **common)
  c.rows.student = row(model_kwargs=student, terms={"ce": {}}, epochs=phase1_epochs + phase2_epochs, **common)
  c.rows.kd = row(model_kwargs=student, teacher="teacher", terms=kd, epochs=phase1_epochs + phase2_epochs, **common)
  c.rows.wd_generate = row(model_kwargs=student, teacher={"row": "teacher", "generator": r"layers_(\d+)"}, terms=kd,
                           epochs=phase1_epochs, **common)
  c.rows.wd = row(model_kwargs=student, teacher="teacher", init={"from": "wd_generate"}, terms=kd, epochs=phase2_epochs,
                  **common)
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
