"""Losses over intermediate features: feature maps are NHWC [B, H, W, C].

All compute in float32, treat the teacher as a constant, and stay finite (with
finite gradients) for zero or constant inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks


def _teacher(x):
  return jax.lax.stop_gradient(_checks.as_f32(x))


def _per_example_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape((x.shape[0], -1)), axis=1)


def _pool_to(x: jax.Array, height: int, width: int) -> jax.Array:
  """Average-pools [B, H, W, C] down to [B, height, width, C] (integer factors)."""
  b, h, w, c = x.shape
  if h % height or w % width:
    raise ValueError(f"cannot pool spatial size {(h, w)} to {(height, width)}")
  return x.reshape(b, height, h // height, width, w // width, c).mean(axis=(2, 4))


def hint_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """FitNets hint: mean over all non-batch axes of (s − t)².

  The regressor that maps the student's width to the teacher's is a separate
  trainable module (kd_jax.models.connectors / the engine's `hint` term).

  Args:
    student_features, teacher_features: [B, ...] float, same shape.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(hint_loss(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))[0])
    1.0

  References:
    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".
  """
  _checks.same_shape(student_features, teacher_features, what="hint_loss")
  return _per_example_mean(jnp.square(_checks.as_f32(student_features) - _teacher(teacher_features)))


def _attention_map(f: jax.Array, p: float) -> jax.Array:
  a = jnp.mean(jnp.abs(f) ** p, axis=-1).reshape((f.shape[0], -1))  # [B, H·W]
  return _checks.l2_normalize(a)


def attention_transfer_loss(student_features: jax.Array, teacher_features: jax.Array, *, p: float = 2.0) -> jax.Array:
  """Attention transfer: mean over positions of (a_s − a_t)², a(f) = normalise(mean_c |f|^p) over H·W.

  Channel counts may differ; spatial sizes must match.

  Args:
    student_features: [B, H, W, Cs]; teacher_features: [B, H, W, Ct].
    p: the power of the activations (2 in the paper's code).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(8.0).reshape(1, 2, 2, 2)
    >>> float(attention_transfer_loss(x, 2 * x)[0])
    0.0

  References:
    Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".
  """
  _checks.rank(student_features, (4,), what="attention_transfer_loss", name="student_features [B, H, W, C]")
  _checks.rank(teacher_features, (4,), what="attention_transfer_loss", name="teacher_features [B, H, W, C]")
  if student_features.shape[:3] != teacher_features.shape[:3]:
    raise ValueError(f"attention_transfer_loss: student shape {student_features.shape} and teacher shape "
                     f"{teacher_features.shape} must agree in batch and spatial size")
  a_s = _attention_map(_checks.as_f32(student_features), p)
  a_t = _attention_map(_teacher(teacher_features), p)
  return jnp.mean(jnp.square(a_s - a_t), axis=1)


def _gram(first: jax.Array, second: jax.Array) -> jax.Array:
  if first.shape[1:3] != second.shape[1:3]:
    first = _pool_to(first, *second.shape[1:3])
  h, w = second.shape[1:3]
  return jnp.einsum("bhwi,bhwj->bij", first, second) / (h * w)


def fsp_loss(student_first: jax.Array, student_second: jax.Array, teacher_first: jax.Array,
             teacher_second: jax.Array) -> jax.Array:
  """Flow of solution procedure: per example Σ_ij (G_s − G_t)², G(F1, F2)_ij = Σ_hw F1[h,w,i] F2[h,w,j] / (H·W).

  When F1 is spatially larger than F2 (consecutive stages), F1 is average-pooled
  to F2's size first, as in the CRD benchmark code.

  Args:
    student_first, student_second, teacher_first, teacher_second: [B, H, W, C] float;
      the student's and teacher's matrices must have the same channel counts.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 2, 2, 3))
    >>> float(fsp_loss(x, x, x, x)[0])
    0.0

  References:
    Yim, Joo, Bae & Kim 2017, "A Gift from Knowledge Distillation".
  """
  g_s = _gram(_checks.as_f32(student_first), _checks.as_f32(student_second))
  g_t = _gram(_teacher(teacher_first), _teacher(teacher_second))
  _checks.same_shape(g_s, g_t, what="fsp_loss (FSP matrices [B, C1, C2])")
  return jnp.sum(jnp.square(g_s - g_t), axis=(1, 2))


def _channel_vectors(f: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C, H·W], each channel's map L2-normalised."""
  b, h, w, c = f.shape
  return _checks.l2_normalize(jnp.transpose(f.reshape(b, h * w, c), (0, 2, 1)))


def nst_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """Neuron selectivity transfer: MMD² with the polynomial kernel k(x, y) = (xᵀy)² between channel maps.

  Each channel's spatial map is L2-normalised; per example,
  mean k(s, s) + mean k(t, t) − 2 mean k(s, t) over channel pairs. A larger map is
  average-pooled to the smaller one's size.

  Args:
    student_features: [B, H, W, Cs]; teacher_features: [B, H', W', Ct].

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(12.0).reshape(1, 2, 2, 3)
    >>> abs(float(nst_loss(x, x)[0])) < 1e-6
    True

  References:
    Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".
  """
  s, t = _checks.as_f32(student_features), _teacher(teacher_features)
  if s.shape[1] > t.shape[1]:
    s = _pool_to(s, *t.shape[1:3])
  elif t.shape[1] > s.shape[1]:
    t = _pool_to(t, *s.shape[1:3])
  s, t = _channel_vectors(s), _channel_vectors(t)
  kernel = lambda a, b: jnp.mean(jnp.square(jnp.einsum("bid,bjd->bij", a, b)), axis=(1, 2))
  return kernel(s, s) + kernel(t, t) - 2.0 * kernel(s, t)


def factor_transfer_loss(student_factor: jax.Array, teacher_factor: jax.Array, *, p: int = 1) -> jax.Array:
  """Factor transfer: mean over features of |n(F_s) − n(F_t)|^p, n the L2 normalisation of the flat factor.

  The factors are the outputs of FT's translator (student side) and paraphraser
  (teacher side): trainable connectors the caller applies first.

  Args:
    student_factor, teacher_factor: [B, ...] float, same shape.
    p: 1 (the paper's choice) or 2.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(factor_transfer_loss(jnp.ones((1, 4)), 3 * jnp.ones((1, 4)))[0])
    0.0

  References:
    Kim, Park & Kwak 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer".
  """
  _checks.same_shape(student_factor, teacher_factor, what="factor_transfer_loss")
  if p not in (1, 2):
    raise ValueError(f"factor_transfer_loss: p must be 1 or 2, got {p}")
  flat = lambda x: _checks.l2_normalize(x.reshape((x.shape[0], -1)))
  diff = flat(_checks.as_f32(student_factor)) - flat(_teacher(teacher_factor))
  return jnp.mean(jnp.abs(diff) if p == 1 else jnp.square(diff), axis=1)


def activation_boundary_loss(student_preact: jax.Array, teacher_preact: jax.Array, *,
                             margin: float = 1.0) -> jax.Array:
  """Activation boundaries: a hinge that puts the student's pre-activations on the teacher's side of 0.

  Per neuron: (s + m)² where the teacher is off (t ≤ 0) but s > −m, and (s − m)²
  where the teacher is on (t > 0) but s ≤ m; summed over neurons, per example.
  The student's pre-activations come through AB's connector (a 1×1 conv + BN).

  Args:
    student_preact, teacher_preact: [B, ...] float, same shape.
    margin: m.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(activation_boundary_loss(jnp.array([[2.0, -2.0]]), jnp.array([[1.0, -1.0]]))[0])
    0.0

  References:
    Heo, Lee, Yun & Choi 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons".
  """
  _checks.same_shape(student_preact, teacher_preact, what="activation_boundary_loss")
  s, t = _checks.as_f32(student_preact), _teacher(teacher_preact)
  off = (s > -margin) & (t <= 0)
  on = (s <= margin) & (t > 0)
  per_neuron = jnp.square(s + margin) * off + jnp.square(s - margin) * on
  return jnp.sum(per_neuron.reshape((s.shape[0], -1)), axis=1)


def vid_loss(predicted_mean: jax.Array, teacher_features: jax.Array, variance: jax.Array) -> jax.Array:
  """Variational information distillation: the Gaussian negative log-likelihood of the teacher's feature.

  Per example the mean over positions and channels of ½ · ((t − μ)² / σ² + log σ²),
  with σ² a learned per-channel variance (VID's regressor,
  kd_jax.models.connectors.VIDRegressor, gives μ and σ² = softplus(param) + eps).

  Args:
    predicted_mean: [B, ..., C] the student's prediction μ of the teacher's feature.
    teacher_features: [B, ..., C] float.
    variance: [C] positive.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.zeros((1, 3))
    >>> round(float(vid_loss(x, x, jnp.full((3,), jnp.e ** 2))[0]), 3)  # ½ log σ²
    1.0

  References:
    Ahn, Hu, Damianou, Lawrence & Dai 2019, "Variational Information Distillation for Knowledge Transfer".
  """
  _checks.same_shape(predicted_mean, teacher_features, what="vid_loss")
  if jnp.shape(variance) != jnp.shape(teacher_features)[-1:]:
    raise ValueError(f"vid_loss: variance shape {jnp.shape(variance)} must be ({jnp.shape(teacher_features)[-1]},)")
  variance = _checks.as_f32(variance)
  variance = variance.reshape((1,) * (jnp.ndim(teacher_features) - 1) + variance.shape)  # explicit broadcast
  nll = 0.5 * (jnp.square(_teacher(teacher_features) - _checks.as_f32(predicted_mean)) / variance + jnp.log(variance))
  return _per_example_mean(nll)
