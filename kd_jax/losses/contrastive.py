"""Contrastive representation distillation with its memory bank as an explicit pytree.

The bank holds one student and one teacher embedding per training example
([N, D] each) and the two NCE normalising constants. It lives in the train
state, so checkpoints cover it, and its first axis can be sharded over devices
(the gather and the scatter below are ordinary indexing under jit).
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from kd_jax.losses import _checks


@flax.struct.dataclass
class CRDBank:
  student: jax.Array  # [N, D] memory of the student's embeddings
  teacher: jax.Array  # [N, D] memory of the teacher's embeddings
  z_student: jax.Array  # [] NCE normaliser, −1 until the first batch sets it
  z_teacher: jax.Array


def crd_init_bank(rng: jax.Array, num_data: int, dim: int) -> CRDBank:
  """A bank of `num_data` random entries of width `dim` (uniform in ±1/sqrt(dim/3), as in the paper's code).

  Example:
    >>> import jax
    >>> crd_init_bank(jax.random.PRNGKey(0), 10, 4).student.shape
    (10, 4)
  """
  bound = 1.0 / math.sqrt(dim / 3)
  s_rng, t_rng = jax.random.split(rng)
  draw = lambda r: jax.random.uniform(r, (num_data, dim), jnp.float32, -bound, bound)
  return CRDBank(draw(s_rng), draw(t_rng), jnp.float32(-1.0), jnp.float32(-1.0))


def _nce(scores: jax.Array, num_data: int, eps: float) -> jax.Array:
  """NCE loss of [B, K+1] scores whose column 0 is the positive; mean over the batch."""
  k = scores.shape[1] - 1
  noise = k / num_data  # m · Pn with Pn uniform over the data
  log_positive = jnp.log(scores[:, 0] / (scores[:, 0] + noise + eps))
  log_negative = jnp.log(noise / (scores[:, 1:] + noise + eps))
  return -jnp.mean(log_positive + jnp.sum(log_negative, axis=1))


def crd_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array, indices: jax.Array,
             contrast_indices: jax.Array, bank: CRDBank, *, temperature: float = 0.07, momentum: float = 0.5,
             eps: float = 1e-7) -> tuple[jax.Array, CRDBank]:
  """CRD: NCE between each embedding and its positive / K negatives in the other network's memory.

  The student embedding is scored against the teacher memory, the teacher
  embedding against the student memory; scores exp(⟨·,·⟩/τ) divided by a
  constant Z fixed on the first batch (mean score × N). Afterwards each
  example's memory slots move to `momentum` · old + (1 − momentum) · new,
  re-normalised. Both embeddings get gradients: they are the outputs of CRD's
  trainable embedding heads (the teacher network itself stays frozen).

  Args:
    student_embeddings, teacher_embeddings: [B, D] L2-normalised.
    indices: [B] int, the examples' positions in the training set (their positives).
    contrast_indices: [B, K] int, negatives drawn by the caller (e.g. uniformly from [0, N)).
    bank: the memory (`crd_init_bank`).

  Returns:
    ([] float32 loss, the updated bank).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> bank = crd_init_bank(jax.random.PRNGKey(0), 16, 4)
    >>> e = jnp.eye(4)[:2]
    >>> loss, bank = crd_loss(e, e, jnp.array([0, 1]), jnp.array([[5, 6], [7, 8]]), bank)
    >>> loss.shape, float(bank.z_student) > 0
    ((), True)

  References:
    Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation".
  """
  _checks.same_shape(student_embeddings, teacher_embeddings, what="crd_loss")
  s, t = _checks.as_f32(student_embeddings), _checks.as_f32(teacher_embeddings)
  if indices.shape != s.shape[:1] or contrast_indices.ndim != 2 or contrast_indices.shape[0] != s.shape[0]:
    raise ValueError(f"crd_loss: indices {indices.shape} must be [B] and contrast_indices {contrast_indices.shape} "
                     f"[B, K] for embeddings {s.shape}")
  if bank.student.shape[1] != s.shape[1]:
    raise ValueError(f"crd_loss: bank width {bank.student.shape[1]} does not match embeddings {s.shape}")
  num_data = bank.student.shape[0]
  all_indices = jnp.concatenate([indices[:, None], contrast_indices], axis=1)  # [B, K+1]
  score = lambda memory, x: jnp.exp(jnp.einsum("bkd,bd->bk", memory[all_indices], x) / temperature)
  scores_s = score(jax.lax.stop_gradient(bank.teacher), s)
  scores_t = score(jax.lax.stop_gradient(bank.student), t)
  z_s = jnp.where(bank.z_student < 0, jax.lax.stop_gradient(jnp.mean(scores_s)) * num_data, bank.z_student)
  z_t = jnp.where(bank.z_teacher < 0, jax.lax.stop_gradient(jnp.mean(scores_t)) * num_data, bank.z_teacher)
  loss = _nce(scores_s / z_s, num_data, eps) + _nce(scores_t / z_t, num_data, eps)

  def update(memory, x):
    moved = memory[indices] * momentum + jax.lax.stop_gradient(x) * (1.0 - momentum)
    return memory.at[indices].set(_checks.l2_normalize(moved))

  return loss, CRDBank(update(bank.student, s), update(bank.teacher, t), z_s, z_t)
