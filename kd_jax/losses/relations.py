"""Losses over relations between the examples of a batch: each returns a scalar."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks


def _pair(student, teacher, what):
  if jnp.shape(student)[0] != jnp.shape(teacher)[0]:
    raise ValueError(f"{what}: student shape {jnp.shape(student)} and teacher shape {jnp.shape(teacher)} "
                     "must have the same batch size")
  flat = lambda x: x.reshape((x.shape[0], -1))
  return flat(_checks.as_f32(student)), jax.lax.stop_gradient(flat(_checks.as_f32(teacher)))


def similarity_preserving_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """Similarity-preserving KD: ‖G_t − G_s‖²_F / B², G = F Fᵀ with each row L2-normalised.

  Args:
    student_features, teacher_features: [B, ...] float (flattened to [B, D]; D may differ).

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> float(similarity_preserving_loss(x, 2 * x))
    0.0

  References:
    Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation".
  """
  s, t = _pair(student_features, teacher_features, "similarity_preserving_loss")
  g_s = _checks.l2_normalize(s @ s.T)
  g_t = _checks.l2_normalize(t @ t.T)
  return jnp.sum(jnp.square(g_t - g_s)) / (s.shape[0] ** 2)


def _smooth_l1(x: jax.Array) -> jax.Array:
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _pairwise_distances(x: jax.Array) -> jax.Array:
  squared = jnp.sum(jnp.square(x[:, None, :] - x[None, :, :]), axis=-1)
  off_diagonal = ~jnp.eye(x.shape[0], dtype=bool)
  # max inside the sqrt keeps gradients finite at zero distance; the diagonal is exactly 0.
  return jnp.where(off_diagonal, jnp.sqrt(jnp.maximum(squared, 1e-12)), 0.0)


def _normalised_distances(x: jax.Array) -> jax.Array:
  d = _pairwise_distances(x)
  positive = d > 0
  mean = jnp.sum(jnp.where(positive, d, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
  return d / jnp.maximum(mean, 1e-12)


def _angles(x: jax.Array) -> jax.Array:
  diff = x[None, :, :] - x[:, None, :]  # [i, j] = x_j − x_i
  unit = _checks.l2_normalize(diff)
  return jnp.einsum("ijd,ikd->ijk", unit, unit)


def rkd_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array, *, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> jax.Array:
  """Relational KD: distance-wise and angle-wise relations of the batch's embeddings.

  Distance: pairwise Euclidean distances (diagonal 0), each matrix divided by the
  mean of its positive entries, smooth-L1 averaged over the B² entries. Angle:
  ⟨n(x_j − x_i), n(x_k − x_i)⟩ for all (i, j, k), a zero difference staying zero,
  smooth-L1 averaged over the B³ entries.

  Args:
    student_embeddings: [B, Ds]; teacher_embeddings: [B, Dt] (flattened if higher rank).

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    >>> abs(float(rkd_loss(x, 3 * x))) < 1e-6
    True

  References:
    Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation".
  """
  s, t = _pair(student_embeddings, teacher_embeddings, "rkd_loss")
  distance = jnp.mean(_smooth_l1(_normalised_distances(s) - _normalised_distances(t)))
  angle = jnp.mean(_smooth_l1(_angles(s) - _angles(t)))
  return distance_weight * distance + angle_weight * angle


def pkt_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array, *, eps: float = 1e-7) -> jax.Array:
  """Probabilistic knowledge transfer: KL between the batch's cosine-similarity distributions.

  Rows L2-normalised; similarities c mapped to (c + 1) / 2 and each row divided by
  its sum; the mean over the B² entries of t · log((t + eps) / (s + eps)).

  Args:
    student_embeddings: [B, Ds]; teacher_embeddings: [B, Dt].

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> float(pkt_loss(x, x))
    0.0

  References:
    Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer".
  """
  s, t = _pair(student_embeddings, teacher_embeddings, "pkt_loss")

  def distribution(x):
    x = _checks.l2_normalize(x)
    similarity = (x @ x.T + 1.0) / 2.0
    return similarity / jnp.sum(similarity, axis=1, keepdims=True)

  p_s, p_t = distribution(s), distribution(t)
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def correlation_congruence_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array, *,
                                gamma: float = 0.4, order: int = 2) -> jax.Array:
  """Correlation congruence: ‖C_s − C_t‖²_F / B² between the batch correlation matrices.

  C_ij = k(x_i, x_j) with the Gaussian RBF exp(−γ‖x_i − x_j‖²) for L2-normalised
  embeddings, written as exp(−2γ) · exp(2γ xᵢᵀxⱼ) and approximated by its Taylor
  expansion to `order`: Σ_{p=0..P} exp(−2γ) (2γ)^p / p! · (xᵢᵀxⱼ)^p.

  Args:
    student_embeddings: [B, D]; teacher_embeddings: [B, D] (CC's embedding layers map both to D).

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    >>> float(correlation_congruence_loss(x, x))
    0.0

  References:
    Peng et al. 2019, "Correlation Congruence for Knowledge Distillation".
  """
  s, t = _pair(student_embeddings, teacher_embeddings, "correlation_congruence_loss")

  def correlation(x):
    x = _checks.l2_normalize(x)
    dot = x @ x.T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot ** p for p in range(order + 1))

  return jnp.sum(jnp.square(correlation(s) - correlation(t))) / (s.shape[0] ** 2)
