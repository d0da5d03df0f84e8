"""Self-attention distillation for Transformers: attention maps (MiniLM, TinyBERT) and value relations (MiniLM).

Attention probabilities are [B, H, Tq, Tk] (each row a distribution over the
keys); values [B, H, Tk, d]. A mask (broadcastable to [B, H, Tq, Tk], nonzero
where a query may attend to a key: causal or padding masks) restricts every
loss to the allowed positions, and a query row with no allowed key (a padded
query) contributes nothing. Head counts may differ between student and teacher
with `heads="mean"` (both sides averaged over their heads first); `"equal"`
requires the same count and compares head by head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks

HEADS = ("equal", "mean")
ATTENTION_LOSSES = ("kl", "mse")
_TINY = 1e-30


def _valid(mask, shape):
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask)
  if mask.ndim != 4:
    raise ValueError(f"attention losses: mask must be broadcastable to [B, H, Tq, Tk] = {shape}, got "
                     f"shape {mask.shape}")
  return jnp.broadcast_to(mask != 0, shape)


def _align_heads(student, teacher, heads, what, names):
  if heads not in HEADS:
    raise ValueError(f"{what}: heads must be one of {HEADS}, got {heads!r}")
  _checks.rank(student, (4,), what=what, name=f"{names[0]} [B, H, T, ...]")
  _checks.rank(teacher, (4,), what=what, name=f"{names[1]} [B, H, T, ...]")
  if heads == "equal" and student.shape[1] != teacher.shape[1]:
    raise ValueError(f"{what}: the student has {student.shape[1]} heads and the teacher {teacher.shape[1]}: use "
                     "heads='mean' (average over heads) or equal head counts")
  return student, teacher


def _masked_kl_rows(student_probs, teacher_probs, valid):
  """Σ_k KL(p_t ‖ p_s) per row [B, H, Tq] over the valid keys (0 for masked entries, finite gradients)."""
  p_t = jnp.where(valid, teacher_probs, 0.0)
  p_s = jnp.where(valid, student_probs, 1.0)  # log(1) = 0 where masked: no inf in the unused branch
  log_s = jnp.log(jnp.maximum(p_s, _TINY))
  log_t = jnp.log(jnp.maximum(jnp.where(valid, teacher_probs, 1.0), _TINY))
  return jnp.sum(jnp.where(valid, p_t * (log_t - log_s), 0.0), axis=-1)


def _mean_over_rows(row_values, valid):
  """Per example: the mean over the (head, query) rows that have at least one valid key."""
  rows = jnp.any(valid, axis=-1).astype(jnp.float32)  # [B, H, Tq]
  return jnp.sum(row_values * rows, axis=(1, 2)) / jnp.maximum(jnp.sum(rows, axis=(1, 2)), 1.0)


def attention_map_loss(student_probs: jax.Array, teacher_probs: jax.Array, *, mask: jax.Array | None = None,
                       kind: str = "kl", heads: str = "equal") -> jax.Array:
  """Distance between the student's and the teacher's attention distributions, per example.

  kl (MiniLM):  mean over heads h and valid queries q of Σ_k A^t_{hqk} (log A^t_{hqk} − log A^s_{hqk});
  mse:          the mean over valid (h, q, k) of (A^s_{hqk} − A^t_{hqk})² (TinyBERT's attention loss,
                here on the probabilities rather than the unnormalised scores).

  Args:
    student_probs: [B, Hs, Tq, Tk] float, rows summing to 1 over the allowed keys.
    teacher_probs: [B, Ht, Tq, Tk] float (a constant).
    mask: None (every position) or broadcastable to [B, H, Tq, Tk]; nonzero = allowed.
    kind: "kl" or "mse".
    heads: "equal" (Hs == Ht, head by head) or "mean" (each side averaged over its heads).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.full((1, 1, 2, 2), 0.5)  # uniform attention, 1 head, 2 positions
    >>> attention_map_loss(a, a).tolist()
    [0.0]

  References:
    Wang, Wei, Dong, Bao, Yang & Zhou 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
    Compression of Pre-Trained Transformers", NeurIPS; Jiao et al. 2020, "TinyBERT: Distilling BERT for
    Natural Language Understanding", Findings of EMNLP.
  """
  what = "attention_map_loss"
  if kind not in ATTENTION_LOSSES:
    raise ValueError(f"{what}: kind must be one of {ATTENTION_LOSSES}, got {kind!r}")
  student, teacher = _align_heads(_checks.as_f32(student_probs), _checks.as_f32(teacher_probs), heads, what,
                                  ("student_probs", "teacher_probs"))
  if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
    raise ValueError(f"{what}: student_probs {student.shape} and teacher_probs {teacher.shape} must agree in "
                     "batch, query and key lengths")
  teacher = jax.lax.stop_gradient(teacher)
  if heads == "mean":
    student, teacher = jnp.mean(student, 1, keepdims=True), jnp.mean(teacher, 1, keepdims=True)
  valid = _valid(mask, student.shape)
  if kind == "kl":
    return _mean_over_rows(_masked_kl_rows(student, teacher, valid), valid)
  squared = jnp.where(valid, jnp.square(student - teacher), 0.0)
  return jnp.sum(squared, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(valid, axis=(1, 2, 3)).astype(jnp.float32), 1.0)


def value_relation(values: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
  """MiniLM's value relation softmax(V Vᵀ / √d) per head, each row a distribution over the keys.

  Args:
    values: [B, H, T, d] float.
    mask: None or broadcastable to [B, H, T, T]; nonzero = allowed (masked keys get 0).

  Returns:
    [B, H, T, T] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> value_relation(jnp.zeros((1, 1, 2, 4))).tolist()  # equal values: uniform relations
    [[[[0.5, 0.5], [0.5, 0.5]]]]

  References:
    Wang, Wei, Dong, Bao, Yang & Zhou 2020, "MiniLM", NeurIPS.
  """
  values = _checks.as_f32(values)
  scores = jnp.einsum("bhqd,bhkd->bhqk", values, values) / jnp.sqrt(values.shape[-1]).astype(jnp.float32)
  valid = _valid(mask, scores.shape)
  return jax.nn.softmax(jnp.where(valid, scores, jnp.finfo(jnp.float32).min), axis=-1) * valid


def value_relation_loss(student_values: jax.Array, teacher_values: jax.Array, *, mask: jax.Array | None = None,
                        heads: str = "equal") -> jax.Array:
  """MiniLM's value-relation transfer: KL(VR^t ‖ VR^s) per head and query, VR = softmax(V Vᵀ / √d), per example.

  The head dimensions d may differ (the relations are [T, T]); with heads="mean" the
  relations (distributions) are averaged over each side's heads.

  Args:
    student_values: [B, Hs, T, ds] float.
    teacher_values: [B, Ht, T, dt] float (a constant).
    mask: None or broadcastable to [B, H, T, T]; nonzero = allowed (e.g. the causal mask
      of a decoder's self-attention).
    heads: "equal" or "mean".

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> v = jnp.ones((1, 2, 3, 4))
    >>> value_relation_loss(v, v).tolist()  # same relations: 0
    [0.0]

  References:
    Wang, Wei, Dong, Bao, Yang & Zhou 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
    Compression of Pre-Trained Transformers", NeurIPS.
  """
  what = "value_relation_loss"
  student, teacher = _align_heads(_checks.as_f32(student_values), _checks.as_f32(teacher_values), heads, what,
                                  ("student_values", "teacher_values"))
  if student.shape[:1] != teacher.shape[:1] or student.shape[2] != teacher.shape[2]:
    raise ValueError(f"{what}: student_values {student.shape} and teacher_values {teacher.shape} must agree in "
                     "batch and length")
  student_relation = value_relation(student, mask=mask)
  teacher_relation = jax.lax.stop_gradient(value_relation(teacher, mask=mask))
  return attention_map_loss(student_relation, teacher_relation, mask=mask, kind="kl", heads=heads)
