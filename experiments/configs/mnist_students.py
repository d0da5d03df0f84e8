r"""Issue #11's teacher–student architecture methods on MNIST, next to the Hinton student alone and with KD.

Shared with experiments/configs/mnist_methods.py: the Hinton teacher (784-1200-1200-10,
dropout, jitter, max-norm), the recipe (Adam 1e-3, cosine decay, batch 128, 60 epochs) and
the KD loss (0.1 CE + 0.9 KD at T=20). Rows:
  teacher, student, kd      as in mnist_methods.py (the float 784-800-800-10 student)
  kd_q2, kd_q4, kd_q8       quantized distillation (Polino, Pascanu & Alistarh 2018): the student's
                            weight matrices fake-quantised to 2 / 4 / 8 bits in every forward pass
                            (uniform, min-max scaling per tensor; biases in float), straight-through
                            gradients to float master weights, KD from the teacher
  ce_q2, ce_q4, ce_q8       the same quantised students trained without KD (CE only)
  rekd_student, rekd        residual-error KD (Gao, Wang, Wu & Zhou 2020): stage 1 the student alone with
                            KD; stage 2 adds a 784-200-10 assistant that regresses the residual
                            z_teacher − z_student of the frozen student; the prediction is student + assistant
  pbkd_stage1, pbkd_stage2  progressive blockwise KD (Wang et al. 2018): the teacher's two hidden layers
                            replaced one per stage by rank-100 bottlenecks (784->100->1200,
                            1200->100->1200), each trained on the teacher's block output (hint) and KD
                            with the other blocks frozen; the teacher's classifier is kept (frozen)
  ns_teacher                Noisy Student (Xie et al. 2020): the Hinton teacher trained on 1000
                            labelled examples only (the other 59000 are unlabelled)
  ns_student1, ns_student2  an equal-size student with noise (dropout 50%/20%, jitter) trained on all
                            60000 examples: CE on the labelled 1000, soft pseudo-labels of the previous
                            model on all; generation 2 is taught by generation 1. The teacher is not
                            noised: it labels the clean images (`teacher={"input": "clean"}`, cached)

  python -m experiments.main --config=experiments/configs/mnist_students.py:kd_q2,kd_q4,kd_q8 --workdir=/tmp/mnist_students
  python -m experiments.reproduce --config=experiments/configs/mnist_students.py --seeds=3 --workdir=/tmp/mnist_students
"""
from kd_jax.train.tables import mnist_table
from kd_jax.train import row

LABELLED = 1000  # Noisy Student's labelled examples (of MNIST's 60000)


def get_config(rows: str = ""):
  c = mnist_table()
  epochs = 60
  adam = {"name": "adam", "learning_rate": 1e-3}
  cosine = {"name": "cosine"}
  common = dict(optimizer=adam, schedule=cosine, epochs=epochs)
  student = dict(model="mlp_800", **common)
  cached = {"row": "teacher", "cache": True}  # rows reading only the teacher's logits on un-augmented inputs
  kd = {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 20.0}}
  hinton_teacher = dict(model="mlp_1200", data={"augment": "jitter"}, optimizer={**adam, "max_norm": 3.5},
                        schedule=cosine, epochs=epochs)

  c.rows.teacher = row(terms={"ce": {}}, paper=67, **hinton_teacher)
  c.rows.student = row(terms={"ce": {}}, paper=146, **student)
  c.rows.kd = row(teacher=cached, terms=kd, paper=74, **student)

  # Quantized distillation: the same student with k-bit weights, with and without the teacher.
  for bits in (2, 4, 8):
    quantized = dict(model="quantized", model_kwargs={"base": "mlp_800", "bits": bits, "scaling": "tensor"},
                     **common)
    c.rows[f"kd_q{bits}"] = row(teacher=cached, terms=kd, **quantized)
    c.rows[f"ce_q{bits}"] = row(terms={"ce": {}}, **quantized)

  # Residual-error KD: the student alone (its assistant not built), then the assistant on its residual.
  pair = {"student": "mlp_800", "assistant": "mlp", "assistant_kwargs": {"widths": [200]}}
  c.rows.rekd_student = row(model="residual", model_kwargs={**pair, "output": "student"}, teacher=cached,
                            terms=kd, **common)
  c.rows.rekd = row(model="residual", model_kwargs={**pair, "output": "sum"}, teacher=cached,
                    init={"from": "rekd_student", "partial": True}, optimizer={**adam, "freeze": ["student/student"]},
                    schedule=cosine, epochs=epochs, terms={"residual": {}})

  # Progressive blockwise KD: stage k = student blocks 1..k + the teacher's blocks k+1.. and head (frozen).
  hidden = [1200, 1200]
  stage_epochs = max(1, epochs // 3)
  for k in (1, 2):
    frozen = [f"student/student_block{i}" for i in range(1, k)] + [f"student/dense{i}" for i in range(k + 1, 3)]
    c.rows[f"pbkd_stage{k}"] = row(
        model="blockwise_mlp", model_kwargs={"widths": hidden, "rank": 100, "student_blocks": k},
        teacher="teacher", init={"from": "teacher" if k == 1 else f"pbkd_stage{k - 1}", "partial": True},
        optimizer={**adam, "freeze": frozen + ["student/head"]}, schedule=cosine, epochs=stage_epochs,
        terms={"hint": {"student_feature": f"stage{k}", "teacher_feature": f"stage{k}", "regressor": False},
               "kd": {"temperature": 4.0}})

  # Noisy Student: a teacher on the labelled part, then noised students on labelled + pseudo-labelled data.
  c.rows.ns_teacher = row(terms={"ce": {}}, model="mlp_1200", optimizer={**adam, "max_norm": 3.5}, schedule=cosine,
                          data={"augment": "jitter", "labelled_examples": LABELLED, "unlabelled": "drop"},
                          epochs=epochs * 5)
  # The students are noised (dropout, jitter); their teacher labels the clean images (Xie et al. 2020), once.
  noisy = dict(terms={"ce": {}, "pseudo_label": {"hard": False, "temperature": 1.0}}, model="mlp_1200",
               optimizer={**adam, "max_norm": 3.5}, schedule=cosine, epochs=epochs,
               data={"augment": "jitter", "labelled_examples": LABELLED})
  c.rows.ns_student1 = row(teacher={"row": "ns_teacher", "input": "clean", "cache": True}, **noisy)
  c.rows.ns_student2 = row(teacher={"row": "ns_student1", "input": "clean", "cache": True}, **noisy)
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
