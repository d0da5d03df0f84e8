r"""The CIFAR-100 benchmark of Tian et al. 2020 (CRD), Tables 1 and 2: 13 teacher/student pairs x 14 methods.

The recipe of the paper's code: SGD momentum 0.9, weight decay 5e-4, batch 64,
240 epochs, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students) x0.1 at epochs
150/180/210, random crop (4-pixel padding) + flip, T=4. Loss weights of that
code: CE 1 (0.1 with KD), KD 0.9, FitNet 100, AT 1000, SP 3000, CC 0.02, VID 1,
RKD 1, PKT 30000, AB 1, FT 200, NST 50, CRD 0.8 (CRD+KD: KD 1, CRD 0.8).
CC is RepDistiller's `distiller_zoo/CC.py` (`cc` with variant="repdistiller": the
mean over consecutive pairs of the product of |embedding differences| on 128-wide
`LinearEmbed` outputs), the loss its 0.02 and the table's CC figures come from, not
the paper's RBF-kernel formula (variant="paper", whose value at weight 0.02 is
~1e-4: in effect cross-entropy alone).
Features as in that code (`helper/loops.py`): AT, NST, VID, AB on every stage
(`feat[1:-1]`: 4 stages for VGG, MobileNetV2, ResNet50, 3 otherwise; AB before
the ReLU), SP and FT on the last stage, FSP on the stem and every stage, CC,
RKD, PKT, CRD on the pooled embedding, FitNets on stage 2.
AB, FSP and FT start with a 30-epoch initialisation stage at a constant rate
(RepDistiller `helper/pretrain.py`: `--init_epochs 30`; the AB and FSP losses summed
with no factor there: the `-b` of their commands multiplies only the main stage's
term, which is zero for AB and FSP; AB's stages weighted 2^(i-n+1) x 3/1000 as its
`ABLoss`, FSP's matrices averaged as its `FSP`; FT's paraphraser at lr
0.01 for ResNet/WRN students, else the student's rate), a row `..._init` that
the method row continues with `init`. FT's `_init` row trains only its
paraphraser (rate 0.5, no BN; `optimizer.freeze=["student"]`) on the reconstruction of
the teacher's last feature map; the `ft` row restores it from there (term params
travel with `final/`), keeps it frozen and trains the student with the
translator (rate 0.5, BN) on RepDistiller's factor (`factor="repdistiller"`).

ReviewKD rows (Chen et al. 2021) for the pairs of the authors' CIFAR-100 script
(dvlab-research/ReviewKD `CIFAR-100/script/reviewKD.sh`: loss weight per pair,
5 by default, 8 for ShuffleV2, 0.6 for resnet20, 1 for resnet32; warm-up 20
epochs), with this table's recipe (batch 64, lr 0.05 / 0.01) as mdistiller's
`configs/cifar100/reviewkd.yaml` does (the authors' own script uses batch 128,
lr 0.1 / 0.02); figures from the ReviewKD paper's Tables 1-2 (vgg13 -> vgg8, 74.84, is in
the paper but not in the authors' script: its row uses the default weight 5). Teachers are trained here with the same
recipe (rows `teacher__<arch>`), or point a method row's `teacher` at a trained
model directory. Row names: `<teacher>__<student>__<method>`.

The paper's figures (top-1 %, from the CRD paper / RepDistiller README) are each
row's `paper` field; CRD+KD from the paper's tables.

Logit standardization rows `<teacher>__<student>__kd_ls` (Sun et al., CVPR 2024):
KD on z-scored logits with the authors' per-pair temperature and KD weight (the
`BASE_TEMP,KD_WEIGHT` of their log file names; `tools/train.py --logit-stand`) and
CE 1: their `mdistiller/engine/cfg.py` when those logs were committed (6083e2d,
2024-03-01; the CE weight became 0.1 on 2024-03-10), this table's recipe (their
yaml: batch 64, lr 0.05 / 0.01, wd 5e-4, 240 epochs); figures from their README
(sunshangquan/logit-standardization-KD).

Last partial batch: RepDistiller keeps it (`drop_last=False`: 50000 = 781 x 64 +
16); kd_jax drops the remainder of each epoch's permutation (16 random examples an
epoch, 0.03%), since its data pipeline does not pad and mask training batches.

  # one table row on a TPU VM (CIFAR-100 through TFDS):
  python -m experiments.main --config=experiments/configs/crd_cifar100.py:resnet32x4__resnet8x4__crd --workdir=$W
  # every method for one pair, 3 seeds, report paper vs ours:
  python -m experiments.reproduce --config='experiments/configs/crd_cifar100.py:resnet32x4__resnet8x4__*' \
      --seeds=3 --workdir=$W
"""
from kd_jax.train import base_config, row

PAIRS = {  # (teacher, student): paper's teacher and student-alone accuracy
    ("wrn_40_2", "wrn_16_2"): (75.61, 73.26),
    ("wrn_40_2", "wrn_40_1"): (75.61, 71.98),
    ("resnet56", "resnet20"): (72.34, 69.06),
    ("resnet110", "resnet20"): (74.31, 69.06),
    ("resnet110", "resnet32"): (74.31, 71.14),
    ("resnet32x4", "resnet8x4"): (79.42, 72.50),
    ("vgg13", "vgg8"): (74.64, 70.36),
    ("vgg13", "MobileNetV2"): (74.64, 64.60),
    ("ResNet50", "MobileNetV2"): (79.34, 64.60),
    ("ResNet50", "vgg8"): (79.34, 70.36),
    ("resnet32x4", "ShuffleV1"): (79.42, 70.50),
    ("resnet32x4", "ShuffleV2"): (79.42, 71.82),
    ("wrn_40_2", "ShuffleV1"): (75.61, 70.50),
}
# The paper's student accuracy per method, in the order of PAIRS (None: not reported).
PAPER = {
    "kd": [74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98, 67.37, 67.35, 73.81, 74.07, 74.45, 74.83],
    "fitnet": [73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02, 64.14, 63.16, 70.69, 73.59, 73.54, 73.73],
    "at": [74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43, 59.40, 58.58, 71.84, 71.73, 72.73, 73.32],
    "sp": [73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68, 66.30, 68.08, 73.34, 73.48, 74.56, 74.52],
    "cc": [73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71, 64.86, 65.43, 70.25, 71.14, 71.29, 71.38],
    "vid": [74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23, 65.56, 67.57, 70.30, 73.38, 73.40, 73.61],
    "rkd": [73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48, 64.52, 64.43, 71.50, 72.28, 73.21, 72.21],
    "pkt": [74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88, 67.13, 66.52, 73.01, 74.10, 74.69, 73.89],
    "ab": [72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94, 66.06, 67.20, 70.65, 73.55, 74.31, 73.34],
    "ft": [73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58, 61.78, 60.99, 70.29, 71.75, 72.50, 72.03],
    "fsp": [72.91, None, 69.95, 70.11, 71.89, 72.62, 70.23, None, None, None, None, None, None],
    "nst": [73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53, 58.16, 64.96, 71.28, 74.12, 74.68, 74.89],
    "crd": [75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94, 69.73, 69.11, 74.30, 75.11, 75.65, 76.05],
    "crd_kd": [75.64, 74.38, 71.63, 71.56, 73.75, 75.46, 74.29, 69.94, 69.54, 74.58, 75.12, 76.05, 76.27],
    "reviewkd": [76.12, 75.09, 71.89, None, 73.89, 75.63, 74.84, None, None, None, 77.45, 77.78, 77.14],
    "kd_ls": [76.11, 74.37, 71.43, None, 74.17, 76.62, 74.36, 68.61, 69.02, None, None, 75.56, None],
}
# Logit standardization's (temperature, KD weight) per pair: the authors' log names (kd,<t>,<s>,T,weight.txt).
# (2, 9) for the other pairs. (resnet110 -> resnet20's 71.48 has no log of that date: no row.)
KD_LS = {("vgg13", "vgg8"): (3.0, 9.0), ("vgg13", "MobileNetV2"): (3.0, 9.0), ("ResNet50", "MobileNetV2"): (3.0, 1.0)}
# Methods whose rows exist only for the pairs with a figure (FSP needs equal channel counts;
# ReviewKD's authors give loss weights for those pairs only; logit standardization's README those figures).
ONLY_REPORTED = ("fsp", "reviewkd", "kd_ls")
# ReviewKD's loss weight per student (the authors' CIFAR-100 script); 5 otherwise.
REVIEWKD_WEIGHT = {"ShuffleV2": 8.0, "resnet20": 0.6, "resnet32": 1.0}
INIT_EPOCHS = 30  # RepDistiller --init_epochs


def stages(arch: str) -> tuple[str, ...]:
  """RepDistiller's `feat[1:-1]`: the outputs of every stage of `arch`."""
  count = 4 if arch.startswith(("vgg", "MobileNetV2", "ResNet50")) else 3
  return tuple(f"stage{i}" for i in range(1, count + 1))


def method_terms(method: str, teacher: str = "resnet32x4", student: str = "resnet8x4") -> dict:
  """The loss terms of `method` for a pair, with the weights and features of the paper's code."""
  ce = {"ce": {"weight": 1.0}}
  s_stages, t_stages = stages(student), stages(teacher)
  pairs = {"student_features": list(s_stages), "teacher_features": list(t_stages)}
  preacts = {"student_features": [f"{n}_preact" for n in s_stages],
             "teacher_features": [f"{n}_preact" for n in t_stages]}
  last = {"student_feature": s_stages[-1], "teacher_feature": t_stages[-1]}
  ls_temperature, ls_weight = KD_LS.get((teacher, student), (2.0, 9.0))
  return {
      "kd": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}},
      "fitnet": {**ce, "hint": {"weight": 100.0, "student_feature": "stage2", "teacher_feature": "stage2"}},
      "at": {**ce, "at": {"weight": 1000.0, **pairs}},
      "sp": {**ce, "sp": {"weight": 3000.0, **last}},
      "cc": {**ce, "cc": {"weight": 0.02, "variant": "repdistiller"}},
      "vid": {**ce, "vid": {"weight": 1.0, **pairs}},
      "rkd": {**ce, "rkd": {"weight": 1.0}},
      "pkt": {**ce, "pkt": {"weight": 30000.0}},
      "ab": {**ce},  # AB's knowledge is transferred by its initialisation stage
      "ab_init": {"ab": {"weight": 1.0, **preacts}},
      "ft": {**ce, "ft": {"weight": 200.0, "factor": "repdistiller", **last}},
      "ft_init": {"ft": {"weight": 1.0, "stage": "paraphraser", **last}},
      "fsp": {**ce},  # likewise FSP
      # RepDistiller's init stage sums FSP.py's per-pair means with no factor (its -b 50 never reaches it).
      "fsp_init": {"fsp": {"weight": 1.0, "reduction": "mean", "student_features": ["stem", *s_stages],
                           "teacher_features": ["stem", *t_stages]}},
      "nst": {**ce, "nst": {"weight": 50.0, **pairs}},
      "crd": {**ce, "crd": {"weight": 0.8}},
      "crd_kd": {**ce, "kd": {"weight": 1.0, "temperature": 4.0}, "crd": {"weight": 0.8}},
      "kd_ls": {"ce": {"weight": 1.0},
                "kd": {"weight": ls_weight, "temperature": ls_temperature, "standardize": True}},
      "reviewkd": {**ce, "reviewkd": {
          "weight": REVIEWKD_WEIGHT.get(student, 5.0), "warmup_epochs": 20,
          "student_features": [*s_stages, "pre_logits"],
          "teacher_features": [f"{n}_preact" for n in t_stages] + ["pre_logits"]}},
  }[method]


def _small(student: str) -> bool:
  return student.startswith(("MobileNet", "Shuffle"))


def _recipe(student: str, epochs: int = 240):
  sgd = {"name": "sgd", "learning_rate": 0.01 if _small(student) else 0.05, "momentum": 0.9, "weight_decay": 5e-4}
  steps = {"name": "step", "boundaries": [150 * epochs / 240, 180 * epochs / 240, 210 * epochs / 240],
           "factor": 0.1}
  return dict(optimizer=sgd, schedule=steps, epochs=epochs, data={"augment": "crop_flip"})


# Each student's classifier (its top-level param module), frozen in the AB and FSP init stages: RepDistiller's
# init stage optimises only the student's feature layers (`get_feat_modules()`), not its classifier.
CLASSIFIER = {"vgg8": "classifier", "MobileNetV2": "classifier_0", "ShuffleV1": "linear", "ShuffleV2": "linear"}


def classifier(student: str) -> str:
  return CLASSIFIER.get(student, "fc")  # the CIFAR ResNets and WRNs


def _init_recipe(method: str, student: str):
  """RepDistiller's init stage: SGD at a constant rate for 30 epochs (pretrain.py)."""
  resnet_like = student.startswith(("resnet", "wrn"))
  lr = 0.01 if (method == "ft" and resnet_like) or _small(student) else 0.05
  sgd = {"name": "sgd", "learning_rate": lr, "momentum": 0.9, "weight_decay": 5e-4}
  return dict(optimizer=sgd, schedule={"name": "constant"}, epochs=INIT_EPOCHS, data={"augment": "crop_flip"})


def get_config(rows: str = ""):
  """The table; `rows`: comma-separated row names or patterns (with the rows they depend on)."""
  c = base_config()
  c.data.name = "cifar100"
  c.data.batch_size = 64
  c.data.eval_batch_size = 1000
  c.log_every_steps = 200
  c.checkpoint_every_steps = 5000
  for index, ((teacher, student), (teacher_paper, student_paper)) in enumerate(PAIRS.items()):
    c.rows[f"teacher__{teacher}"] = row(model=teacher, terms={"ce": {}}, paper=teacher_paper, **_recipe(teacher))
    c.rows[f"student__{student}"] = row(model=student, terms={"ce": {}}, paper=student_paper, **_recipe(student))
    for method, figures in PAPER.items():
      if method in ONLY_REPORTED and figures[index] is None:
        continue
      name = f"{teacher}__{student}__{method}"
      common = dict(model=student, teacher=f"teacher__{teacher}", paper=figures[index] or "")
      if method in ("ab", "fsp", "ft"):
        recipe = _init_recipe(method, student)
        freeze = ["student"] if method == "ft" else [f"student/{classifier(student)}"]
        c.rows[f"{name}_init"] = row(terms=method_terms(f"{method}_init", teacher, student),
                                     **{**common, "paper": "", **recipe,
                                        "optimizer": {**recipe["optimizer"], "freeze": freeze}})
        common["init"] = {"from": f"{name}_init"}
      c.rows[name] = row(terms=method_terms(method, teacher, student), **common, **_recipe(student))
  if rows:
    from kd_jax.train.tables import select_rows
    select_rows(c, rows)
  return c
