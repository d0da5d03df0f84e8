"""Losses between peers trained together: mutual learning, co-distillation, ONE's gated ensemble.

Peers' predictions come stacked on a leading axis [P, B, K] and are constants
(each peer gets its own loss with the others' predictions held fixed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks
from kd_jax.losses.logits import _kd


def _check_peers(student_logits, peer_logits, what, name="peer_logits"):
  _checks.rank(student_logits, (2,), what=what, name="student_logits [B, K]")
  _checks.rank(peer_logits, (3,), what=what, name=f"{name} [P, B, K]")
  if jnp.shape(peer_logits)[1:] != jnp.shape(student_logits):
    raise ValueError(f"{what}: {name} shape {jnp.shape(peer_logits)} must be [P, *student shape "
                     f"{jnp.shape(student_logits)}]")
  _checks.floating(student_logits, what=what, name="student_logits")
  _checks.floating(peer_logits, what=what, name=name)


@jax.jit
def _mutual_learning(s, peers, temperature):
  return jnp.mean(jax.vmap(lambda p: _kd(s, p, temperature))(peers), axis=0)


def mutual_learning_loss(student_logits: jax.Array, peer_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Deep mutual learning: the mean over peers j of T² · KL(p_j ‖ p) at temperature T, per example.

  With two peers this is the paper's KL term (T = 1); with more, the mean over the
  other peers (the paper's "average" extension).

  Args:
    student_logits: [B, K] float, this peer's logits.
    peer_logits: [P, B, K] float, the other peers' logits (constants).
    temperature: T > 0.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0]])
    >>> float(mutual_learning_loss(z, z[None])[0])
    0.0

  References:
    Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning", CVPR.
  """
  _checks.positive(temperature, name="temperature")
  _check_peers(student_logits, peer_logits, "mutual_learning_loss")
  return _mutual_learning(student_logits, peer_logits, temperature)


@jax.jit
def _codistillation(s, peers, temperature):
  log_q = jax.nn.log_softmax(jax.lax.stop_gradient(peers.astype(jnp.float32)) / temperature, axis=-1)
  # log of the mean of the peers' distributions, computed in log space: finite for saturated peers.
  log_target = jax.nn.logsumexp(log_q, axis=0) - jnp.log(peers.shape[0])
  log_s = jax.nn.log_softmax(s.astype(jnp.float32) / temperature, axis=-1)
  return temperature * temperature * jnp.sum(jnp.exp(log_target) * (log_target - log_s), axis=-1)


def codistillation_loss(student_logits: jax.Array, peer_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Co-distillation: T² · KL(mean_j softmax(z_j / T) ‖ softmax(z / T)), per example.

  The target is the average of the peers' predicted distributions (possibly from
  stale copies of the peers, exchanged every few hundred steps in the paper).

  Args:
    student_logits: [B, K] float.
    peer_logits: [P, B, K] float, the peers' logits (constants).
    temperature: T > 0.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0]])
    >>> abs(float(codistillation_loss(z, jnp.stack([z, z]))[0])) < 1e-6
    True

  References:
    Anil, Pereyra, Passos, Ormandi, Dahl & Hinton 2018, "Large Scale Distributed Neural Network Training
    through Online Distillation", ICLR.
  """
  _checks.positive(temperature, name="temperature")
  _check_peers(student_logits, peer_logits, "codistillation_loss")
  return _codistillation(student_logits, peer_logits, temperature)


@jax.jit
def _gated_ensemble(branch_logits, gate_logits):
  weights = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1)  # [B, M]
  return jnp.einsum("bm,mbk->bk", weights, branch_logits.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def gated_ensemble_logits(branch_logits: jax.Array, gate_logits: jax.Array) -> jax.Array:
  """ONE's on-the-fly teacher: Σ_m softmax(gate)_m · z_m, per example.

  ONE trains M branches sharing a trunk; a gate (a linear layer on the trunk's
  pooled feature) weights the branches' logits. The objective is
  Σ_m CE(z_m) + CE(ensemble) + Σ_m kd_loss(z_m, ensemble, T = 3). This function
  is differentiable in both inputs, so CE(ensemble) trains the gate; `kd_loss`
  holds the ensemble constant, so the KD terms train the branches only.

  Args:
    branch_logits: [M, B, K] float, the branches' logits.
    gate_logits: [B, M] float, the gate's scores.

  Returns:
    [B, K] float32 ensemble logits.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.stack([jnp.ones((1, 2)), 3 * jnp.ones((1, 2))])
    >>> gated_ensemble_logits(z, jnp.zeros((1, 2))).tolist()
    [[2.0, 2.0]]

  References:
    Lan, Zhu & Gong 2018, "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS.
  """
  what = "gated_ensemble_logits"
  _checks.rank(branch_logits, (3,), what=what, name="branch_logits [M, B, K]")
  m, b, _ = jnp.shape(branch_logits)
  if jnp.shape(gate_logits) != (b, m):
    raise ValueError(f"{what}: gate_logits shape {jnp.shape(gate_logits)} must be [B, M] = {(b, m)} for "
                     f"branch_logits shape {jnp.shape(branch_logits)}")
  _checks.floating(branch_logits, what=what, name="branch_logits")
  _checks.floating(gate_logits, what=what, name="gate_logits")
  return _gated_ensemble(branch_logits, gate_logits)
