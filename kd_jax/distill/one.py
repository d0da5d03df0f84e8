"""ONE (Lan, Zhu & Gong 2018): a multi-branch student whose gated ensemble teaches every branch."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distill.core import Term, feature, register_term


@register_term("one")
class OnTheFlyNativeEnsemble(Term):
  """The whole ONE objective on a `one` model (kd_jax.models.one), per example:

      Σ_m CE(z_m) + CE(z_e) + w(step) · Σ_m T² · KL(softmax(z_e / T) ‖ softmax(z_m / T)),

  with z_m the branches' logits, z_e = Σ_m softmax(gate)_m · z_m the gated
  ensemble (`losses.gated_ensemble_logits`), a constant in the KL terms (as in
  the authors' code), so CE(z_e) alone trains the gate. w = `kd_weight`, ramped
  up over `rampup_epochs` by the sigmoid schedule exp(−5 (1 − t)²) that the
  authors' code uses (80 of 300 epochs on CIFAR; 0 = no ramp-up). The term
  includes the cross-entropies: use it alone, without `ce`.
  """

  def __init__(self, temperature: float = 3.0, kd_weight: float = 1.0, rampup_epochs: float = 0.0):
    if rampup_epochs < 0:
      raise ValueError(f"one: rampup_epochs must be >= 0, got {rampup_epochs}")
    self.temperature, self.kd_weight, self.rampup_epochs = temperature, kd_weight, rampup_epochs

  def kd_weight_at(self, step: jax.Array) -> jax.Array:
    if not self.rampup_epochs:
      return jnp.asarray(self.kd_weight, jnp.float32)
    t = jnp.clip(step / (self.rampup_epochs * self.steps_per_epoch), 0.0, 1.0)
    return self.kd_weight * jnp.exp(-5.0 * jnp.square(1.0 - t))

  def __call__(self, student, teacher, batch, params, state, *, step):
    who = "student (a `one` model)"
    gate_logits = feature(student, "gate_logits", who=who)
    branch_logits = jnp.stack([feature(student, f"branch_{m}_logits", who=who)
                               for m in range(gate_logits.shape[-1])])
    ensemble = losses.gated_ensemble_logits(branch_logits, gate_logits)
    labels = batch["label"]
    ce = sum(losses.cross_entropy(z, labels) for z in branch_logits) + losses.cross_entropy(ensemble, labels)
    target = jax.lax.stop_gradient(ensemble)
    kd = sum(losses.kd_loss(z, target, temperature=self.temperature) for z in branch_logits)
    return ce + self.kd_weight_at(step) * kd, state
