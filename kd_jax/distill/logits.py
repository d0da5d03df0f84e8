"""Terms over logits: cross-entropy, KD, logit matching, DKD, DIST."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distill.core import Term, register_term
from kd_jax.distill.temperature import Temperature


def _flag(term: str, key: str, value) -> bool:
  """A boolean option, or a clear error naming the term and key."""
  if not isinstance(value, bool):
    raise ValueError(f"loss term {term!r}: {key} must be True or False, got {value!r}")
  return value


def teacher_logits(teacher) -> jax.Array:
  return jax.lax.stop_gradient(teacher.logits)


def per_example(values: jax.Array) -> jax.Array:
  """[B] values unchanged; per-position values [B, T] (sequences) averaged over positions to [B]."""
  return values if values.ndim == 1 else values.reshape(values.shape[0], -1).mean(-1)


def over_positions(loss_fn, student_logits: jax.Array, teacher_logits: jax.Array, **kwargs) -> jax.Array:
  """`loss_fn` on logits [B, K]; per-position logits [B, T, K] go through it as [B·T, K], then `per_example`."""
  if student_logits.ndim == 2:
    return loss_fn(student_logits, teacher_logits, **kwargs)
  k = student_logits.shape[-1]
  values = loss_fn(student_logits.reshape(-1, k), teacher_logits.reshape(-1, k), **kwargs)
  return per_example(values.reshape(student_logits.shape[:-1]))


@register_term("ce")
class CrossEntropy(Term):
  """Cross-entropy with the true labels (optionally label-smoothed); per-position labels: mean over positions.

  A semi-supervised row (`labelled_examples` with unlabelled="keep") gives each batch a mask
  "labelled" [B]: the labels of the other examples are never used, and the term is the
  mean over the batch's labelled examples (`losses.labelled_mean_weights`).

  group="<prefix>": the sum of the cross-entropies of a model's members' logits
  `<prefix>_<m>_logits` (a `group` model's `member`s, a `one` model's `branch`es).
  """

  def __init__(self, label_smoothing: float = 0.0, group: str = ""):
    self.label_smoothing = label_smoothing
    self.group = group

  def _ce(self, logits, labels):
    if self.label_smoothing:
      return per_example(losses.cross_entropy(logits, labels, label_smoothing=self.label_smoothing))
    return per_example(losses.cross_entropy(logits, labels))

  def __call__(self, student, teacher, batch, params, state, *, step):
    if self.group:
      from kd_jax.distill.online import group_logits  # local: online imports this module's family

      values = sum(self._ce(z, batch["label"]) for z in group_logits(student, self.group, at_least=1))
    else:
      values = self._ce(student.logits, batch["label"])
    if "labelled" in batch:
      values = values * losses.labelled_mean_weights(batch["labelled"])
    return values, state


class _TemperatureTerm(Term):
  """A logit term whose temperature may be scheduled or learned (kd_jax.distill.temperature)."""

  def init(self, rng, student, teacher):
    return self.temperature.init(), {}

  def t(self, params, step):
    return self.temperature(params, step, self.steps_per_epoch)

  def metrics(self, params, state):
    return self.temperature.metrics(params)


@register_term("kd")
class KD(_TemperatureTerm):
  """Hinton et al. 2015: T² · KL(teacher ‖ student) at temperature T (per-position logits: mean over positions).

  standardize=True z-scores both logits first (logit standardization, Sun et al. 2024).
  """

  needs_teacher = True

  def __init__(self, temperature=4.0, standardize: bool = False):
    self.temperature, self.standardize = Temperature(temperature), _flag("kd", "standardize", standardize)

  def __call__(self, student, teacher, batch, params, state, *, step):
    return over_positions(losses.kd_loss, student.logits, teacher_logits(teacher), temperature=self.t(params, step),
                          standardize=self.standardize), state


@register_term("logit_mse")
class LogitMatching(Term):
  """Ba & Caruana 2014: regress the teacher's logits (mean squared error over classes)."""

  needs_teacher = True

  def __call__(self, student, teacher, batch, params, state, *, step):
    diff = student.logits.astype(jnp.float32) - teacher_logits(teacher).astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=-1), state


@register_term("dkd")
class DKD(_TemperatureTerm):
  """Decoupled KD (Zhao et al. 2022): α·TCKD + β·NCKD; warm it up with `warmup_epochs` (mdistiller's
  staircase with `warmup_shape="epoch"`). standardize=True: logit standardization (Sun et al. 2024)."""

  needs_teacher = True

  def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature=4.0, standardize: bool = False):
    self.alpha, self.beta, self.temperature = alpha, beta, Temperature(temperature)
    self.standardize = _flag("dkd", "standardize", standardize)

  def __call__(self, student, teacher, batch, params, state, *, step):
    return losses.dkd_loss(student.logits, teacher_logits(teacher), batch["label"], alpha=self.alpha,
                           beta=self.beta, temperature=self.t(params, step), standardize=self.standardize), state


@register_term("dist")
class DIST(_TemperatureTerm):
  """DIST (Huang et al. 2022): inter- and intra-class Pearson correlation of predictions.

  standardize=True: logit standardization (Sun et al. 2024) before the softmax."""

  needs_teacher = True

  def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature=1.0, standardize: bool = False):
    self.beta, self.gamma, self.temperature = beta, gamma, Temperature(temperature)
    self.standardize = _flag("dist", "standardize", standardize)

  def __call__(self, student, teacher, batch, params, state, *, step):
    return losses.dist_loss(student.logits, teacher_logits(teacher), beta=self.beta, gamma=self.gamma,
                            temperature=self.t(params, step), standardize=self.standardize), state


@register_term("tfkd")
class TeacherFreeKD(Term):
  """Teacher-free KD with a virtual teacher (Yuan et al. 2020, Tf-KD_reg), as in the paper's code.

  The virtual teacher puts `correct_probability` on the true class and spreads
  the rest uniformly (losses.teacher_free_kd_loss).
  """

  def __init__(self, correct_probability: float = 0.99, temperature: float = 20.0):
    self.correct_probability, self.temperature = correct_probability, temperature

  def __call__(self, student, teacher, batch, params, state, *, step):
    return losses.teacher_free_kd_loss(student.logits, batch["label"], correct_probability=self.correct_probability,
                                       temperature=self.temperature), state
