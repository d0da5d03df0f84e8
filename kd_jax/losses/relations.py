"""Losses over relations between the examples of a batch: each returns a scalar.

Inputs are flattened to [B, D] (feature maps included); student and teacher
widths may differ, their batch sizes must not.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks

# Exact float32 contractions on every backend (GPU's default would round through TF32).
_HIGHEST = jax.lax.Precision.HIGHEST


def _flat(x, constant=False):
  x = jnp.asarray(x).astype(jnp.float32)
  x = x.reshape((x.shape[0], -1))
  return jax.lax.stop_gradient(x) if constant else x


def _check_pair(student, teacher, what):
  _checks.rank(student, (2, 3, 4, 5), what=what, name="student [B, ...]")
  _checks.rank(teacher, (2, 3, 4, 5), what=what, name="teacher [B, ...]")
  _checks.same_batch(student, teacher, what=what)
  _checks.floating(student, what=what, name="student")
  _checks.floating(teacher, what=what, name="teacher")


def _gram(x):
  return jnp.matmul(x, x.T, precision=_HIGHEST)


@jax.jit
def _similarity_preserving(s, t):
  g_s = _checks.l2_normalize(_gram(_flat(s)))
  g_t = _checks.l2_normalize(_gram(_flat(t, constant=True)))
  return jnp.sum(jnp.square(g_t - g_s)) / (g_s.shape[0] ** 2)


def similarity_preserving_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """Similarity-preserving KD: ‖G_t − G_s‖²_F / B², G = F Fᵀ with each row L2-normalised.

  Args:
    student_features: [B, ...] float (flattened to [B, Ds]).
    teacher_features: [B, ...] float (flattened to [B, Dt]), a constant.

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> round(float(similarity_preserving_loss(x, 2 * x)), 6)  # G is scale-invariant
    0.0

  References:
    Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation", ICCV.
  """
  _check_pair(student_features, teacher_features, "similarity_preserving_loss")
  return _similarity_preserving(student_features, teacher_features)


def _smooth_l1(x: jax.Array) -> jax.Array:
  """Huber with δ = 1 (PyTorch's smooth_l1_loss, beta = 1)."""
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _normalised_distances(x: jax.Array) -> jax.Array:
  """Pairwise Euclidean distances [B, B] divided by the mean of the positive ones."""
  d = _checks.safe_norm(jnp.expand_dims(x, 1) - jnp.expand_dims(x, 0), axis=-1)  # exactly 0 for equal rows
  positive = d > 0
  mean = jnp.sum(d) / jnp.maximum(jnp.sum(positive), 1)
  return d / jnp.where(mean > 0, mean, 1.0)


def _angles(x: jax.Array) -> jax.Array:
  """[i, j, k] = ⟨n(x_j − x_i), n(x_k − x_i)⟩, 0 where a difference is 0."""
  unit = _checks.l2_normalize(jnp.expand_dims(x, 0) - jnp.expand_dims(x, 1))  # [i, j] = x_j − x_i
  return jnp.einsum("ijd,ikd->ijk", unit, unit, precision=_HIGHEST)


@jax.jit
def _rkd(s, t, distance_weight, angle_weight):
  s, t = _flat(s), _flat(t, constant=True)
  distance = jnp.mean(_smooth_l1(_normalised_distances(s) - _normalised_distances(t)))
  angle = jnp.mean(_smooth_l1(_angles(s) - _angles(t)))
  return distance_weight * distance + angle_weight * angle


def rkd_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array, *, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> jax.Array:
  """Relational KD: distance-wise and angle-wise relations of the batch's embeddings.

  Distance term: pairwise Euclidean distances (diagonal 0), each matrix divided
  by the mean of its positive entries, smooth-L1 (Huber, δ = 1) averaged over
  the B² entries. Angle term: ⟨n(x_j − x_i), n(x_k − x_i)⟩ for all (i, j, k), n
  the L2 normalisation with a zero difference staying zero, smooth-L1 averaged
  over the B³ entries. Memory is O(B² · D): meant for batch-sized B.

  Args:
    student_embeddings: [B, Ds] float (higher ranks are flattened).
    teacher_embeddings: [B, Dt] float, a constant.
    distance_weight: weight of the distance term (25 in the paper).
    angle_weight: weight of the angle term (50 in the paper).

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    >>> abs(float(rkd_loss(x, 3 * x))) < 1e-6
    True

  References:
    Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation", CVPR.
  """
  _check_pair(student_embeddings, teacher_embeddings, "rkd_loss")
  return _rkd(student_embeddings, teacher_embeddings, distance_weight, angle_weight)


@jax.jit
def _pkt(s, t, eps):
  def distribution(x):
    x = _checks.l2_normalize(x)
    similarity = (jnp.matmul(x, x.T, precision=_HIGHEST) + 1.0) / 2.0  # cosine mapped to [0, 1]
    return similarity / jnp.sum(similarity, axis=1, keepdims=True)

  p_s, p_t = distribution(_flat(s)), distribution(_flat(t, constant=True))
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def pkt_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array, *, eps: float = 1e-7) -> jax.Array:
  """Probabilistic knowledge transfer: KL between the batch's cosine-similarity distributions.

  Rows L2-normalised; the cosine-similarity matrix mapped to (c + 1) / 2 and each
  row divided by its sum; the mean over the B² entries of t · log((t + eps) / (s + eps)).

  Args:
    student_embeddings: [B, Ds] float (higher ranks are flattened).
    teacher_embeddings: [B, Dt] float, a constant.
    eps: guards the logarithm.

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> float(pkt_loss(x, x))
    0.0

  References:
    Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV.
  """
  _check_pair(student_embeddings, teacher_embeddings, "pkt_loss")
  return _pkt(student_embeddings, teacher_embeddings, eps)


@jax.jit(static_argnames=("gamma", "order"))
def _correlation_congruence(s, t, gamma, order):
  def correlation(x):
    x = _checks.l2_normalize(x)
    dot = jnp.matmul(x, x.T, precision=_HIGHEST)
    # exp(−γ‖xi − xj‖²) = exp(−2γ) · exp(2γ xiᵀxj) for unit rows; the second factor by its Taylor series.
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot ** p for p in range(order + 1))

  c_s, c_t = correlation(_flat(s)), correlation(_flat(t, constant=True))
  return jnp.sum(jnp.square(c_s - c_t)) / (c_s.shape[0] ** 2)


def correlation_congruence_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array, *,
                                gamma: float = 0.4, order: int = 2) -> jax.Array:
  """Correlation congruence: ‖C_s − C_t‖²_F / B² between the batch correlation matrices.

  C_ij approximates the Gaussian RBF exp(−γ‖x_i − x_j‖²) of the L2-normalised
  embeddings, written as exp(−2γ) · exp(2γ x_iᵀx_j) and expanded to `order`:
  Σ_{p=0..P} exp(−2γ) (2γ)^p / p! · (x_iᵀx_j)^p. (The paper's full method adds
  the cross-entropy and instance-level KD terms; combine them as you like.)

  Args:
    student_embeddings: [B, Ds] float (CC's embedding layers usually map both to one width).
    teacher_embeddings: [B, Dt] float, a constant.
    gamma: γ of the RBF (a Python number).
    order: P, the Taylor order (2 in the paper).

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    >>> float(correlation_congruence_loss(x, x))
    0.0

  References:
    Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang 2019, "Correlation Congruence for Knowledge Distillation", ICCV.
  """
  _check_pair(student_embeddings, teacher_embeddings, "correlation_congruence_loss")
  if int(order) != order or order < 0:
    raise ValueError(f"correlation_congruence_loss: order must be a non-negative integer, got {order}")
  return _correlation_congruence(student_embeddings, teacher_embeddings, gamma=float(gamma), order=int(order))


@jax.jit
def _consecutive_correlation(s, t):
  delta = jnp.abs(_flat(s) - _flat(t, constant=True))
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=-1))


def consecutive_correlation_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array) -> jax.Array:
  """RepDistiller's correlation loss: mean over i of Σ_d |s_i − t_i|_d · |s_{i+1} − t_{i+1}|_d (consecutive rows).

  This is the quantity RepDistiller's `distiller_zoo/CC.py` computes ("code
  emailed ... by the original author") and the one behind the CRD paper's CC
  figures with weight 0.02; it is not the paper's Taylor-expanded RBF congruence
  (`correlation_congruence_loss`). Both embeddings need one width (RepDistiller's
  `LinearEmbed` maps both to 128) and the order of the batch matters.

  Args:
    student_embeddings: [B, D] float, B ≥ 2.
    teacher_embeddings: [B, D] float, a constant.

  Returns:
    [] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> float(consecutive_correlation_loss(s, jnp.zeros((3, 2))))
    1.0

  References:
    Peng et al. 2019, "Correlation Congruence for Knowledge Distillation", ICCV; Tian, Krishnan & Isola 2020,
    "Contrastive Representation Distillation", ICLR (RepDistiller, distiller_zoo/CC.py).
  """
  _check_pair(student_embeddings, teacher_embeddings, "consecutive_correlation_loss")
  if _flat(student_embeddings).shape != _flat(teacher_embeddings).shape:
    raise ValueError(f"consecutive_correlation_loss: student and teacher embeddings need one width, got "
                     f"{jnp.shape(student_embeddings)} and {jnp.shape(teacher_embeddings)}")
  if jnp.shape(student_embeddings)[0] < 2:
    raise ValueError(f"consecutive_correlation_loss: needs a batch of at least 2, got {jnp.shape(student_embeddings)}")
  return _consecutive_correlation(student_embeddings, teacher_embeddings)
