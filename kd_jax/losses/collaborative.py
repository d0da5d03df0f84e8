"""Targets built from a group of networks trained together: KDCL's ensembles, OKDDip's attention, a soft KL.

A group's logits come stacked [M, B, K] (M members: peers, branches or the
sub-networks of a `group` model). Unlike `kd_loss`, `soft_kl_loss` lets the
gradient reach its target: OKDDip learns its attention weights through it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks

ENSEMBLES = ("mean", "min_logit")


@jax.jit
def _mean_logits(logits):
  return jnp.mean(logits.astype(jnp.float32), axis=0)


@jax.jit
def _min_logits(logits, labels):
  z = logits.astype(jnp.float32)
  target = jnp.take_along_axis(z, labels[None, :, None], axis=-1)  # [M, B, 1]
  return jnp.min(z - target, axis=0)


def kdcl_ensemble_logits(logits: jax.Array, *, labels: jax.Array | None = None, kind: str = "mean") -> jax.Array:
  """KDCL's soft target from the group's logits, per example.

  kind="mean" (KDCL-Naive): z_t = (1/M) Σ_m z_m.
  kind="min_logit" (KDCL-MinLogit): each member's logits shifted so that the true
  class c scores 0, z̄_m = z_m − z_{m,c}, then the minimum over members of every
  class: z_t,k = min_m z̄_{m,k}. The true class keeps 0 while every other class
  takes its lowest score, so the target is at least as sure of c as any member.

  Args:
    logits: [M, B, K] float, the members' logits.
    labels: [B] int, the true classes (min_logit only).
    kind: "mean" or "min_logit".

  Returns:
    [B, K] float32 ensemble logits (differentiable; stop the gradient to use them as a target).

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[[1.0, 3.0]], [[2.0, 0.0]]])
    >>> kdcl_ensemble_logits(z).tolist()
    [[1.5, 1.5]]
    >>> kdcl_ensemble_logits(z, labels=jnp.array([0]), kind="min_logit").tolist()
    [[0.0, -2.0]]

  References:
    Guo, Wang, Wu, Yu, Liang, Hu & Luo 2020, "Online Knowledge Distillation via Collaborative Learning", CVPR.
  """
  what = "kdcl_ensemble_logits"
  if kind not in ENSEMBLES:
    raise ValueError(f"{what}: kind must be one of {ENSEMBLES}, got {kind!r}")
  _checks.rank(logits, (3,), what=what, name="logits [M, B, K]")
  _checks.floating(logits, what=what, name="logits")
  if kind == "mean":
    return _mean_logits(logits)
  if labels is None or jnp.shape(labels) != jnp.shape(logits)[1:2]:
    raise ValueError(f"{what}: kind='min_logit' needs labels [B] = {jnp.shape(logits)[1:2]}, got "
                     f"{None if labels is None else jnp.shape(labels)}")
  return _min_logits(logits, labels)


@jax.jit
def _attention_weights(queries, keys):
  scores = jnp.einsum("ibd,jbd->bij", queries.astype(jnp.float32), keys.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return jax.nn.softmax(scores, axis=-1)


def peer_attention_weights(queries: jax.Array, keys: jax.Array) -> jax.Array:
  """OKDDip's attention between peers: a_ij = softmax_j(q_i · k_j), per example.

  Args:
    queries: [M, B, D] float, q_i = L(h_i), each peer's projected feature.
    keys: [M, B, D] float, k_j = E(h_j).

  Returns:
    [B, M, M] float32; row i (peer i's weights over the peers j, itself included) sums to 1.

  Example:
    >>> import jax.numpy as jnp
    >>> peer_attention_weights(jnp.zeros((2, 1, 3)), jnp.ones((2, 1, 3))).tolist()
    [[[0.5, 0.5], [0.5, 0.5]]]

  References:
    Chen, Mei, Wang, Feng & Chen 2020, "Online Knowledge Distillation with Diverse Peers", AAAI.
  """
  what = "peer_attention_weights"
  _checks.rank(queries, (3,), what=what, name="queries [M, B, D]")
  _checks.same_shape(queries, keys, what=what, names=("queries", "keys"))
  _checks.floating(queries, what=what, name="queries")
  _checks.floating(keys, what=what, name="keys")
  return _attention_weights(queries, keys)


@jax.jit
def _aggregate(weights, logits):
  return jnp.einsum("bij,jbk->ibk", weights.astype(jnp.float32), logits.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def peer_attention_logits(weights: jax.Array, logits: jax.Array) -> jax.Array:
  """Each peer's aggregate of the peers' logits: t_i = Σ_j a_ij z_j.

  Args:
    weights: [B, M, M] float, `peer_attention_weights`.
    logits: [M, B, K] float, the peers' logits.

  Returns:
    [M, B, K] float32, peer i's target logits t_i (differentiable in both inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[[2.0]], [[4.0]]])
    >>> peer_attention_logits(jnp.array([[[1.0, 0.0], [0.5, 0.5]]]), z).tolist()
    [[[2.0]], [[3.0]]]

  References:
    Chen, Mei, Wang, Feng & Chen 2020, "Online Knowledge Distillation with Diverse Peers", AAAI.
  """
  what = "peer_attention_logits"
  _checks.rank(logits, (3,), what=what, name="logits [M, B, K]")
  m, b, _ = jnp.shape(logits)
  if jnp.shape(weights) != (b, m, m):
    raise ValueError(f"{what}: weights shape {jnp.shape(weights)} must be [B, M, M] = {(b, m, m)} for logits "
                     f"shape {jnp.shape(logits)}")
  return _aggregate(weights, logits)


@jax.jit
def _soft_kl(student, target, temperature):
  log_p_t = jax.nn.log_softmax(target.astype(jnp.float32) / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
  return temperature * temperature * jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def soft_kl_loss(student_logits: jax.Array, target_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """T² · KL(softmax(t / T) ‖ softmax(z / T)), per example, differentiable in both z and t.

  `kd_loss` with the gradient left on the target: wrap `target_logits` in
  `jax.lax.stop_gradient` for a constant target.

  Args:
    student_logits: [..., K] float.
    target_logits: [..., K] float, same shape.
    temperature: T > 0.

  Returns:
    [...] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0]])
    >>> abs(float(soft_kl_loss(z, z)[0])) < 1e-6
    True

  References:
    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (the KD term);
    Chen, Mei, Wang, Feng & Chen 2020, "Online Knowledge Distillation with Diverse Peers", AAAI (its use with a
    learned target).
  """
  _checks.positive(temperature, name="temperature")
  _checks.same_shape(student_logits, target_logits, what="soft_kl_loss", names=("student_logits", "target_logits"))
  return _soft_kl(student_logits, target_logits, temperature)
