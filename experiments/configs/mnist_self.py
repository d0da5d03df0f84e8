r"""Self-distillation on MNIST: snapshot distillation, multi-exit distillation and SLA, next to the student alone.

All rows share the Hinton MNIST student's recipe (Adam 1e-3, cosine decay,
batch 128, 60 epochs, no augmentation; experiments/configs/mnist_methods.py); the
last partial batch of each epoch's permutation is dropped (60000 = 468 x 128 + 96).
`paper` is test accuracy (%). Rows:
  student                   784-800-800-10 trained alone (the reference)
  snapshot_c1..snapshot_c4  Yang, Xie, Qiao & Yuille 2019, snapshot distillation: one run of 4 cosine cycles
                            of 15 epochs (the student's 60), a stage recipe: cycle k starts from the weights
                            at the end of cycle k-1 (`init`) with the learning rate restarted, and that
                            snapshot is its teacher (`teacher`, KD at T=4 plus CE); cycle 1 is CE alone.
                            snapshot_c4 is the result. `snapshot_rows` builds the chain for any cycle count.
  exits_ce                  the 784-800-800-800-10 MLP with early exits (linear classifiers) on hidden
                            layers 1 and 2 (`with_exits`, bottleneck=False), every exit trained with its CE
                            alone (the standard multi-exit training the paper compares with)
  multi_exit                Phuong & Lampert 2019: the same network, each early exit distilled from the final
                            exit (0.5 CE + 0.5 KD at T=1, the target stop-gradient), the final exit by 0.5 CE
                            (the authors' DistillationBasedLoss weights it 1 - C, C = 0.5 in train_cifar.py).
                            (At T=4 the T²-scaled KD from a still poor final exit dominated the shared layers'
                            updates: 94.4% for the final exit after 2 epochs on MNIST, 97.9% at T=1.)
  multi_exit_adaptive       the same with the authors' adaptive temperature: T from 1, x1.05 after each step
                            whose final-exit mean max-probability at T exceeds 0.5
  multi_exit_deeper         the same as multi_exit, each early exit distilled from all deeper exits (mean of the
                            KLs)
                            The result of each exits row has `test_accuracy/exit_stage1`, `.../exit_stage2`
                            (and `test_accuracy`, the final exit) and `cost`: FLOPs and params up to each exit.
  sla                       Lee, Hwang & Shin 2020: SLA on the student: a joint classifier over 10 x 4
                            (class, rotation) labels, each batch rotated by 0/90/180/270 degrees; reports the
                            aggregated inference (the model's logits) and the single inference
  sla_sd                    SLA+SD: the same plus a 10-way head on the unrotated input distilled from the
                            aggregate (KL + its CE); its logits are the SD head (one forward pass at test);
                            reports `test_accuracy/aggregated`, `/single`, `/sd`

  python -m experiments.main --config=experiments/configs/mnist_self.py --workdir=/tmp/mnist_self
  python -m experiments.main --config=experiments/configs/mnist_self.py:snapshot_c4 --workdir=/tmp/mnist_self
"""
from typing import Any, Mapping

from kd_jax.train.tables import mnist_table
from kd_jax.train import row


def snapshot_rows(c, *, prefix: str = "snapshot", cycles: int, epochs_per_cycle: int,
                  kd_terms: Mapping[str, Any], first_terms: Mapping[str, Any] | None = None,
                  cache_teacher: bool = False, **row_kwargs) -> list[str]:
  """Adds snapshot distillation's cycles to config `c` as rows `<prefix>_c1..<prefix>_c<cycles>`; returns
  their names. Each row is one cycle with its own schedule (row_kwargs' `schedule`, e.g. cosine: the
  learning rate restarts at every cycle); cycle k > 1 starts from cycle k-1's final weights and learns from
  them as its teacher with `kd_terms`; cycle 1 trains with `first_terms` (CE alone by default). The cycles
  read the batches of one run (`data.start_epoch`: cycle k those of epochs (k-1)·epochs_per_cycle onward).
  The optimizer state (e.g. Adam's moments) starts afresh at each cycle, with its restarted schedule."""
  if cycles < 2:
    raise ValueError(f"snapshot_rows: snapshot distillation needs at least 2 cycles, got {cycles}")
  names = [f"{prefix}_c{k}" for k in range(1, cycles + 1)]
  c.rows[names[0]] = row(terms=dict(first_terms or {"ce": {}}), epochs=epochs_per_cycle, **row_kwargs)
  for k, (previous, name) in enumerate(zip(names, names[1:]), start=1):
    c.rows[name] = row(terms=dict(kd_terms), teacher={"row": previous, "cache": cache_teacher},
                       init={"from": previous}, epochs=epochs_per_cycle,
                       data={"start_epoch": k * epochs_per_cycle}, **row_kwargs)
  return names


def get_config(rows: str = ""):
  c = mnist_table(paper_metric="test_accuracy")
  epochs = 60
  adam = {"name": "adam", "learning_rate": 1e-3}
  cosine = {"name": "cosine"}
  common = dict(optimizer=adam, schedule=cosine)

  # Hinton et al. 2015's 146 test errors of 10,000, as this table's metric: accuracy in %.
  c.rows.student = row(model="mlp_800", terms={"ce": {}}, epochs=epochs, paper=round(100 - 146 / 100, 2), **common)

  # Snapshot distillation: the student's 60 epochs as 4 cycles; the snapshot's logits on the (un-augmented)
  # train set are computed once per cycle (the teacher cache).
  snapshot_rows(c, cycles=4, epochs_per_cycle=epochs // 4, model="mlp_800", cache_teacher=True,
                kd_terms={"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}}, **common)

  # Exits as linear classifiers on hidden layers 1 and 2 (no bottleneck): each costs less than the next.
  exits = {"model": "with_exits", "model_kwargs": {"base": "mlp", "stages": ["stage1", "stage2"], "bottleneck": False,
                                                   "base_kwargs": {"widths": [800, 800, 800]}}}
  stages = ["stage1", "stage2"]
  c.rows.exits_ce = row(**exits, epochs=epochs, **common, terms={
      "ce": {}, "multi_exit": {"stages": stages, "alpha": 0.0}})
  final_ce = {"weight": 0.5}  # the authors' (1 - C)
  c.rows.multi_exit = row(**exits, epochs=epochs, **common, terms={
      "ce": final_ce, "multi_exit": {"stages": stages, "alpha": 0.5, "temperature": 1.0, "teachers": "final"}})
  c.rows.multi_exit_adaptive = row(**exits, epochs=epochs, **common, terms={
      "ce": final_ce, "multi_exit": {"stages": stages, "alpha": 0.5, "temperature": 1.0, "teachers": "final",
                                     "adaptive_temperature": True, "max_probability": 0.5,
                                     "temperature_factor": 1.05}})
  c.rows.multi_exit_deeper = row(**exits, epochs=epochs, **common, terms={
      "ce": final_ce, "multi_exit": {"stages": stages, "alpha": 0.5, "temperature": 1.0, "teachers": "deeper"}})

  c.rows.sla = row(model="sla", model_kwargs={"base": "mlp_800", "output": "aggregated", "sd_head": False},
                   epochs=epochs, terms={"sla": {"self_distillation": False}}, **common)
  c.rows.sla_sd = row(model="sla", model_kwargs={"base": "mlp_800", "output": "sd"}, epochs=epochs,
                      terms={"sla": {"self_distillation": True}}, **common)
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
