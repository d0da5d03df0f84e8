r"""Self-attention distillation (MiniLM, TinyBERT's attention loss) on a small Transformer, on `reverse`.

The teacher and students of wd_transformer.py (kd_jax.data.sequences' reversal
task: 12 tokens, 16 ids, teacher forcing, per-token accuracy; pre-LN
encoder-decoders; Adam 1e-3 with a cosine decay). Rows:
  teacher        6 + 6 layers, width 64, 4 heads, FFN 256
  kd             the 2 + 2-layer, width-32, 4-head student, 0.5 CE + 0.5 KD (T=1)
  attention      kd + the KL between the teacher's and the student's attention distributions
                 (Wang et al. 2020, MiniLM's attention transfer) in every attention (encoder,
                 decoder self (causal positions only), cross), per head, student layer j from
                 teacher layer 3(j + 1) (TinyBERT's uniform mapping)
  minilm         kd + MiniLM's two losses on the last layers only: attention KL and the
                 value-relation KL(softmax(V Vᵀ/√d)) of the self-attentions
  tinybert_attn  kd + TinyBERT-style MSE between attention maps (probabilities), uniform mapping

Measured on CPU, seed 0, as in the table (tests/test_attention_distill.py, slow; per-token test
accuracy): teacher 99.94%, kd 96.48%, attention 99.90%.

  python -m experiments.main --config=experiments/configs/attention_transformer.py --workdir=/tmp/attention
  python -m experiments.reproduce --config=experiments/configs/attention_transformer.py --seeds=2 \
      --workdir=/tmp/attention
"""
from kd_jax.train.tables import table
from kd_jax.train import row


def get_config(rows: str = ""):
  c = table("reverse", log_every_steps=50)
  teacher_epochs, student_epochs = 2, 2
  adam = {"name": "adam", "learning_rate": 1e-3}
  cosine = {"name": "cosine", "warmup_epochs": 0.5}
  teacher = {"layers": 6, "width": 64, "heads": 4, "ffn": 256}
  student = {"layers": 2, "width": 32, "heads": 4, "ffn": 128}
  kd = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 1.0}}
  common = dict(model="transformer", optimizer=adam, schedule=cosine)
  distil = dict(model_kwargs=student, teacher="teacher", epochs=student_epochs, **common)

  c.rows.teacher = row(model_kwargs=teacher, terms={"ce": {}}, epochs=teacher_epochs, **common)
  c.rows.kd = row(terms=kd, **distil)
  c.rows.attention = row(terms={**kd, "attention": {"weight": 1.0, "layers": "uniform", "loss": "kl"}}, **distil)
  c.rows.minilm = row(terms={**kd, "attention": {"weight": 1.0, "layers": "last", "loss": "kl",
                                                 "value_weight": 1.0}}, **distil)
  # The MSE of probabilities (rows of ~12 entries) is ~100x smaller than the KL: a weight of 100.
  c.rows.tinybert_attn = row(terms={**kd, "attention": {"weight": 100.0, "layers": "uniform", "loss": "mse"}},
                             **distil)
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
