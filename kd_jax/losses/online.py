"""Losses between peers trained together: mutual learning, co-distillation, ONE's gated ensemble.

Peers' predictions come stacked on a leading axis [P, B, K] and are constants.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks
from kd_jax.losses.logits import kd_loss


def _peers(student_logits, peer_logits, what):
  _checks.rank(peer_logits, (3,), what=what, name="peer_logits [P, B, K]")
  if jnp.shape(peer_logits)[1:] != jnp.shape(student_logits):
    raise ValueError(f"{what}: peer_logits shape {jnp.shape(peer_logits)} must be [P, *{jnp.shape(student_logits)}]")
  return jax.lax.stop_gradient(_checks.as_f32(peer_logits))


def mutual_learning_loss(student_logits: jax.Array, peer_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Deep mutual learning: the mean over peers j of T² · KL(p_j ‖ p) at temperature T.

  Args:
    student_logits: [B, K]; peer_logits: [P, B, K] (the other peers, constants).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0]])
    >>> float(mutual_learning_loss(z, z[None])[0])
    0.0

  References:
    Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning".
  """
  peers = _peers(student_logits, peer_logits, "mutual_learning_loss")
  return jnp.mean(jax.vmap(lambda p: kd_loss(student_logits, p, temperature=temperature))(peers), axis=0)


def codistillation_loss(student_logits: jax.Array, peer_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Co-distillation: T² · KL(mean of the peers' softmax(z/T) ‖ softmax(z_s/T)).

  Args:
    student_logits: [B, K]; peer_logits: [P, B, K] (possibly stale copies' predictions, constants).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0]])
    >>> abs(float(codistillation_loss(z, jnp.stack([z, z]))[0])) < 1e-6
    True

  References:
    Anil et al. 2018, "Large Scale Distributed Neural Network Training through Online Distillation".
  """
  _checks.positive(temperature, name="temperature")
  peers = _peers(student_logits, peer_logits, "codistillation_loss")
  target = jnp.mean(jax.nn.softmax(peers / temperature, axis=-1), axis=0)
  log_s = jax.nn.log_softmax(_checks.as_f32(student_logits) / temperature, axis=-1)
  log_target = jnp.log(jnp.maximum(target, 1e-30))
  return temperature * temperature * jnp.sum(target * (log_target - log_s), axis=-1)


def gated_ensemble_logits(branch_logits: jax.Array, gate_logits: jax.Array) -> jax.Array:
  """ONE's on-the-fly teacher: Σ_m softmax(gate)_m · z_m, per example.

  Args:
    branch_logits: [M, B, K] the branches' logits; gate_logits: [B, M] the gate's scores.

  Returns:
    [B, K] float32 ensemble logits (distil each branch towards them with `kd_loss`).

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.stack([jnp.ones((1, 2)), 3 * jnp.ones((1, 2))])
    >>> gated_ensemble_logits(z, jnp.zeros((1, 2))).tolist()
    [[2.0, 2.0]]

  References:
    Lan, Zhu & Gong 2018, "Knowledge Distillation by On-the-Fly Native Ensemble".
  """
  _checks.rank(branch_logits, (3,), what="gated_ensemble_logits", name="branch_logits [M, B, K]")
  if jnp.shape(gate_logits) != (branch_logits.shape[1], branch_logits.shape[0]):
    raise ValueError(f"gated_ensemble_logits: gate_logits shape {jnp.shape(gate_logits)} must be "
                     f"[B, M] = {(branch_logits.shape[1], branch_logits.shape[0])}")
  weights = jax.nn.softmax(_checks.as_f32(gate_logits), axis=-1)  # [B, M]
  return jnp.einsum("bm,mbk->bk", weights, _checks.as_f32(branch_logits))
