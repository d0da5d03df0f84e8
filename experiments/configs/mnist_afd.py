r"""AFD (Chung, Park, Kim & Kwak 2020, "Feature-map-level Online Adversarial Knowledge Distillation", ICML)
on MNIST, next to DML (Zhang et al. 2018), the same two peers without the discriminators.

Two 784-800-800-10 MLPs trained together from scratch (no teacher), the
Hinton table's recipe (Adam 1e-3, cosine decay, batch 128, 60 epochs). Rows:
  dml   each peer: CE + KL(p_other ‖ p_self) at T=1
  afd   each peer: CE + KL as in dml + 0.1 x the least-squares adversarial loss on
        its last hidden layer (`pre_logits`, [B, 800]): its discriminator (an MLP
        800-64-1 in the term's state, own Adam 1e-5, b1=0.5) learns to tell the
        other peer's features from its own, the peer to fool it
        (kd_jax/distill/adversarial.py)

The adversarial weight and the discriminator's learning rate are ours (the
paper's are for CIFAR/ImageNet conv features): on MNIST, weight 0.1 with a
discriminator Adam at 1e-4 let the discriminators win and cost accuracy (92.5%
vs DML's 96.5% test accuracy after 300 steps); at 1e-5 the peers learn as fast
as DML's (96.5%). Measured (tests/test_afd.py, slow): afd after 2 epochs 97.50% test accuracy
(peers 97.48%, 97.53%).

  python -m experiments.main --config=experiments/configs/mnist_afd.py --workdir=/tmp/mnist_afd
  python -m experiments.reproduce --config=experiments/configs/mnist_afd.py --seeds=3 --workdir=/tmp/mnist_afd
"""
from kd_jax.train.tables import mnist_table
from kd_jax.train import row


def get_config(rows: str = ""):
  c = mnist_table()
  common = dict(model="mlp_800", optimizer={"name": "adam", "learning_rate": 1e-3}, schedule={"name": "cosine"},
                epochs=60, peers={"count": 2, "exchange": "predictions"})
  dml = {"ce": {}, "dml": {"temperature": 1.0}}
  c.rows.dml = row(terms=dml, **common)
  c.rows.afd = row(terms={**dml, "afd": {"weight": 0.1, "feature": "pre_logits", "hidden": [64], "kind": "lsgan",
                                         "learning_rate": 1e-5, "b1": 0.5}}, **common)
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
