"""Contrastive representation distillation with its memory bank as an explicit pytree.

The bank holds one student and one teacher embedding per training example
([N, D] each) and the two NCE normalising constants. It lives in the train
state (so checkpoints cover it) and its first axis can be sharded over devices:
the gather of the B·(K+1) rows and the scatter of the B updated rows are
ordinary indexing under jit, which XLA partitions for a NamedSharding.

How a training step uses it:
  1. `indices` [B]: each example's position in the training set (the data
     pipeline yields it with the batch); distinct within a batch.
  2. `contrast_indices` [B, K]: negatives, e.g. `crd_sample_negatives(rng,
     indices, N, K)` with a fresh rng per step (uniform over the other N − 1
     examples, with replacement; the paper's code draws from the other
     classes without replacement, nearly the same when there are many classes).
  3. `loss, bank = crd_loss(s, t, indices, contrast_indices, bank)`; keep the new bank.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from kd_jax.losses import _checks

_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class CRDBank:
  """CRD's memory: a pytree of arrays (shard `student`/`teacher` on axis 0; the scalars are replicated).

  Attributes:
    student: [N, D] float32, memory of the student's embeddings (unit rows).
    teacher: [N, D] float32, memory of the teacher's embeddings (unit rows).
    z_student: [] float32, NCE normaliser of the student-side scores; −1 until the first batch sets it.
    z_teacher: [] float32, same for the teacher side.
  """

  student: jax.Array
  teacher: jax.Array
  z_student: jax.Array
  z_teacher: jax.Array


def crd_init_bank(rng: jax.Array, num_data: int, dim: int) -> CRDBank:
  """A bank of `num_data` random rows of width `dim`, uniform in ±1/sqrt(dim/3) (as in the paper's code).

  Args:
    rng: a PRNG key.
    num_data: N, the training-set size.
    dim: D, the embedding width.

  Returns:
    A `CRDBank` with [N, D] float32 memories and unset (−1) normalisers.

  Example:
    >>> import jax
    >>> crd_init_bank(jax.random.PRNGKey(0), 10, 4).student.shape
    (10, 4)

  References:
    Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation", ICLR.
  """
  if num_data < 2 or dim < 1:
    raise ValueError(f"crd_init_bank: need num_data >= 2 and dim >= 1, got {num_data} and {dim}")
  return _init_bank(rng, int(num_data), int(dim))


@jax.jit(static_argnums=(1, 2))
def _init_bank(rng, num_data, dim):
  bound = 1.0 / math.sqrt(dim / 3)
  s_rng, t_rng = jax.random.split(rng)
  draw = lambda r: jax.random.uniform(r, (num_data, dim), jnp.float32, -bound, bound)
  return CRDBank(draw(s_rng), draw(t_rng), jnp.float32(-1.0), jnp.float32(-1.0))


def crd_sample_negatives(rng: jax.Array, indices: jax.Array, num_data: int, num_negatives: int) -> jax.Array:
  """K negatives per example, uniform over the other N − 1 training examples (with replacement).

  Args:
    rng: a PRNG key (a fresh one each step).
    indices: [B] int, the examples' own positions (never drawn as their negatives).
    num_data: N.
    num_negatives: K (16384 in the paper).

  Returns:
    [B, K] int32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> neg = crd_sample_negatives(jax.random.PRNGKey(0), jnp.array([0, 1]), 3, 5)
    >>> neg.shape, bool((neg != jnp.array([[0], [1]])).all())
    ((2, 5), True)

  References:
    Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation", ICLR.
  """
  _checks.rank(indices, (1,), what="crd_sample_negatives", name="indices [B]")
  if num_data < 2:
    raise ValueError(f"crd_sample_negatives: need num_data >= 2, got {num_data}")
  return _sample_negatives(rng, jnp.asarray(indices, jnp.int32), int(num_data), int(num_negatives))


@jax.jit(static_argnums=(2, 3))
def _sample_negatives(rng, indices, num_data, num_negatives):
  draws = jax.random.randint(rng, (indices.shape[0], num_negatives), 0, num_data - 1, dtype=jnp.int32)
  # Shifting draws at or above the positive skips it: uniform over the other N − 1.
  return draws + (draws >= jnp.expand_dims(indices, 1)).astype(jnp.int32)


def _nce(scores: jax.Array, num_data: int, eps) -> jax.Array:
  """NCE loss of [B, K+1] normalised scores whose column 0 is the positive; mean over the batch."""
  noise = (scores.shape[1] - 1) / num_data  # K · Pn(i), Pn uniform over the data
  log_positive = jnp.log(scores[:, 0] / (scores[:, 0] + noise + eps))
  log_negative = jnp.log(noise / (scores[:, 1:] + noise + eps))
  return -jnp.mean(log_positive + jnp.sum(log_negative, axis=1))


@jax.jit
def _crd(s, t, indices, contrast_indices, bank, temperature, momentum, eps):
  s, t = s.astype(jnp.float32), t.astype(jnp.float32)
  num_data = bank.student.shape[0]
  rows = jnp.concatenate([jnp.expand_dims(indices, 1), contrast_indices], axis=1)  # [B, K+1], positive first

  def score(memory, x):
    dots = jnp.einsum("bkd,bd->bk", jax.lax.stop_gradient(memory)[rows], x, precision=_HIGHEST)
    return jnp.exp(dots / temperature)

  scores_s = score(bank.teacher, s)  # student embedding against the teacher memory
  scores_t = score(bank.student, t)  # teacher embedding against the student memory
  # Z is fixed once, from the first batch's mean score (a constant, as in the paper's code).
  z_s = jnp.where(bank.z_student < 0, jax.lax.stop_gradient(jnp.mean(scores_s)) * num_data, bank.z_student)
  z_t = jnp.where(bank.z_teacher < 0, jax.lax.stop_gradient(jnp.mean(scores_t)) * num_data, bank.z_teacher)
  loss = _nce(scores_s / z_s, num_data, eps) + _nce(scores_t / z_t, num_data, eps)

  def update(memory, x):
    moved = memory[indices] * momentum + jax.lax.stop_gradient(x) * (1.0 - momentum)
    return memory.at[indices].set(_checks.l2_normalize(moved))

  return loss, CRDBank(update(bank.student, s), update(bank.teacher, t), z_s, z_t)


def crd_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array, indices: jax.Array,
             contrast_indices: jax.Array, bank: CRDBank, *, temperature: float = 0.07, momentum: float = 0.5,
             eps: float = 1e-7) -> tuple[jax.Array, CRDBank]:
  """CRD: NCE between each embedding and its positive / K negatives in the other network's memory.

  The student embedding is scored against the teacher memory and the teacher
  embedding against the student memory, scores exp(⟨m, x⟩ / τ) divided by a
  constant Z fixed on the first batch (mean score × N); each side's NCE loss
  (noise distribution uniform over the N examples) is averaged over the batch and
  the two are summed. Then each example's memory rows move to
  momentum · old + (1 − momentum) · new, re-normalised. Both embeddings get
  gradients: they are the outputs of CRD's trainable embedding heads
  (kd_jax.models.connectors.Embed: linear + L2 normalisation); the teacher
  network itself stays frozen. See the module docstring for how to draw
  `contrast_indices`.

  Args:
    student_embeddings: [B, D] float, L2-normalised rows.
    teacher_embeddings: [B, D] float, L2-normalised rows.
    indices: [B] int, the examples' positions in the training set (their positives), distinct.
    contrast_indices: [B, K] int in [0, N), the negatives.
    bank: the memory (`crd_init_bank`), possibly sharded over devices on its first axis.
    temperature: τ > 0.
    momentum: of the memory update, in [0, 1].
    eps: guards the NCE logarithms.

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
    Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation", ICLR.
  """
  what = "crd_loss"
  _checks.same_shape(student_embeddings, teacher_embeddings, what=what)
  _checks.rank(student_embeddings, (2,), what=what, name="embeddings [B, D]")
  _checks.floating(student_embeddings, what=what, name="student_embeddings")
  _checks.floating(teacher_embeddings, what=what, name="teacher_embeddings")
  _checks.positive(temperature, name="temperature")
  b, d = jnp.shape(student_embeddings)
  if jnp.shape(indices) != (b,) or jnp.ndim(contrast_indices) != 2 or jnp.shape(contrast_indices)[0] != b:
    raise ValueError(f"{what}: indices shape {jnp.shape(indices)} must be [B] and contrast_indices shape "
                     f"{jnp.shape(contrast_indices)} [B, K] for embeddings of shape {(b, d)}")
  for name, x in (("indices", indices), ("contrast_indices", contrast_indices)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
      raise TypeError(f"{what}: {name} must be integers, got dtype {jnp.result_type(x)}")
  if jnp.shape(bank.student) != jnp.shape(bank.teacher) or jnp.shape(bank.student)[1:] != (d,):
    raise ValueError(f"{what}: bank shapes student {jnp.shape(bank.student)} / teacher {jnp.shape(bank.teacher)} "
                     f"must both be [N, {d}] for embeddings of shape {(b, d)}")
  return _crd(student_embeddings, teacher_embeddings, indices, contrast_indices, bank, temperature, momentum, eps)
