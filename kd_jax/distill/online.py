"""Online terms: the source is the other peers' outputs, stacked [K-1, ...]."""
from __future__ import annotations

from kd_jax import losses
from kd_jax.distill import Term, register_term


class _PeerTerm(Term):
  needs_peers = True
  loss = None

  def __init__(self, temperature: float = 1.0):
    self.temperature = temperature

  def __call__(self, student, teacher, batch, params, state, *, step):
    return type(self).loss(student.logits, teacher.logits, temperature=self.temperature), state


@register_term("dml")
class MutualLearning(_PeerTerm):
  """Deep mutual learning (Zhang et al. 2018): mean over the other peers j of KL(p_j ‖ p_k) at T."""

  loss = staticmethod(losses.mutual_learning_loss)


@register_term("codistill")
class CoDistillation(_PeerTerm):
  """Co-distillation (Anil et al. 2018): T² · KL(mean of the other peers' p ‖ p_k)."""

  loss = staticmethod(losses.codistillation_loss)
