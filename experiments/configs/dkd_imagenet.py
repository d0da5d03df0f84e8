r"""The ImageNet tables of Zhao et al. 2022 (DKD), Tables 3 and 4: ResNet34->ResNet18, ResNet50->MobileNetV1.

The recipe of the authors' code (megvii-research/mdistiller,
`configs/imagenet/r34_r18/{dkd,kd}.yaml`, `configs/imagenet/r50_mv1/{dkd,kd}.yaml`):
SGD momentum 0.9, weight decay 1e-4, batch 512, 100 epochs, lr 0.2 x0.1 at
epochs 30/60/90; random-resized crop 224 + flip (in the input pipeline,
kd_jax.data.imagenet, bilinear resizing as torchvision's), centre crop for
evaluation. DKD: CE 1, alpha 1, beta 0.5 (ResNet34->ResNet18) or 2
(ResNet50->MobileNetV1), T 1, `WARMUP: 1`, which mdistiller applies as
min(epoch / 1, 1) with epochs counted from 1: full weight from the first step
(`warmup_shape="epoch"`, not a ramp). KD: CE 0.5, KD 0.5, T 1.

Last partial batch: the references keep it (`drop_last=False`: 1281167 = 2502
x 512 + 143); kd_jax drops the remainder of each epoch's permutation (2502 full
batches, 143 random images an epoch left out, 0.01%), since its data pipeline
does not pad and mask training batches. Evaluation sees every validation image once.

The DKD paper distils from torchvision's pretrained ResNet-34 and ResNet-50. The
rows `teacher__resnet34` / `teacher__resnet50` train them here with
torchvision's recipe (batch 256, lr 0.1 x0.1 at epochs 30/60, 90 epochs, wd
1e-4); to use torchvision's weights instead, convert them once
(`python -m third_party.convert_teacher`, see README) and let the teacher row stand
for them, evaluated and never trained:
`--config.rows.teacher__resnet34.checkpoint=/data/teachers/resnet34`.
Row names: `<teacher>__<student>__<method>`; `paper` is top-1 (%): DKD and KD
(the DKD paper's re-run of KD with this recipe) from the mdistiller README,
teachers from torchvision's model card, the students from the DKD paper's tables.

  # on a TPU VM with imagenet2012 prepared for TFDS in $DATA:
  python -m experiments.main --config=experiments/configs/dkd_imagenet.py:resnet34__resnet18__dkd \
      --config.data.dir=$DATA --workdir=$W
"""
from kd_jax.train import base_config, row

# (teacher, student): (teacher %, student %, KD %, DKD %, DKD beta)
PAIRS = {
    ("resnet34", "resnet18"): (73.31, 69.75, 71.03, 71.70, 0.5),
    ("resnet50", "MobileNetV1"): (76.13, 68.87, 70.50, 72.05, 2.0),
}


def method_terms(method: str, beta: float) -> dict:
  return {
      "kd": {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 1.0}},
      "dkd": {"ce": {"weight": 1.0},
              "dkd": {"weight": 1.0, "alpha": 1.0, "beta": beta, "temperature": 1.0, "warmup_epochs": 1,
                      "warmup_shape": "epoch"}},
  }[method]


def _recipe():
  return dict(optimizer={"name": "sgd", "learning_rate": 0.2, "momentum": 0.9, "weight_decay": 1e-4},
              schedule={"name": "step", "boundaries": [30, 60, 90], "factor": 0.1}, epochs=100)


def _teacher_recipe():
  # torchvision's reference recipe, with the lr scaled linearly from its batch of 256 to this table's 512.
  return dict(optimizer={"name": "sgd", "learning_rate": 0.2, "momentum": 0.9, "weight_decay": 1e-4},
              schedule={"name": "step", "boundaries": [30, 60], "factor": 0.1}, epochs=90)


def get_config(rows: str = ""):
  """The tables; `rows`: comma-separated row names or patterns (with the rows they depend on)."""
  c = base_config()
  c.data.name = "imagenet2012"
  c.data.batch_size = 512
  c.data.eval_batch_size = 500  # divides the 50000 validation images
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  for (teacher, student), (teacher_paper, student_paper, kd_paper, dkd_paper, beta) in PAIRS.items():
    c.rows[f"teacher__{teacher}"] = row(model=teacher, terms={"ce": {}}, paper=teacher_paper, **_teacher_recipe())
    c.rows[f"student__{student}"] = row(model=student, terms={"ce": {}}, paper=student_paper, **_recipe())
    for method, figure in (("kd", kd_paper), ("dkd", dkd_paper)):
      c.rows[f"{teacher}__{student}__{method}"] = row(
          model=student, teacher=f"teacher__{teacher}", terms=method_terms(method, beta), paper=figure, **_recipe())
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
