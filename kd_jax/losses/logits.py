"""Losses over logits [B, K]: cross-entropy, KD, logit matching, DKD, DIST, teacher-free KD.

All take any float dtype, compute in float32, and treat the teacher as a constant.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy with integer labels, optionally label-smoothed.

  Args:
    logits: [..., K] float.
    labels: [...] int in [0, K).
    label_smoothing: ε; the target is (1 − ε) · one_hot + ε / K (Szegedy et al. 2016).

  Returns:
    [...] float32 per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> float(cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))[0])  # log 4
    1.386...

  References:
    Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision" (label smoothing).
  """
  logits = _checks.as_f32(logits)
  _checks.labels_in_range(labels, logits.shape[-1], what="cross_entropy")
  if jnp.shape(labels) != logits.shape[:-1]:
    raise ValueError(f"cross_entropy: labels shape {jnp.shape(labels)} must be logits shape {logits.shape} "
                     "without its last axis")
  log_p = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  if not label_smoothing:
    return nll
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)


def _logit_pair(student_logits, teacher_logits, what):
  _checks.same_shape(student_logits, teacher_logits, what=what)
  _checks.rank(student_logits, (2,), what=what, name="logits [B, K]")
  return _checks.as_f32(student_logits), jax.lax.stop_gradient(_checks.as_f32(teacher_logits))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 4.0) -> jax.Array:
  """Hinton KD: T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) per example.

  Args:
    student_logits: [B, K] float.
    teacher_logits: [B, K] float (a constant: no gradient flows into it).
    temperature: T > 0 (a Python number or a traced scalar).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(kd_loss(z, z)[0])
    0.0

  References:
    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".
  """
  _checks.positive(temperature, name="temperature")
  s, t = _logit_pair(student_logits, teacher_logits, "kd_loss")
  log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
  return temperature * temperature * jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def logit_mse_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Logit matching: mean over classes of (z_s − z_t)².

  Args:
    student_logits, teacher_logits: [B, K] float.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(logit_mse_loss(jnp.array([[1.0, 3.0]]), jnp.array([[0.0, 0.0]]))[0])
    5.0

  References:
    Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?".
  """
  s, t = _logit_pair(student_logits, teacher_logits, "logit_mse_loss")
  return jnp.mean(jnp.square(s - t), axis=-1)


def dkd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> jax.Array:
  """Decoupled KD: α · T² · KL(b_t ‖ b_s) + β · T² · KL(q_t ‖ q_s).

  With p = softmax(z / T): b = (p_target, 1 − p_target) is the binary target-vs-rest
  distribution (TCKD) and q the softmax of z / T over the non-target classes only
  (NCKD).

  Args:
    student_logits, teacher_logits: [B, K] float.
    labels: [B] int in [0, K).
    alpha, beta: weights of TCKD and NCKD.
    temperature: T > 0.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[2.0, 1.0, 0.0]])
    >>> float(dkd_loss(z, z, jnp.array([0]))[0])
    0.0

  References:
    Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation".
  """
  _checks.positive(temperature, name="temperature")
  s, t = _logit_pair(student_logits, teacher_logits, "dkd_loss")
  _checks.labels_in_range(labels, s.shape[-1], what="dkd_loss")
  if jnp.shape(labels) != s.shape[:1]:
    raise ValueError(f"dkd_loss: labels shape {jnp.shape(labels)} must be ({s.shape[0]},)")
  target = jax.nn.one_hot(labels, s.shape[-1], dtype=bool)

  def parts(z):
    z = z / temperature
    lse_all = jax.nn.logsumexp(z, axis=-1)
    masked = jnp.where(target, -jnp.inf, z)
    lse_rest = jax.nn.logsumexp(masked, axis=-1)
    log_target = jnp.sum(jnp.where(target, z, 0.0), axis=-1) - lse_all  # log p_target
    log_rest = lse_rest - lse_all  # log(1 − p_target)
    log_q = jnp.where(target, 0.0, masked - lse_rest[:, None])  # log softmax over non-target classes
    return log_target, log_rest, log_q

  s_target, s_rest, s_q = parts(s)
  t_target, t_rest, t_q = parts(t)
  tckd = jnp.exp(t_target) * (t_target - s_target) + jnp.exp(t_rest) * (t_rest - s_rest)
  nckd = jnp.sum(jnp.where(target, 0.0, jnp.exp(t_q) * (t_q - s_q)), axis=-1)
  return temperature * temperature * (alpha * tckd + beta * nckd)


def _pearson(a: jax.Array, b: jax.Array, axis: int, eps: float = 1e-8) -> jax.Array:
  a = a - jnp.mean(a, axis=axis, keepdims=True)
  b = b - jnp.mean(b, axis=axis, keepdims=True)
  num = jnp.sum(a * b, axis=axis)
  den = jnp.sqrt(jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis) + eps)
  return num / (den + eps)


def dist_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> jax.Array:
  """DIST: τ² · (β · (1 − mean_i ρ(y_s[i], y_t[i])) + γ · (1 − mean_k ρ(y_s[:, k], y_t[:, k]))).

  y = softmax(z / τ) and ρ the Pearson correlation: inter-class relations of each
  example, and intra-class relations over the batch. A constant row or column
  (zero variance) has correlation 0, not NaN.

  Args:
    student_logits, teacher_logits: [B, K] float.

  Returns:
    [] float32 (a relation over the batch).

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    >>> round(float(dist_loss(z, z)), 4)
    0.0

  References:
    Huang, You, Wang, Qian & Xu 2022, "Knowledge Distillation from A Stronger Teacher".
  """
  _checks.positive(temperature, name="temperature")
  s, t = _logit_pair(student_logits, teacher_logits, "dist_loss")
  y_s, y_t = jax.nn.softmax(s / temperature, axis=-1), jax.nn.softmax(t / temperature, axis=-1)
  inter = 1.0 - jnp.mean(_pearson(y_s, y_t, axis=1))
  intra = 1.0 - jnp.mean(_pearson(y_s, y_t, axis=0))
  return temperature * temperature * (beta * inter + gamma * intra)


def virtual_teacher_logits(labels: jax.Array, num_classes: int, *, correct_probability: float = 0.9) -> jax.Array:
  """Tf-KD's virtual teacher as logits [B, K]: `correct_probability` on the label, the rest uniform.

  Use with `kd_loss` for teacher-free KD (Tf-KD_reg); softmax(logits / T)
  flattens the virtual distribution as the paper's code does.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> p = jax.nn.softmax(virtual_teacher_logits(jnp.array([1]), 3))
    >>> [round(float(x), 3) for x in p[0]]
    [0.05, 0.9, 0.05]

  References:
    Yuan, Tay, Li, Wang & Feng 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization".
  """
  if not 0.0 < correct_probability < 1.0:
    raise ValueError(f"correct_probability must lie in (0, 1), got {correct_probability}")
  off = (1.0 - correct_probability) / (num_classes - 1)
  return jnp.log(jnp.where(jax.nn.one_hot(labels, num_classes) > 0, correct_probability, off))
