"""Terms of the teacher–student architecture methods: residual-error KD's assistant, Noisy Student's pseudo-labels."""
from __future__ import annotations

from kd_jax import losses
from kd_jax.distill.core import Term, feature, register_term
from kd_jax.distill.logits import teacher_logits


@register_term("residual")
class ResidualError(Term):
  """Residual-error KD (Gao, Wang, Wu & Zhou 2020, "Residual Error Based Knowledge Distillation").

  The assistant regresses the residual the student leaves: mean_k (a − sg(z_t − z_s))²
  (`losses.residual_error_loss`), with a = the feature `assistant_logits` and z_s =
  `student_logits` of a `residual` model (kd_jax/models/residual.py), whose logits
  are z_s + a. The target is a constant, so the term trains the assistant only.
  """

  needs_teacher = True

  def __init__(self, student_feature: str = "student_logits", assistant_feature: str = "assistant_logits"):
    self.student_feature, self.assistant_feature = student_feature, assistant_feature

  def __call__(self, student, teacher, batch, params, state, *, step):
    assistant = feature(student, self.assistant_feature, who="student (a `residual` model with output='sum')")
    alone = feature(student, self.student_feature, who="student (a `residual` model)")
    return losses.residual_error_loss(assistant, teacher_logits(teacher), alone), state


@register_term("pseudo_label")
class PseudoLabel(Term):
  """Noisy Student (Xie, Luong, Hovy & Le 2020): cross-entropy with the teacher's pseudo-labels on every example.

  Soft (the teacher's softmax at `temperature`) or `hard` (its argmax); see
  `losses.pseudo_label_loss`. With `labelled_examples` and unlabelled="keep", the
  row's "ce" term uses the labelled examples only and this term all of them.
  """

  needs_teacher = True

  def __init__(self, hard: bool = False, temperature: float = 1.0):
    if not temperature > 0:
      raise ValueError(f"pseudo_label: temperature must be > 0, got {temperature}")
    self.hard, self.temperature = bool(hard), float(temperature)

  def __call__(self, student, teacher, batch, params, state, *, step):
    return losses.pseudo_label_loss(student.logits, teacher_logits(teacher), hard=self.hard,
                                    temperature=self.temperature), state
