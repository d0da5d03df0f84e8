r"""The CIFAR-100 tables of Zhao et al. 2022 (DKD), Tables 1 and 2: 11 teacher/student pairs, KD and DKD.

The recipe of the authors' code (megvii-research/mdistiller, `configs/cifar100/dkd/*.yaml`
and `mdistiller/engine/cfg.py`): SGD momentum 0.9, weight decay 5e-4, batch 64,
240 epochs, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students) x0.1 at epochs
150/180/210, random crop (4-pixel padding) + flip. DKD: CE 1, alpha 1, beta 8
(the per-pair beta of those configs: 2 for resnet56->resnet20 and
resnet110->resnet32, 6 for the WRN pairs, vgg13->vgg8 and vgg13->MobileNetV2),
T 4, its weight min(epoch / 20, 1) with epochs counted from 1 (mdistiller's
`DKD.forward_train`: a per-epoch staircase, `warmup_shape="epoch"`). KD: CE 0.1, KD 0.9,
T 4. Teachers are trained here with the same recipe (rows `teacher__<arch>`),
or point a row's `teacher` at a trained model directory (e.g. converted from
CRD's published teachers, see README). Row names: `<teacher>__<student>__<method>`.

Each row's `paper` field is the DKD paper's top-1 (%) as given in the mdistiller
README; teacher and student-alone figures are those of the CRD paper, which the
DKD tables repeat.

Logit standardization (Sun et al., CVPR 2024) rows for resnet32x4 -> resnet8x4, as
the authors' code stood when their logs of these figures were committed
(sunshangquan/logit-standardization-KD 6083e2d, 2024-03-01; `tools/train.py
--logit-stand`, defaults --base-temp 2 --kd-weight 9): `kd_ls` z-scores both
logits, T 2, KD weight 9, CE 1 (the cfg's KD CE weight then; 0.1 from 2024-03-10)
(76.62); `dkd_ls` z-scores them with DKD's alpha x9 = 9, beta = (the updated
alpha) x9 = 81 and DKD's own T 4 (that script set KD.TEMPERATURE, which DKD does
not read), CE 1, the 20-epoch warm-up (77.01). The script was corrected on
2024-05-18 (beta x9 = 72, DKD T 2), after the figure.

Last partial batch: the references keep it (`drop_last=False`: 50000 = 781 x 64
+ 16, so 782 steps an epoch, the last of 16 examples); kd_jax drops the remainder
of each epoch's permutation (781 full batches, 16 random examples an epoch left
out, 0.03%), since its data pipeline does not pad and mask training batches.

  python -m experiments.main --config=experiments/configs/dkd_cifar100.py:resnet32x4__resnet8x4__dkd --workdir=$W
  python -m experiments.reproduce --config='experiments/configs/dkd_cifar100.py:*__dkd' --seeds=3 --workdir=$W
"""
from kd_jax.train import base_config, row

# (teacher, student): (teacher %, student %, KD %, DKD %, DKD beta)
PAIRS = {
    ("resnet56", "resnet20"): (72.34, 69.06, 70.66, 71.97, 2.0),
    ("resnet110", "resnet32"): (74.31, 71.14, 73.08, 74.11, 2.0),
    ("resnet32x4", "resnet8x4"): (79.42, 72.50, 73.33, 76.32, 8.0),
    ("wrn_40_2", "wrn_16_2"): (75.61, 73.26, 74.92, 76.23, 6.0),
    ("wrn_40_2", "wrn_40_1"): (75.61, 71.98, 73.54, 74.81, 6.0),
    ("vgg13", "vgg8"): (74.64, 70.36, 72.98, 74.68, 6.0),
    ("resnet32x4", "ShuffleV1"): (79.42, 70.50, 74.07, 76.45, 8.0),
    ("wrn_40_2", "ShuffleV1"): (75.61, 70.50, 74.83, 76.70, 8.0),
    ("vgg13", "MobileNetV2"): (74.64, 64.60, 67.37, 69.71, 6.0),
    ("ResNet50", "MobileNetV2"): (79.34, 64.60, 67.35, 70.35, 8.0),
    ("resnet32x4", "ShuffleV2"): (79.42, 71.82, 74.45, 77.07, 8.0),
}
WARMUP_EPOCHS = 20
# Logit standardization (Sun et al. 2024): (teacher, student) -> (KD+LS %, DKD+LS %), the authors' README.
LOGIT_STANDARDIZATION = {("resnet32x4", "resnet8x4"): (76.62, 77.01)}
LS_WEIGHT, LS_TEMPERATURE = 9.0, 2.0  # tools/train.py's --kd-weight, --base-temp defaults


def method_terms(method: str, beta: float = 8.0) -> dict:
  dkd = {"weight": 1.0, "alpha": 1.0, "beta": beta, "temperature": 4.0, "warmup_epochs": WARMUP_EPOCHS,
         "warmup_shape": "epoch"}
  return {
      "kd": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}},
      "dkd": {"ce": {"weight": 1.0}, "dkd": dkd},
      "kd_ls": {"ce": {"weight": 1.0}, "kd": {"weight": LS_WEIGHT, "temperature": LS_TEMPERATURE,
                                              "standardize": True}},
      "dkd_ls": {"ce": {"weight": 1.0}, "dkd": {**dkd, "alpha": LS_WEIGHT, "beta": LS_WEIGHT * LS_WEIGHT,
                                                "standardize": True}},
  }[method]


def _recipe(student: str):
  small = student.startswith(("MobileNet", "Shuffle"))
  sgd = {"name": "sgd", "learning_rate": 0.01 if small else 0.05, "momentum": 0.9, "weight_decay": 5e-4}
  return dict(optimizer=sgd, schedule={"name": "step", "boundaries": [150, 180, 210], "factor": 0.1}, epochs=240,
              data={"augment": "crop_flip"})


def get_config(rows: str = ""):
  """The tables; `rows`: comma-separated row names or patterns (with the rows they depend on)."""
  c = base_config()
  c.data.name = "cifar100"
  c.data.batch_size = 64
  c.data.eval_batch_size = 1000
  c.log_every_steps = 200
  c.checkpoint_every_steps = 5000
  for (teacher, student), (teacher_paper, student_paper, kd_paper, dkd_paper, beta) in PAIRS.items():
    c.rows[f"teacher__{teacher}"] = row(model=teacher, terms={"ce": {}}, paper=teacher_paper, **_recipe(teacher))
    c.rows[f"student__{student}"] = row(model=student, terms={"ce": {}}, paper=student_paper, **_recipe(student))
    methods = [("kd", kd_paper), ("dkd", dkd_paper)]
    if (teacher, student) in LOGIT_STANDARDIZATION:
      methods += list(zip(("kd_ls", "dkd_ls"), LOGIT_STANDARDIZATION[teacher, student]))
    for method, figure in methods:
      c.rows[f"{teacher}__{student}__{method}"] = row(
          model=student, teacher=f"teacher__{teacher}", terms=method_terms(method, beta), paper=figure,
          **_recipe(student))
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
