"""Losses over logits [B, K]: cross-entropy, KD, logit matching, DKD, DIST, Tf-KD, CS-KD, logit standardization.

All take any float dtype, compute in float32 and treat the teacher as a constant.
Each public function validates shapes in Python, then calls a jitted kernel, so
eager calls compile once per shape and calls under jit/vmap/grad inline it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks

def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _const(x):
  return jax.lax.stop_gradient(_f32(x))


def _zscore(z):
  # The authors' normalize(): (z − mean) / (1e-7 + std), std with Bessel's correction (torch.std's default).
  z = _f32(z)
  centred = z - jnp.mean(z, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / max(z.shape[-1] - 1, 1))
  return centred / (1e-7 + std)


def standardize_logits(logits: jax.Array) -> jax.Array:
  """Logit standardization: each row's z-score, (z − mean(z)) / (1e-7 + std(z)), over the last axis.

  Applied to both the student's and the teacher's logits before the temperature
  softmax, the student matches the teacher's logit relations, not their range.
  std is the unbiased (N − 1) estimate, as torch.std in the authors' code.

  Args:
    logits: [..., K] float, K ≥ 2.

  Returns:
    [..., K] float32 with mean 0 and unbiased std ≈ 1 per row.

  Example:
    >>> import jax.numpy as jnp
    >>> [round(float(v), 4) for v in standardize_logits(jnp.array([[1.0, 2.0, 3.0]]))[0]]
    [-1.0, 0.0, 1.0]

  References:
    Sun, Ren, Li, Wang & Cao 2024, "Logit Standardization in Knowledge Distillation", CVPR
    (code: sunshangquan/logit-standardization-KD, `normalize`).
  """
  _checks.floating(logits, what="standardize_logits", name="logits")
  if jnp.shape(logits)[-1] < 2:
    raise ValueError(f"standardize_logits: needs at least 2 classes, got logits shape {jnp.shape(logits)}")
  return _zscore(logits)


def _logit_pair(student_logits, teacher_logits, what):
  _checks.same_shape(student_logits, teacher_logits, what=what)
  _checks.rank(student_logits, (2,), what=what, name="logits [B, K]")
  _checks.floating(student_logits, what=what, name="student_logits")
  _checks.floating(teacher_logits, what=what, name="teacher_logits")


def _labels(labels, logits, what, check=False):
  _checks.labels_in_range(labels, jnp.shape(logits)[-1], what=what, check=check)
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(f"{what}: labels shape {jnp.shape(labels)} must be logits shape {jnp.shape(logits)} "
                     "without its last axis")


@jax.jit
def _nll(logits, labels):
  log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
  return -jnp.take_along_axis(log_p, jnp.expand_dims(labels, -1), axis=-1)[..., 0]


@jax.jit
def _smoothed_cross_entropy(logits, labels, label_smoothing):
  log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
  nll = -jnp.take_along_axis(log_p, jnp.expand_dims(labels, -1), axis=-1)[..., 0]
  # Smoothed target (1 − ε)·one_hot + ε/K: its cross-entropy splits into these two terms.
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                  check: bool = False) -> jax.Array:
  """Softmax cross-entropy with integer labels, optionally label-smoothed.

  Args:
    logits: [..., K] float (any float dtype).
    labels: [...] int in [0, K): checked when concrete; traced (under jit) only with `check=True`,
      else an out-of-range label silently reads a clamped or filled log-probability.
    label_smoothing: ε in [0, 1); the target is (1 − ε) · one_hot + ε / K.
    check: check traced labels with `jax.experimental.checkify` (as `kd_loss`'s `check`).

  Returns:
    [...] float32 per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))[0]), 4)  # log 4
    1.3863

  References:
    Szegedy, Vanhoucke, Ioffe, Shlens & Wojna 2016, "Rethinking the Inception Architecture for Computer
    Vision" (label smoothing, section 7).
  """
  _checks.floating(logits, what="cross_entropy", name="logits")
  _checks.rank(logits, (1, 2, 3, 4), what="cross_entropy", name="logits [..., K]")
  _labels(labels, logits, "cross_entropy", check=check)
  if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"cross_entropy: label_smoothing must lie in [0, 1), got {label_smoothing}")
  if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
    return _nll(logits, labels)  # no ε · mean(log p) term: stays finite for −inf (masked) logits
  return _smoothed_cross_entropy(logits, labels, label_smoothing)


@jax.jit(static_argnames=("standardize",))
def _kd(s, t, temperature, standardize=False):
  if standardize:
    s, t = _zscore(s), _zscore(_const(t))
  temperature = _f32(temperature)
  per_class = temperature[:, None] if temperature.ndim else temperature  # [B] -> [B, 1]: one T per row
  log_p_s = jax.nn.log_softmax(_f32(s) / per_class, axis=-1)
  log_p_t = jax.nn.log_softmax(_const(t) / per_class, axis=-1)
  p_t = jnp.exp(log_p_t)
  # Σ p_t (log p_t − log p_s) from log-probabilities: finite even where p_t underflows to 0. A class with
  # p_t = 0 (a −inf teacher logit: masked) adds 0, not 0·(−inf − log p_s) = NaN; the where keeps NaN out of
  # the gradient too.
  gap = jnp.where(p_t > 0, log_p_t - log_p_s, 0.0)
  return temperature * temperature * jnp.sum(p_t * gap, axis=-1)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float | jax.Array = 4.0,
            standardize: bool = False, check: bool = False) -> jax.Array:
  """Hinton KD: T² · Σ_k p_t,k (log p_t,k − log p_s,k), p = softmax(z / T), per example.

  standardize=True: both sides' logits are z-scored first (`standardize_logits`,
  Sun et al. 2024); the paper pairs it with a smaller T (2) and a larger weight (9).

  Args:
    student_logits: [B, K] float (any float dtype). −inf marks a masked class (see below).
    teacher_logits: [B, K] float, a constant (no gradient flows into it). −inf marks a masked class.
    temperature: T > 0: a scalar or per-example [B] (a Python number or an array, traced or not, e.g. a
      learned temperature); any other shape ([B, 1] included) is an error.
    standardize: z-score each row of both logits before the softmax (logit standardization; not with
      masked −inf classes).
    check: also check traced values (under jit) with `jax.experimental.checkify`: T > 0, and no NaN or
      +inf in the logits. Eagerly a failed check raises at once; under jit, wrap the function in
      `checkify.checkify` and throw its error (unwrapped, JAX refuses to trace the check).

  Returns:
    [B] float32.

  Checked always: shapes, dtypes, the temperature's shape, and T > 0 where T is concrete (not traced).
  Only with `check=True`: a traced T (a traced T = 0 gives NaN), NaN / +inf logits (else they propagate
  into the loss, as IEEE arithmetic does).
  Masked classes: a class whose teacher logit is −inf (p_t = 0) adds 0 to the sum, with finite values and
  gradients (whatever the student's logit there, −inf included). A class the student masks (−inf) but the
  teacher does not gives +inf: the student rules out what the teacher predicts. A row whose teacher logits
  are all −inf has no distribution (NaN).

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(kd_loss(z, z)[0])
    0.0
    >>> round(float(kd_loss(z, jnp.array([[3.0, 2.0, 1.0]]), temperature=1.0)[0]), 4)
    1.1504

  References:
    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
    Sun, Ren, Li, Wang & Cao 2024, "Logit Standardization in Knowledge Distillation", CVPR (standardize).
  """
  _logit_pair(student_logits, teacher_logits, "kd_loss")
  _checks.scalar_or_batch(temperature, jnp.shape(student_logits)[0], what="kd_loss", name="temperature")
  _checks.positive(temperature, name="kd_loss: temperature", check=check)
  _checks.not_nan(student_logits, what="kd_loss", name="student_logits", check=check)
  _checks.not_nan(teacher_logits, what="kd_loss", name="teacher_logits", check=check)
  return _kd(student_logits, teacher_logits, temperature, standardize=bool(standardize))


@jax.jit
def _logit_mse(s, t):
  return jnp.mean(jnp.square(_f32(s) - _const(t)), axis=-1)


def logit_mse_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Logit matching (mimic learning): mean over classes of (z_s − z_t)², per example.

  Args:
    student_logits: [B, K] float.
    teacher_logits: [B, K] float, a constant.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(logit_mse_loss(jnp.array([[1.0, 3.0]]), jnp.array([[0.0, 0.0]]))[0])
    5.0

  References:
    Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?", NeurIPS.
  """
  _logit_pair(student_logits, teacher_logits, "logit_mse_loss")
  return _logit_mse(student_logits, teacher_logits)


@jax.jit(static_argnames=("standardize",))
def _dkd(s, t, labels, alpha, beta, temperature, standardize=False):
  if standardize:
    s, t = _zscore(s), _zscore(_const(t))
  target = jax.nn.one_hot(labels, s.shape[-1], dtype=bool)

  def parts(z):
    z = z / temperature
    lse_all = jax.nn.logsumexp(z, axis=-1)
    masked = jnp.where(target, -jnp.inf, z)
    lse_rest = jax.nn.logsumexp(masked, axis=-1)
    log_target = jnp.sum(jnp.where(target, z, 0.0), axis=-1) - lse_all  # log p_target
    log_rest = lse_rest - lse_all  # log(1 − p_target), without the cancellation of 1 − p
    log_q = jnp.where(target, 0.0, masked - jnp.expand_dims(lse_rest, -1))  # log-softmax over non-targets
    return log_target, log_rest, log_q

  s_target, s_rest, s_q = parts(_f32(s))
  t_target, t_rest, t_q = parts(_const(t))
  tckd = jnp.exp(t_target) * (t_target - s_target) + jnp.exp(t_rest) * (t_rest - s_rest)
  nckd = jnp.sum(jnp.where(target, 0.0, jnp.exp(t_q) * (t_q - s_q)), axis=-1)
  return temperature * temperature * (alpha * tckd + beta * nckd)


def dkd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0, standardize: bool = False) -> jax.Array:
  """Decoupled KD: α · T² · KL(b_t ‖ b_s) + β · T² · KL(q_t ‖ q_s), per example.

  With p = softmax(z / T): b = (p_target, 1 − p_target) is the binary
  target-vs-rest distribution (TCKD) and q = softmax of z / T over the
  non-target classes only (NCKD). Computed from log-sum-exps, so 1 − p_target
  does not cancel to 0 for confident logits.

  Args:
    student_logits: [B, K] float, K ≥ 2.
    teacher_logits: [B, K] float, a constant.
    labels: [B] int in [0, K).
    alpha: weight of TCKD.
    beta: weight of NCKD (8 for CIFAR-100 in the paper; mdistiller also warms the whole loss up over
      the first epochs, which is the caller's schedule).
    temperature: T > 0.
    standardize: z-score each row of both logits first (`standardize_logits`, Sun et al. 2024).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[2.0, 1.0, 0.0]])
    >>> float(dkd_loss(z, z, jnp.array([0]))[0])
    0.0

  References:
    Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation", CVPR.
    Sun, Ren, Li, Wang & Cao 2024, "Logit Standardization in Knowledge Distillation", CVPR (standardize).
  """
  _checks.positive(temperature, name="temperature")
  _logit_pair(student_logits, teacher_logits, "dkd_loss")
  if jnp.shape(student_logits)[-1] < 2:
    raise ValueError(f"dkd_loss: needs at least 2 classes, got logits shape {jnp.shape(student_logits)}")
  _labels(labels, student_logits, "dkd_loss")
  return _dkd(student_logits, teacher_logits, labels, alpha, beta, temperature, standardize=bool(standardize))


def _pearson(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
  """Pearson correlation along `axis`; 0 (not NaN) when either side has zero variance."""
  a = _checks.l2_normalize(a - jnp.mean(a, axis=axis, keepdims=True), axis=axis)
  b = _checks.l2_normalize(b - jnp.mean(b, axis=axis, keepdims=True), axis=axis)
  return jnp.sum(a * b, axis=axis)


@jax.jit(static_argnames=("standardize",))
def _dist(s, t, beta, gamma, temperature, standardize=False):
  if standardize:
    s, t = _zscore(s), _zscore(_const(t))
  y_s = jax.nn.softmax(_f32(s) / temperature, axis=-1)
  y_t = jax.nn.softmax(_const(t) / temperature, axis=-1)
  inter = 1.0 - jnp.mean(_pearson(y_s, y_t, axis=1))
  intra = 1.0 - jnp.mean(_pearson(y_s, y_t, axis=0))
  return temperature * temperature * (beta * inter + gamma * intra)


def dist_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0, standardize: bool = False) -> jax.Array:
  """DIST: τ² · (β · (1 − mean_i ρ(y_s[i,:], y_t[i,:])) + γ · (1 − mean_k ρ(y_s[:,k], y_t[:,k]))).

  y = softmax(z / τ) and ρ the Pearson correlation: inter-class relations of each
  example (rows) and intra-class relations over the batch (columns). A constant
  row or column (zero variance) has correlation 0, not NaN.

  Args:
    student_logits: [B, K] float.
    teacher_logits: [B, K] float, a constant.
    beta: weight of the inter-class term.
    gamma: weight of the intra-class term.
    temperature: τ > 0.
    standardize: z-score each row of both logits first (`standardize_logits`, Sun et al. 2024).

  Returns:
    [] float32 (a relation over the batch).

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    >>> abs(float(dist_loss(z, z))) < 1e-6
    True

  References:
    Huang, You, Wang, Qian & Xu 2022, "Knowledge Distillation from A Stronger Teacher", NeurIPS.
  """
  _checks.positive(temperature, name="temperature")
  _logit_pair(student_logits, teacher_logits, "dist_loss")
  return _dist(student_logits, teacher_logits, beta, gamma, temperature, standardize=bool(standardize))


def virtual_teacher_logits(labels: jax.Array, num_classes: int, *, correct_probability: float = 0.9) -> jax.Array:
  """Log of Tf-KD's virtual teacher distribution: `correct_probability` on the label, the rest uniform.

  softmax of these logits is the virtual distribution itself (use them with
  `kd_loss` for a temperature-sharpened/-flattened variant). `teacher_free_kd_loss`
  is Tf-KD_reg as the paper's code computes it.

  Args:
    labels: [B] int in [0, num_classes).
    num_classes: K ≥ 2.
    correct_probability: in (0, 1).

  Returns:
    [B, K] float32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> p = jax.nn.softmax(virtual_teacher_logits(jnp.array([1]), 3))
    >>> [round(float(x), 3) for x in p[0]]
    [0.05, 0.9, 0.05]

  References:
    Yuan, Tay, Li, Wang & Feng 2020, "Revisiting Knowledge Distillation via Label Smoothing
    Regularization", CVPR.
  """
  return jnp.log(_virtual_teacher(labels, num_classes, correct_probability, "virtual_teacher_logits"))


def _virtual_teacher(labels, num_classes, correct_probability, what):
  if not 0.0 < correct_probability < 1.0:
    raise ValueError(f"{what}: correct_probability must lie in (0, 1), got {correct_probability}")
  if num_classes < 2:
    raise ValueError(f"{what}: needs at least 2 classes, got {num_classes}")
  _checks.labels_in_range(labels, num_classes, what=what)
  off = (1.0 - correct_probability) / (num_classes - 1)
  return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), correct_probability, off)


@jax.jit
def _tfkd(s, virtual, temperature):
  log_p_t = jax.nn.log_softmax(virtual / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(_f32(s), axis=-1)
  return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def teacher_free_kd_loss(student_logits: jax.Array, labels: jax.Array, *, correct_probability: float = 0.99,
                         temperature: float = 20.0) -> jax.Array:
  """Teacher-free KD (Tf-KD_reg): KL(softmax(u / T) ‖ softmax(z_s)) per example, u the virtual teacher.

  u puts `correct_probability` on the label and spreads the rest uniformly; as in
  the paper's code, softmax is applied to the probabilities u / T (not to log u),
  and the student is not softened. The code's objective is
  (1 − α) · CE + α · multiplier · mean(this) / K (PyTorch's KLDivLoss() averages
  over classes too), e.g. α = 0.1, T = 20, multiplier = 100 for ResNet-18.

  Args:
    student_logits: [B, K] float.
    labels: [B] int in [0, K).
    correct_probability: u's mass on the label, in (0, 1).
    temperature: T > 0.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = teacher_free_kd_loss(jnp.zeros((1, 3)), jnp.array([0]))
    >>> loss.shape, float(loss[0]) > 0
    ((1,), True)

  References:
    Yuan, Tay, Li, Wang & Feng 2020, "Revisiting Knowledge Distillation via Label Smoothing
    Regularization", CVPR.
  """
  _checks.positive(temperature, name="temperature")
  _checks.floating(student_logits, what="teacher_free_kd_loss", name="student_logits")
  _checks.rank(student_logits, (2,), what="teacher_free_kd_loss", name="logits [B, K]")
  _labels(labels, student_logits, "teacher_free_kd_loss")
  virtual = _virtual_teacher(labels, jnp.shape(student_logits)[-1], correct_probability, "teacher_free_kd_loss")
  return _tfkd(student_logits, virtual, temperature)


def class_wise_kd_loss(logits: jax.Array, partner_logits: jax.Array, *, temperature: float = 4.0) -> jax.Array:
  """Class-wise self-KD: T² · KL(softmax(z' / T) ‖ softmax(z / T)), z' the same network's other same-class example.

  The caller pairs each example with another example of the same class (the
  paper's sampler draws a second image per class; within a batch, pick a random
  other member of the class) and zeroes the rows that have no partner; the
  partner's logits are a constant. The paper uses T = 4 and weight λ = 1 next to
  the cross-entropy.

  Args:
    logits: [B, K] float, the network's logits for the examples.
    partner_logits: [B, K] float, its logits for each example's partner (a constant).
    temperature: T > 0.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> [round(float(v), 4) for v in class_wise_kd_loss(z, z[::-1], temperature=1.0)]
    [0.4621, 0.4621]

  References:
    Yun, Park, Lee & Shin 2020, "Regularizing Class-wise Predictions via Self-knowledge Distillation", CVPR.
  """
  _checks.positive(temperature, name="temperature")
  _checks.same_shape(logits, partner_logits, what="class_wise_kd_loss", names=("logits", "partner_logits"))
  _checks.rank(logits, (2,), what="class_wise_kd_loss", name="logits [B, K]")
  _checks.floating(logits, what="class_wise_kd_loss", name="logits")
  _checks.floating(partner_logits, what="class_wise_kd_loss", name="partner_logits")
  return _kd(logits, partner_logits, temperature)


@jax.jit
def _residual_error(a, t, s):
  return jnp.mean(jnp.square(_f32(a) - _const(_f32(t) - _f32(s))), axis=-1)


def residual_error_loss(assistant_logits: jax.Array, teacher_logits: jax.Array,
                        student_logits: jax.Array) -> jax.Array:
  """Residual-error regression: mean over classes of (a − sg(z_t − z_s))², per example.

  The assistant learns what the student still misses of the teacher, so that
  student + assistant approximates the teacher. The target z_t − z_s is a
  constant: no gradient reaches the student (or the teacher) through this loss.

  Args:
    assistant_logits: [B, K] float (the assistant's output a).
    teacher_logits: [B, K] float z_t.
    student_logits: [B, K] float z_s.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(residual_error_loss(jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 1.0]]), jnp.array([[1.0, 1.0]]))[0])
    0.5

  References:
    Gao, Wang, Wu & Zhou 2020, "Residual Error Based Knowledge Distillation", Neurocomputing.
  """
  _logit_pair(assistant_logits, teacher_logits, "residual_error_loss")
  _checks.same_shape(student_logits, teacher_logits, what="residual_error_loss")
  _checks.floating(student_logits, what="residual_error_loss", name="student_logits")
  return _residual_error(assistant_logits, teacher_logits, student_logits)


@jax.jit
def _soft_pseudo_label(s, t, temperature):
  target = jax.nn.softmax(_const(t) / temperature, axis=-1)
  return -jnp.sum(target * jax.nn.log_softmax(_f32(s), axis=-1), axis=-1)


def pseudo_label_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, hard: bool = False,
                      temperature: float = 1.0) -> jax.Array:
  """Self-training on a teacher's pseudo-labels: cross-entropy of the student with the teacher's prediction.

  Soft: −Σ_k softmax(z_t / T)_k · log softmax(z_s)_k (the student at temperature 1);
  hard: −log softmax(z_s)[argmax z_t]. Noisy Student found soft and hard
  pseudo-labels about equally good on ImageNet (soft better out of domain).

  Args:
    student_logits: [B, K] float.
    teacher_logits: [B, K] float, a constant.
    hard: the teacher's argmax as a one-hot label instead of its distribution.
    temperature: T > 0 of the teacher's distribution (soft only).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(pseudo_label_loss(jnp.zeros((1, 4)), jnp.array([[0.0, 9.0, 0.0, 0.0]]), hard=True)[0]), 4)
    1.3863

  References:
    Xie, Luong, Hovy & Le 2020, "Self-training with Noisy Student improves ImageNet classification", CVPR.
  """
  _logit_pair(student_logits, teacher_logits, "pseudo_label_loss")
  if hard:
    return _nll(student_logits, jnp.argmax(_const(teacher_logits), axis=-1))
  _checks.positive(temperature, name="pseudo_label_loss: temperature")
  return _soft_pseudo_label(student_logits, teacher_logits, temperature)


def labelled_mean_weights(labelled: jax.Array) -> jax.Array:
  """Per-example weights [B] that turn a batch mean into the mean over the labelled examples.

  w_i = m_i · B / max(Σ_j m_j, 1) for a mask m [B] (1: labelled); mean(w · loss) is then
  Σ_i m_i loss_i / Σ_i m_i, and 0 for a batch without labelled examples.

  Args:
    labelled: [B] float or bool mask, 1 on the labelled examples.

  Returns:
    [B] float32 weights.

  Example:
    >>> import jax.numpy as jnp
    >>> labelled_mean_weights(jnp.array([1.0, 0.0, 1.0, 0.0])).tolist()
    [2.0, 0.0, 2.0, 0.0]

  References:
    Xie, Luong, Hovy & Le 2020, "Self-training with Noisy Student improves ImageNet classification", CVPR
    (the labelled examples' cross-entropy next to the pseudo-labelled ones').
  """
  _checks.rank(labelled, (1,), what="labelled_mean_weights", name="labelled [B]")
  m = _f32(labelled)
  return m * m.shape[0] / jnp.maximum(jnp.sum(m), 1.0)
