"""Online terms: the source is the other peers' outputs, stacked [K-1, ...]."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distill import Term, register_term


@register_term("dml")
class MutualLearning(Term):
  """Deep mutual learning (Zhang et al. 2018): mean over the other peers j of KL(p_j ‖ p_k) at T."""

  needs_peers = True

  def __init__(self, temperature: float = 1.0):
    self.temperature = temperature

  def __call__(self, student, teacher, batch, params, state, *, step):
    per_peer = jax.vmap(lambda peer: losses.kd_loss(student.logits, peer, temperature=self.temperature))(
        jax.lax.stop_gradient(teacher.logits))
    return jnp.mean(per_peer, axis=0), state


@register_term("codistill")
class CoDistillation(Term):
  """Co-distillation (Anil et al. 2018): T² · KL(mean of the other peers' p ‖ p_k)."""

  needs_peers = True

  def __init__(self, temperature: float = 1.0):
    self.temperature = temperature

  def __call__(self, student, teacher, batch, params, state, *, step):
    t = self.temperature
    target = jnp.mean(jax.nn.softmax(jax.lax.stop_gradient(teacher.logits).astype(jnp.float32) / t, -1), axis=0)
    log_student = jax.nn.log_softmax(student.logits.astype(jnp.float32) / t, -1)
    kl = jnp.sum(target * (jnp.log(jnp.maximum(target, 1e-30)) - log_student), -1)
    return t * t * kl, state
