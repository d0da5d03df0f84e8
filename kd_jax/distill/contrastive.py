"""CRD as a term: embedding heads as params, the memory bank as sharded term state."""
from __future__ import annotations

import jax

from kd_jax import losses
from kd_jax.distill.core import Term, feature, register_term
from kd_jax.distill.features import init_connector
from kd_jax.models import connectors


@register_term("crd")
class CRD(Term):
  """Contrastive representation distillation (Tian et al. 2020).

  Both networks' pooled features go through a linear embedding head to `dim`
  (L2-normalised; both heads are trained, the teacher network stays frozen);
  NCE against `num_negatives` other examples drawn uniformly from the training
  set each step (the paper's code also offers class-aware drawing), with the bank
  [N, dim] of each side in the term state, its rows split over the mesh axis
  "data". The batch must carry each example's dataset index ("index").
  """

  needs_teacher = True
  shard_state_rows = True

  def __init__(self, student_feature: str = "pre_logits", teacher_feature: str = "pre_logits", dim: int = 128,
               num_negatives: int = 16384, temperature: float = 0.07, momentum: float = 0.5):
    self.student_feature, self.teacher_feature = student_feature, teacher_feature
    self.embed = connectors.Embed(dim)
    self.dim, self.num_negatives, self.temperature, self.momentum = dim, num_negatives, temperature, momentum

  def init(self, rng, student, teacher):
    if self.num_train < 1:
      raise ValueError("the crd term needs the training-set size (Objective(num_train=...))")
    s_rng, t_rng, bank_rng = jax.random.split(rng, 3)
    params = {"student": init_connector(self.embed, s_rng, feature(student, self.student_feature, who="student"))[0],
              "teacher": init_connector(self.embed, t_rng, feature(teacher, self.teacher_feature, who="teacher"))[0]}
    return params, losses.crd_init_bank(bank_rng, self.num_train, self.dim)

  def __call__(self, student, teacher, batch, params, state, *, step):
    s = self.embed.apply({"params": params["student"]}, feature(student, self.student_feature, who="student"))
    t = self.embed.apply({"params": params["teacher"]},
                         jax.lax.stop_gradient(feature(teacher, self.teacher_feature, who="teacher")))
    negatives = losses.crd_sample_negatives(jax.random.fold_in(batch["rng"], 7), batch["index"], self.num_train,
                                            self.num_negatives)
    loss, bank = losses.crd_loss(s, t, batch["index"], negatives, state, temperature=self.temperature,
                                 momentum=self.momentum)
    return loss, bank
