"""Losses over intermediate features: feature maps are NHWC [B, H, W, C].

All compute in float32, treat the teacher as a constant, and stay finite (with
finite gradients) for zero, constant or very large inputs. Trainable parts of
a method (FitNets' regressor, FT's paraphraser/translator, AB's connector,
VID's regressor, ReviewKD's fusion) live in kd_jax.models.connectors: these
functions take their outputs as arrays.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks

# Exact float32 contractions on every backend (GPU's default would round through TF32).
_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _const(x):
  return jax.lax.stop_gradient(_f32(x))


def _per_example_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape((x.shape[0], -1)), axis=1)


def _floats(what, **arrays):
  for name, x in arrays.items():
    _checks.floating(x, what=what, name=name)


@jax.jit
def _hint(s, t):
  return _per_example_mean(jnp.square(_f32(s) - _const(t)))


def hint_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """FitNets hint: mean over all non-batch axes of (s − t)², per example.

  The regressor that maps the student to the teacher's width is a separate
  trainable module (kd_jax.models.connectors): pass its output as `student_features`.

  Args:
    student_features: [B, ...] float (the regressor's output).
    teacher_features: [B, ...] float, same shape, a constant.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(hint_loss(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))[0])
    1.0

  References:
    Romero, Ballas, Kahou, Chassang, Gatta & Bengio 2015, "FitNets: Hints for Thin Deep Nets", ICLR.
  """
  _checks.same_shape(student_features, teacher_features, what="hint_loss")
  _checks.rank(student_features, (2, 3, 4, 5), what="hint_loss", name="features [B, ...]")
  _floats("hint_loss", student_features=student_features, teacher_features=teacher_features)
  return _hint(student_features, teacher_features)


def _attention_map(f: jax.Array, p: float) -> jax.Array:
  powered = jnp.square(f) if p == 2 else jnp.abs(f) ** p
  return _checks.l2_normalize(jnp.mean(powered, axis=-1).reshape((f.shape[0], -1)))  # [B, H·W]


@jax.jit(static_argnames="p")
def _attention_transfer(s, t, p):
  return jnp.mean(jnp.square(_attention_map(_f32(s), p) - _attention_map(_const(t), p)), axis=1)


def attention_transfer_loss(student_features: jax.Array, teacher_features: jax.Array, *,
                            p: float = 2) -> jax.Array:
  """Attention transfer: per example the mean over positions of (a_s − a_t)².

  a(f) = L2-normalise over the H·W positions of (mean over channels of |f|^p), as
  in the authors' code. Channel counts may differ; spatial sizes must match.

  Args:
    student_features: [B, H, W, Cs] float.
    teacher_features: [B, H, W, Ct] float, a constant.
    p: power of the activations, ≥ 1 (2 in the paper).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(8.0).reshape(1, 2, 2, 2)
    >>> round(float(attention_transfer_loss(x, 2 * x)[0]), 6)  # a(f) is scale-invariant
    0.0

  References:
    Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR.
  """
  what = "attention_transfer_loss"
  _checks.rank(student_features, (4,), what=what, name="student_features [B, H, W, C]")
  _checks.rank(teacher_features, (4,), what=what, name="teacher_features [B, H, W, C]")
  if jnp.shape(student_features)[:3] != jnp.shape(teacher_features)[:3]:
    raise ValueError(f"{what}: student shape {jnp.shape(student_features)} and teacher shape "
                     f"{jnp.shape(teacher_features)} must agree in batch and spatial size")
  _floats(what, student_features=student_features, teacher_features=teacher_features)
  if not p >= 1:
    raise ValueError(f"{what}: p must be >= 1 (|f|^p has an infinite slope at 0 otherwise), got {p}")
  return _attention_transfer(student_features, teacher_features, p=p)


def _fsp_matrix(first: jax.Array, second: jax.Array) -> jax.Array:
  (h1, w1), (h2, w2) = first.shape[1:3], second.shape[1:3]
  height, width = min(h1, h2), min(w1, w2)
  first = _checks.adaptive_avg_pool(first, height, width)
  second = _checks.adaptive_avg_pool(second, height, width)
  return jnp.einsum("bhwi,bhwj->bij", first, second, precision=_HIGHEST) / (height * width)


@jax.jit
def _fsp(s1, s2, t1, t2):
  g_s = _fsp_matrix(_f32(s1), _f32(s2))
  g_t = _fsp_matrix(_const(t1), _const(t2))
  return jnp.sum(jnp.square(g_s - g_t), axis=(1, 2))


def fsp_loss(student_first: jax.Array, student_second: jax.Array, teacher_first: jax.Array,
             teacher_second: jax.Array) -> jax.Array:
  """Flow of solution procedure: per example Σ_{i,j} (G_s − G_t)²_{ij}.

  G(F1, F2)[i, j] = Σ_{h,w} F1[h,w,i] · F2[h,w,j] / (H·W). When the two maps of a
  network differ in spatial size, the larger is average-pooled (PyTorch's
  adaptive windows) to the smaller's, as RepDistiller does.

  Args:
    student_first: [B, H1, W1, C1] float, the student's map at the start of a stage.
    student_second: [B, H2, W2, C2] float, at its end.
    teacher_first: [B, H1', W1', C1] float, a constant.
    teacher_second: [B, H2', W2', C2] float, a constant.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 2, 2, 3))
    >>> float(fsp_loss(x, x, x, x)[0])
    0.0
    >>> float(fsp_loss(x, x, x, 2 * x)[0])  # 9 entries of (1 − 2)²
    9.0

  References:
    Yim, Joo, Bae & Kim 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR.
  """
  maps = {"student_first": student_first, "student_second": student_second, "teacher_first": teacher_first,
          "teacher_second": teacher_second}
  for name, x in maps.items():
    _checks.rank(x, (4,), what="fsp_loss", name=f"{name} [B, H, W, C]")
  _floats("fsp_loss", **maps)
  _checks.same_batch(student_first, student_second, what="fsp_loss", names=("student_first", "student_second"))
  _checks.same_batch(teacher_first, teacher_second, what="fsp_loss", names=("teacher_first", "teacher_second"))
  student_g = (jnp.shape(student_first)[0], jnp.shape(student_first)[-1], jnp.shape(student_second)[-1])
  teacher_g = (jnp.shape(teacher_first)[0], jnp.shape(teacher_first)[-1], jnp.shape(teacher_second)[-1])
  if student_g != teacher_g:
    raise ValueError(f"fsp_loss: the student's FSP matrices [B, C1, C2] {student_g} (from shapes "
                     f"{jnp.shape(student_first)}, {jnp.shape(student_second)}) and the teacher's {teacher_g} (from "
                     f"{jnp.shape(teacher_first)}, {jnp.shape(teacher_second)}) must match")
  return _fsp(student_first, student_second, teacher_first, teacher_second)


def _channel_vectors(f: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C, H·W], each channel's map L2-normalised."""
  b, h, w, c = f.shape
  return _checks.l2_normalize(jnp.transpose(f.reshape(b, h * w, c), (0, 2, 1)))


@jax.jit
def _nst(s, t):
  s, t = _f32(s), _const(t)
  height, width = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
  s = _channel_vectors(_checks.adaptive_avg_pool(s, height, width))
  t = _channel_vectors(_checks.adaptive_avg_pool(t, height, width))

  def kernel(a, b):  # mean over channel pairs of (aᵀb)²
    return jnp.mean(jnp.square(jnp.einsum("bid,bjd->bij", a, b, precision=_HIGHEST)), axis=(1, 2))

  return kernel(s, s) + kernel(t, t) - 2.0 * kernel(s, t)


def nst_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """Neuron selectivity transfer: MMD² between channel maps with the polynomial kernel k(x, y) = (xᵀy)².

  Each channel's spatial map (a vector over H·W) is L2-normalised; per example,
  mean k(s_i, s_j) + mean k(t_i, t_j) − 2 mean k(s_i, t_j) over channel pairs.
  A spatially larger map is average-pooled to the smaller one's size.

  Args:
    student_features: [B, H, W, Cs] float.
    teacher_features: [B, H', W', Ct] float, a constant.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(12.0).reshape(1, 2, 2, 3)
    >>> abs(float(nst_loss(x, x)[0])) < 1e-6
    True

  References:
    Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    arXiv:1707.01219.
  """
  _checks.rank(student_features, (4,), what="nst_loss", name="student_features [B, H, W, C]")
  _checks.rank(teacher_features, (4,), what="nst_loss", name="teacher_features [B, H, W, C]")
  _checks.same_batch(student_features, teacher_features, what="nst_loss")
  _floats("nst_loss", student_features=student_features, teacher_features=teacher_features)
  return _nst(student_features, teacher_features)


@jax.jit(static_argnames="p")
def _factor_transfer(s, t, p):
  flat = lambda x: _checks.l2_normalize(x.reshape((x.shape[0], -1)))
  diff = flat(_f32(s)) - flat(_const(t))
  return jnp.mean(jnp.abs(diff) if p == 1 else jnp.square(diff), axis=1)


def factor_transfer_loss(student_factor: jax.Array, teacher_factor: jax.Array, *, p: int = 1) -> jax.Array:
  """Factor transfer: per example the mean over features of |n(F_s) − n(F_t)|^p.

  n is the L2 normalisation of the flattened factor. The factors are the outputs
  of FT's translator (student side, trained with this loss) and paraphraser
  (teacher side, pre-trained as an autoencoder and frozen): trainable connectors
  the caller applies first.

  Args:
    student_factor: [B, ...] float, the translator's output.
    teacher_factor: [B, ...] float, same shape, the paraphraser's factor (a constant).
    p: 1 (the paper's choice: the mean absolute difference) or 2 (the mean squared difference).

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(factor_transfer_loss(jnp.ones((1, 4)), 3 * jnp.ones((1, 4)))[0])
    0.0

  References:
    Kim, Park & Kwak 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS.
  """
  _checks.same_shape(student_factor, teacher_factor, what="factor_transfer_loss")
  _checks.rank(student_factor, (2, 3, 4, 5), what="factor_transfer_loss", name="factors [B, ...]")
  _floats("factor_transfer_loss", student_factor=student_factor, teacher_factor=teacher_factor)
  if p not in (1, 2):
    raise ValueError(f"factor_transfer_loss: p must be 1 or 2, got {p}")
  return _factor_transfer(student_factor, teacher_factor, p=p)


@jax.jit
def _activation_boundary(s, t, margin):
  s, t = _f32(s), _const(t)
  off = (s > -margin) & (t <= 0)  # teacher inactive, student not yet below −m
  on = (s <= margin) & (t > 0)  # teacher active, student not yet above +m
  per_neuron = jnp.where(off, jnp.square(s + margin), 0.0) + jnp.where(on, jnp.square(s - margin), 0.0)
  return jnp.sum(per_neuron.reshape((s.shape[0], -1)), axis=1)


def activation_boundary_loss(student_preact: jax.Array, teacher_preact: jax.Array, *,
                             margin: float = 1.0) -> jax.Array:
  """Activation boundaries: a squared hinge that puts each student pre-activation on the teacher's side of 0.

  Per neuron: (s + m)² where the teacher is off (t ≤ 0) but s > −m, and (s − m)²
  where the teacher is on (t > 0) but s ≤ m; summed over neurons, per example.
  The student's pre-activations come through AB's connector (1×1 conv + BN) to
  the teacher's width.

  Args:
    student_preact: [B, ...] float, the connector's output (before ReLU).
    teacher_preact: [B, ...] float, same shape, the teacher's pre-ReLU map (a constant).
    margin: m ≥ 0.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(activation_boundary_loss(jnp.array([[2.0, -2.0]]), jnp.array([[1.0, -1.0]]))[0])
    0.0
    >>> float(activation_boundary_loss(jnp.array([[0.5, 0.0]]), jnp.array([[1.0, -1.0]]))[0])
    1.25

  References:
    Heo, Lee, Yun & Choi 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI.
  """
  _checks.same_shape(student_preact, teacher_preact, what="activation_boundary_loss")
  _checks.rank(student_preact, (2, 3, 4, 5), what="activation_boundary_loss", name="pre-activations [B, ...]")
  _floats("activation_boundary_loss", student_preact=student_preact, teacher_preact=teacher_preact)
  return _activation_boundary(student_preact, teacher_preact, margin)


@jax.jit
def _vid(mean, t, variance):
  variance = _f32(variance)
  if variance.ndim == 1:
    variance = variance.reshape((1,) * (t.ndim - 1) + variance.shape)  # explicit broadcast over [B, ...]
  nll = 0.5 * (jnp.square(_const(t) - _f32(mean)) / variance + jnp.log(variance))
  return _per_example_mean(nll)


def vid_loss(predicted_mean: jax.Array, teacher_features: jax.Array, variance: jax.Array) -> jax.Array:
  """Variational information distillation: the Gaussian negative log-likelihood of the teacher's feature.

  Per example the mean over positions and channels of ½ · ((t − μ)² / σ² + log σ²)
  (the constant ½ log 2π dropped). μ and σ² come from VID's trainable regressor
  (kd_jax.models.connectors.VIDRegressor: μ from the student's feature, σ² =
  softplus(param) + eps per channel, both trained by this loss).

  Args:
    predicted_mean: [B, ..., C] float, the regressor's μ.
    teacher_features: [B, ..., C] float, same shape, a constant.
    variance: σ² > 0, [C] (per channel, the paper's choice) or the full [B, ..., C].

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.zeros((1, 3))
    >>> round(float(vid_loss(x, x, jnp.full((3,), jnp.e ** 2))[0]), 3)  # ½ log σ²
    1.0

  References:
    Ahn, Hu, Damianou, Lawrence & Dai 2019, "Variational Information Distillation for Knowledge Transfer",
    CVPR.
  """
  _checks.same_shape(predicted_mean, teacher_features, what="vid_loss", names=("predicted_mean", "teacher"))
  _checks.rank(teacher_features, (2, 3, 4, 5), what="vid_loss", name="teacher_features [B, ..., C]")
  _floats("vid_loss", predicted_mean=predicted_mean, teacher_features=teacher_features, variance=variance)
  shape = jnp.shape(teacher_features)
  if jnp.shape(variance) not in (shape[-1:], shape):
    raise ValueError(f"vid_loss: variance shape {jnp.shape(variance)} must be ({shape[-1]},) or the teacher's "
                     f"shape {shape}")
  return _vid(predicted_mean, teacher_features, variance)


def _as_map(x):
  x = _f32(x)
  return x.reshape((x.shape[0], 1, 1, x.shape[1])) if x.ndim == 2 else x


@jax.jit(static_argnames="levels")
def _hierarchical_context(student_features, teacher_features, levels):
  total = 0.0
  for s, t in zip(student_features, teacher_features):
    s, t = _as_map(s), jax.lax.stop_gradient(_as_map(t))
    loss, weight, total_weight = _per_example_mean(jnp.square(s - t)), 1.0, 1.0
    for level in levels:
      if level >= s.shape[1]:  # as ReviewKD: only levels coarser than the map's height
        continue
      weight /= 2.0
      pooled = lambda x: _checks.adaptive_avg_pool(x, level, level)
      loss = loss + weight * _per_example_mean(jnp.square(pooled(s) - pooled(t)))
      total_weight += weight
    total = total + loss / total_weight
  return total


def hierarchical_context_loss(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array], *,
                              levels: Sequence[int] = (4, 2, 1)) -> jax.Array:
  """ReviewKD's hierarchical context loss, summed over the stage pairs, per example.

  For each stage: the mean squared error of the full maps plus, for each pyramid
  level L < H (in order), the MSE of both maps average-pooled to L×L with weight
  1/2, 1/4, ...; the weighted sum is divided by the sum of the weights. The
  student features are the outputs of ReviewKD's fusion (attention-based fusion
  of the student's levels, kd_jax.models.connectors.ReviewKDFusion), already at
  the teacher's shapes.

  Args:
    student_features: a sequence of [B, H_i, W_i, C_i] (or [B, C_i], taken as 1×1 maps) float.
    teacher_features: the teacher's features at the same shapes, constants.
    levels: the pyramid's output sizes.

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> s, t = jnp.ones((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 2))
    >>> float(hierarchical_context_loss([s], [t])[0])  # (1 + ½ · 1 + ¼ · 1) / (1 + ½ + ¼)
    1.0

  References:
    Chen, Liu, Zhao & Jia 2021, "Distilling Knowledge via Knowledge Review", CVPR.
  """
  what = "hierarchical_context_loss"
  student_features, teacher_features = list(student_features), list(teacher_features)
  if not student_features or len(student_features) != len(teacher_features):
    raise ValueError(f"{what}: {len(student_features)} student features and {len(teacher_features)} teacher "
                     "features: need the same, non-zero number")
  for i, (s, t) in enumerate(zip(student_features, teacher_features)):
    _checks.same_shape(s, t, what=f"{what} (stage {i})")
    _checks.rank(s, (2, 4), what=what, name=f"stage {i} [B, H, W, C] or [B, C]")
    _floats(what, student=s, teacher=t)
  _checks.same_batch(student_features[0], student_features[-1], what=what, names=("first stage", "last stage"))
  levels = tuple(int(level) for level in levels)
  if any(level < 1 for level in levels):
    raise ValueError(f"{what}: levels must be positive, got {levels}")
  return _hierarchical_context(student_features, teacher_features, levels=levels)
