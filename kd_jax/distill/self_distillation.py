"""Self-distillation terms: a network teaches its own early exits (BYOT)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distill.core import Term, feature, register_term


@register_term("byot")
class BeYourOwnTeacher(Term):
  """Be Your Own Teacher (Zhang et al. 2019) on a `with_exits` model.

  For each exit k: (1 − α) · CE(exit_k) + α · T² · KL(deepest ‖ exit_k) + β · ‖exit_k − deepest feature‖²,
  the deepest logits and `pre_logits` acting as the (stop-gradient) teacher. The
  deepest classifier's own cross-entropy is the separate `ce` term.
  """

  def __init__(self, stages: Sequence[str] = ("stage1", "stage2"), alpha: float = 0.3, beta: float = 0.03,
               temperature: float = 3.0):
    self.stages, self.alpha, self.beta, self.temperature = tuple(stages), alpha, beta, temperature

  def __call__(self, student, teacher, batch, params, state, *, step):
    deepest_logits = jax.lax.stop_gradient(student.logits)
    deepest_feature = jax.lax.stop_gradient(feature(student, "pre_logits", who="student"))
    total = 0.0
    for stage in self.stages:
      exit_logits = feature(student, f"exit_{stage}_logits", who="student (a with_exits model)")
      exit_feature = feature(student, f"exit_{stage}", who="student (a with_exits model)")
      total = total + (1.0 - self.alpha) * losses.cross_entropy(exit_logits, batch["label"])
      total = total + self.alpha * losses.kd_loss(exit_logits, deepest_logits, temperature=self.temperature)
      total = total + self.beta * jnp.sum(jnp.square(exit_feature - deepest_feature), axis=-1)
    return total, state


@register_term("cskd")
class ClassWiseSelfKD(Term):
  """Class-wise self-KD (Yun et al. 2020): match the predictions of two examples of the same class.

  Each example is paired with another example of its class in the same batch
  (chosen at random each step); the term is T² · KL(p(partner) ‖ p(example)) with
  the partner's prediction as a constant. The authors' `PairBatchSampler`
  (alinlab/cs-kd) draws a partner from the whole training set for *every* example;
  within a batch some classes have a single member (at batch 128 with 100 classes
  about 28% of the rows), so those rows get 0 and, with mean_over="paired" (default),
  the others are scaled by B / (rows with a partner): the batch mean is then the mean
  over the paired rows, the reference's per-example mean in expectation, instead of
  ~0.72x it (mean_over="batch"). Pairing within the batch keeps the data order a pure
  function of (seed, step) and costs no second forward pass. standardize=True: logit
  standardization (Sun et al. 2024) of the logits first.
  """

  def __init__(self, temperature: float = 4.0, mean_over: str = "paired", standardize: bool = False):
    if mean_over not in ("paired", "batch"):
      raise ValueError(f"cskd: mean_over must be 'paired' or 'batch', got {mean_over!r}")
    if not isinstance(standardize, bool):
      raise ValueError(f"cskd: standardize must be True or False, got {standardize!r}")
    self.temperature, self.mean_over, self.standardize = temperature, mean_over, standardize

  def __call__(self, student, teacher, batch, params, state, *, step):
    labels = batch["label"]
    b = labels.shape[0]
    same = (labels[:, None] == labels[None, :]) & ~jnp.eye(b, dtype=bool)
    score = jax.random.uniform(jax.random.fold_in(batch["rng"], 17), (b, b))
    partner = jnp.argmax(jnp.where(same, score, -1.0), axis=1)
    has_partner = jnp.any(same, axis=1)
    logits = losses.standardize_logits(student.logits) if self.standardize else student.logits
    kl = losses.class_wise_kd_loss(logits, logits[partner], temperature=self.temperature)
    values = jnp.where(has_partner, kl, 0.0)
    if self.mean_over == "paired":
      values = values * losses.labelled_mean_weights(has_partner)
    return values, state


@register_term("multi_exit")
class MultiExitDistillation(Term):
  """Distillation-based training of multi-exit networks (Phuong & Lampert 2019) on a `with_exits` model.

  For the early exits z_1..z_{M-1} (`stages`, shallowest first) and the final
  exit z_M (the model's logits), per example (`losses.multi_exit_kd_loss`):

      Σ_{m < M} (1 − α) · CE(z_m, y) + α · T² · KL(q_m ‖ softmax(z_m / T)),

  q_m the final exit's softmax(z_M / T) (`teachers="final"`) or the mean of the
  KLs from every deeper exit (`teachers="deeper"`), the targets stop-gradient.
  The final exit's cross-entropy is the separate `ce` term: the authors'
  `DistillationBasedLoss` (mary-phuong/multiexit-distillation, main.py) weights it
  (1 − C) = 1 − α, so give `ce` the weight 1 − α to match (0.5 with their C = 0.5).
  Their code uses the cross-entropy against q_m where this uses the KL: same
  gradients, values lower by q_m's entropy.

  adaptive_temperature=True: their adaptive T, kept in the term's state. T
  starts at `temperature` (1 in their code) and after every step is multiplied by
  `temperature_factor` (1.05) when the final exit's mean max-probability at T on
  the batch exceeds `max_probability` (0.5); logged as `temperature/multi_exit`.
  """

  def __init__(self, stages: Sequence[str] = ("stage1", "stage2"), temperature: float = 4.0, alpha: float = 0.5,
               teachers: str = "final", adaptive_temperature: bool = False, max_probability: float = 0.5,
               temperature_factor: float = 1.05):
    if teachers not in losses.self_distillation.TEACHERS:
      raise ValueError(f"multi_exit: teachers must be one of {losses.self_distillation.TEACHERS}, got {teachers!r}")
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"multi_exit: alpha must lie in [0, 1], got {alpha}")
    if not stages:
      raise ValueError("multi_exit: stages must name at least one early exit (e.g. ['stage1'])")
    if not isinstance(adaptive_temperature, bool):
      raise ValueError(f"multi_exit: adaptive_temperature must be True or False, got {adaptive_temperature!r}")
    if not 0.0 < max_probability < 1.0:
      raise ValueError(f"multi_exit: max_probability must lie in (0, 1), got {max_probability}")
    if temperature_factor < 1.0:
      raise ValueError(f"multi_exit: temperature_factor must be >= 1, got {temperature_factor}")
    self.stages, self.temperature, self.alpha, self.teachers = tuple(stages), temperature, alpha, teachers
    self.adaptive = adaptive_temperature
    self.max_probability, self.temperature_factor = max_probability, temperature_factor

  def init(self, rng, student, teacher):
    return {}, ({"temperature": jnp.asarray(self.temperature, jnp.float32)} if self.adaptive else {})

  def metrics(self, params, state):
    return {"temperature": state["temperature"]} if self.adaptive and state else {}

  def __call__(self, student, teacher, batch, params, state, *, step):
    exits = [feature(student, f"exit_{stage}_logits", who="student (a with_exits model)") for stage in self.stages]
    temperature = state["temperature"] if self.adaptive else self.temperature
    values = losses.multi_exit_kd_loss(exits + [student.logits], batch["label"], temperature=temperature,
                                       alpha=self.alpha, teachers=self.teachers)
    if self.adaptive:
      final = jax.nn.softmax(jax.lax.stop_gradient(student.logits).astype(jnp.float32) / temperature, axis=-1)
      confident = jnp.mean(jnp.max(final, axis=-1)) > self.max_probability
      state = {"temperature": jnp.where(confident, temperature * self.temperature_factor, temperature)}
    return values, state


@register_term("sla")
class SelfSupervisedLabelAugmentation(Term):
  """SLA (Lee, Hwang & Shin 2020) on an `sla` model (kd_jax.models.sla), per example:

      (1 / M) Σ_j CE(joint_j, y · M + j)  [+ T² · KL(softmax(z_agg / T) ‖ softmax(z_sd / T)) + β · CE(z_sd, y)],

  the joint classifier's cross-entropy over the (class, rotation) labels
  (`losses.sla_loss`), and with `self_distillation` (SLA+SD) the SD head z_sd
  matching the aggregated logits z_agg (`losses.sla_aggregated_logits`, a
  constant) plus its own cross-entropy (β = `sd_ce_weight`; T = 1 in the
  paper). The term includes every cross-entropy: use it alone, without `ce`.
  """

  def __init__(self, self_distillation: bool = True, temperature: float = 1.0, sd_ce_weight: float = 1.0):
    self.self_distillation, self.temperature, self.sd_ce_weight = bool(self_distillation), temperature, sd_ce_weight

  def __call__(self, student, teacher, batch, params, state, *, step):
    who = "student (an `sla` model)"
    joint = feature(student, "joint_logits", who=who)
    loss = losses.sla_loss(joint, batch["label"])
    if self.self_distillation:
      sd = feature(student, "sd_logits", who=who)
      target = jax.lax.stop_gradient(feature(student, "aggregated_logits", who=who))
      loss = loss + losses.kd_loss(sd, target, temperature=self.temperature)
      loss = loss + self.sd_ce_weight * losses.cross_entropy(sd, batch["label"])
    return loss, state
