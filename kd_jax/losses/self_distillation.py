"""Losses of self-distillation: multi-exit distillation, and SLA's joint (class, rotation) labels.

Pure functions of logits; computation in float32, teachers (deeper exits, the
aggregated distribution) are constants.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks
from kd_jax.losses.logits import cross_entropy, kd_loss

TEACHERS = ("final", "deeper")


def multi_exit_kd_loss(exit_logits: Sequence[jax.Array], labels: jax.Array, *, temperature: float = 4.0,
                       alpha: float = 0.5, teachers: str = "final") -> jax.Array:
  """Distillation-based training of a multi-exit network's early exits, per example.

      Σ_{m < M} (1 − α) · CE(z_m, y) + α · T² · KL(q_m ‖ softmax(z_m / T)),

  with z_1..z_M the exits' logits from the shallowest to the final one, and the
  target q_m = softmax(z_M / T) for `teachers="final"`, or for `teachers="deeper"`
  the mean over the deeper exits j > m of T² · KL(softmax(z_j / T) ‖ softmax(z_m / T)).
  The targets are constants (stop-gradient): deeper exits are not pulled toward
  the shallower ones. The final exit's own cross-entropy is not included (the
  `ce` term).

  Args:
    exit_logits: M >= 2 arrays [B, K], shallowest first; the last is the final exit (the teacher).
    labels: [B] int in [0, K).
    temperature: T > 0.
    alpha: the weight of distillation against cross-entropy, in [0, 1].
    teachers: "final" (every exit learns from the final one) or "deeper" (from all deeper exits).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> final = jnp.array([[4.0, 0.0, 0.0]])
    >>> float(multi_exit_kd_loss([final, final], jnp.array([0]), alpha=1.0)[0])  # an exit agreeing with the final
    0.0

  References:
    Phuong & Lampert 2019, "Distillation-Based Training for Multi-Exit Architectures", ICCV.
  """
  if teachers not in TEACHERS:
    raise ValueError(f"multi_exit_kd_loss: teachers must be one of {TEACHERS}, got {teachers!r}")
  if len(exit_logits) < 2:
    raise ValueError(f"multi_exit_kd_loss: needs at least 2 exits (early ones and the final), got {len(exit_logits)}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"multi_exit_kd_loss: alpha must lie in [0, 1], got {alpha}")
  for z in exit_logits[1:]:
    _checks.same_shape(exit_logits[0], z, what="multi_exit_kd_loss", names=("first exit", "another exit"))
  total = jnp.zeros(jnp.shape(labels), jnp.float32)
  for i, z in enumerate(exit_logits[:-1]):
    sources = exit_logits[-1:] if teachers == "final" else exit_logits[i + 1:]
    kd = sum(kd_loss(z, jax.lax.stop_gradient(t), temperature=temperature) for t in sources) / len(sources)
    total = total + (1.0 - alpha) * cross_entropy(z, labels) + alpha * kd
  return total


def _joint_logits(joint_logits, what):
  _checks.floating(joint_logits, what=what, name="joint_logits")
  _checks.rank(joint_logits, (3,), what=what, name="joint_logits [B, M, K·M]")
  b, m, km = jnp.shape(joint_logits)
  if km % m:
    raise ValueError(f"{what}: joint_logits [B, M, K·M] has {km} joint classes, not a multiple of its M={m} "
                     "transformations")
  return b, m, km // m


def sla_joint_labels(labels: jax.Array, transformations: int) -> jax.Array:
  """The joint labels (class y, transformation j) -> y · M + j, per example.

  Args:
    labels: [B] int class labels.
    transformations: M, the number of transformations (4 rotations in the paper).

  Returns:
    [B, M] int32: row b is (y_b · M + j for j = 0..M-1).

  Example:
    >>> import jax.numpy as jnp
    >>> sla_joint_labels(jnp.array([2]), 4).tolist()
    [[8, 9, 10, 11]]

  References:
    Lee, Hwang & Shin 2020, "Self-supervised Label Augmentation via Input Transformations", ICML.
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  return labels[:, None] * transformations + jnp.arange(transformations, dtype=jnp.int32)[None, :]


def sla_loss(joint_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """SLA's joint cross-entropy: (1 / M) Σ_j CE(joint_logits[:, j], y · M + j), per example.

  Args:
    joint_logits: [B, M, K·M] float: row j is the joint classifier on the input under transformation j
      (j = 0 the identity), over the K·M labels (class, transformation) indexed y · M + j.
    labels: [B] int in [0, K).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(sla_loss(jnp.zeros((1, 4, 8)), jnp.array([1]))[0]), 4)  # uniform over 8 joint labels: log 8
    2.0794

  References:
    Lee, Hwang & Shin 2020, "Self-supervised Label Augmentation via Input Transformations", ICML (eq. 4).
  """
  _, m, k = _joint_logits(joint_logits, "sla_loss")
  _checks.labels_in_range(labels, k, what="sla_loss")
  return jnp.mean(cross_entropy(joint_logits, sla_joint_labels(labels, m)), axis=-1)


def sla_aggregated_logits(joint_logits: jax.Array) -> jax.Array:
  """SLA's aggregation: z_agg[b, k] = (1 / M) Σ_j joint_logits[b, j, k · M + j], [B, M, K·M] -> [B, K].

  softmax(z_agg) is the aggregated inference (eq. 5 of the paper): the joint
  classifier's logit of (class k, transformation j) on the input under
  transformation j, averaged over the transformations.

  Args:
    joint_logits: [B, M, K·M] float, as in `sla_loss`.

  Returns:
    [B, K] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> joint = jnp.arange(8.0).reshape(1, 2, 4)  # M = 2, K = 2: rows [0 1 2 3], [4 5 6 7]
    >>> sla_aggregated_logits(joint).tolist()  # class 0: (0 + 5) / 2, class 1: (2 + 7) / 2
    [[2.5, 4.5]]

  References:
    Lee, Hwang & Shin 2020, "Self-supervised Label Augmentation via Input Transformations", ICML.
  """
  b, m, k = _joint_logits(joint_logits, "sla_aggregated_logits")
  by_class = jnp.reshape(joint_logits.astype(jnp.float32), (b, m, k, m))  # [b, j, class, transformation]
  return jnp.mean(jnp.diagonal(by_class, axis1=1, axis2=3), axis=-1)  # diagonal: [b, class, j]


def sla_single_logits(joint_logits: jax.Array, transformations: int) -> jax.Array:
  """SLA's single inference: the joint logits of (class k, identity) on the untransformed input.

  Args:
    joint_logits: [B, M', K·M] float, as in `sla_loss`; only row 0 (the identity) is read, so M' may be 1.
    transformations: M.

  Returns:
    [B, K] float32: joint_logits[:, 0, k · M].

  Example:
    >>> import jax.numpy as jnp
    >>> sla_single_logits(jnp.arange(4.0).reshape(1, 1, 4), 2).tolist()
    [[0.0, 2.0]]

  References:
    Lee, Hwang & Shin 2020, "Self-supervised Label Augmentation via Input Transformations", ICML.
  """
  _checks.floating(joint_logits, what="sla_single_logits", name="joint_logits")
  _checks.rank(joint_logits, (3,), what="sla_single_logits", name="joint_logits [B, M, K·M]")
  b, _, km = jnp.shape(joint_logits)
  if km % transformations:
    raise ValueError(f"sla_single_logits: {km} joint classes are not a multiple of the {transformations} "
                     "transformations")
  return jnp.reshape(joint_logits[:, 0].astype(jnp.float32), (b, km // transformations, transformations))[:, :, 0]
