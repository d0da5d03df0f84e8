r"""Online and collaborative distillation on MNIST: KDCL, OKDDip, FFL, and cheap convolutions trained online.

No teacher: the networks of each row learn together from scratch. The MLP rows
are the Hinton student (784-800-800-10) with the MNIST method table's recipe
(Adam 1e-3, cosine decay, batch 128, 60 epochs); the CNN rows are RepDistiller's
resnet8 (16-16-32-64) at 28x28x1, SGD with momentum, 20 epochs. Rows:
  student                 the MLP alone (CE)
  kdcl, kdcl_minlogit     Guo et al. 2020: 2 MLP peers, each distils (T=2) from the peers' ensemble, the mean
                          of their logits (KDCL-Naive) or MinLogit, plus CE
  okddip                  Chen et al. 2020: the first layer shared by 4 branches (a `one` model without gate);
                          branch 0, the group leader (a 784-800-800-10 network), distils from the mean of the 3
                          auxiliary peers, each peer from its own attention-weighted aggregate of the peers (T=3)
  ffl                     Kim et al. 2019: 2 MLPs and a fusion module (their last hidden layers concatenated, a
                          Dense, a classifier); the fused classifier learns from the MLPs' ensemble, each MLP from
                          the fused classifier (T=3), all with CE; reports MLP 0, and the fused classifier
  cnn_full, cnn_depthwise resnet8 alone, with full convolutions (77.8k params) or depthwise-separable ones (13.8k)
  cheap_dml, cheap_kdcl,  Xie et al. 2019: the cheap (depthwise) resnet8 trained online against the full one in
  cheap_ffl               one `group` model (two different architectures): mutual learning (DML, T=1), KDCL's
                          mean-logit ensemble (T=2), or FFL over their last feature maps (stage3); each row
                          reports the cheap member (the model's output) and both members (test_accuracy/member_<m>)

  python -m experiments.main --config=experiments/configs/mnist_collaborative.py --workdir=/tmp/mnist_collab
  python -m experiments.main --config=experiments/configs/mnist_collaborative.py:cheap_dml,cnn_depthwise \
      --workdir=/tmp/mnist_collab
"""
from kd_jax.train.tables import mnist_table
from kd_jax.train import row

MLP = {"model": "mlp_800"}
CNN_FULL = {"model": "resnet8"}
CNN_CHEAP = {"model": "resnet8", "conv_kind": "depthwise"}


def get_config(rows: str = ""):
  c = mnist_table()
  adam = dict(optimizer={"name": "adam", "learning_rate": 1e-3}, schedule={"name": "cosine"}, epochs=60)
  sgd = dict(optimizer={"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
             schedule={"name": "cosine"}, epochs=20)
  peers = dict(model="mlp_800", peers={"count": 2, "exchange": "predictions"}, **adam)

  c.rows.student = row(model="mlp_800", terms={"ce": {}}, **adam)
  c.rows.kdcl = row(terms={"ce": {}, "kdcl": {"temperature": 2.0, "ensemble": "mean"}}, **peers)
  c.rows.kdcl_minlogit = row(terms={"ce": {}, "kdcl": {"temperature": 2.0, "ensemble": "min_logit"}}, **peers)
  c.rows.okddip = row(model="one", model_kwargs={"base": "mlp_800", "branches": 4, "gate": False},
                      terms={"okddip": {"temperature": 3.0, "projection_dim": 128}}, **adam)
  c.rows.ffl = row(model="group", model_kwargs={"members": [MLP, MLP], "fusion": "pre_logits"},
                   terms={"ffl": {"temperature": 3.0}}, **adam)

  c.rows.cnn_full = row(model="group", model_kwargs={"members": [CNN_FULL]}, terms={"ce": {}}, **sgd)
  c.rows.cnn_depthwise = row(model="group", model_kwargs={"members": [CNN_CHEAP]}, terms={"ce": {}}, **sgd)
  cheap = {"members": [CNN_FULL, CNN_CHEAP], "output": 1}  # the exported model is the cheap student
  c.rows.cheap_dml = row(model="group", model_kwargs=cheap, **sgd, terms={
      "ce": {"group": "member"}, "dml": {"temperature": 1.0, "group": "member"}})
  c.rows.cheap_kdcl = row(model="group", model_kwargs=cheap, **sgd, terms={
      "ce": {"group": "member"}, "kdcl": {"temperature": 2.0, "group": "member"}})
  c.rows.cheap_ffl = row(model="group", model_kwargs={**cheap, "fusion": "stage3"},
                         terms={"ffl": {"temperature": 3.0}}, **sgd)
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
