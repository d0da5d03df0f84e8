"""Trainable modules that feature-distillation methods put between student and teacher.

Each is a `flax.linen` module whose parameters are trained together with the
student's (put them in the same params tree, e.g. `{'student': ..., 'connector':
...}`, and give the whole tree to the optimizer); BatchNorm statistics, where
there are any, go to `batch_stats` like the zoo's. Inputs are NHWC; every module
takes `train` (BatchNorm mode; ignored by those without BN) and infers its input
channels from the input.

=====================  =====================================================  ==========================
module                 method / reference                                     output
=====================  =====================================================  ==========================
ConvReg                FitNets hint regressor (Romero et al. 2015);           [B, tH, tW, tC]
                       RepDistiller `models/util.py:ConvReg`
ABConnector            AB (Heo et al. 2019): ConvReg without ReLU, identity   [B, tH, tW, tC]
                       when the shapes already agree (RepDistiller
                       `Connector`)
OFDConnector           OFD (Heo et al. 2019): 1x1 conv + BN                   [B, H, W, tC]
                       (RepDistiller `ConnectorV2`)
Embed                  CRD (Tian et al. 2020): linear embedding, L2-normalised [B, dim]
                       (RepDistiller `Embed`)
Paraphraser            FT (Kim et al. 2018): teacher-side autoencoder          ([B,H,W,int(C*rate)],
                       (RepDistiller `Paraphraser`)                              [B,H,W,C])
Translator             FT: student-side encoder (RepDistiller `Translator`)    [B, H, W, int(tC*rate)]
VIDRegressor           VID (Ahn et al. 2019): mean regressor + per-channel    ([B,H,W,tC], [tC])
                       variance (RepDistiller `distiller_zoo/VID.py`)
ABF / ReviewKDFusion   ReviewKD (Chen et al. 2021): attention-based fusion     list of [B, tH_i, tW_i, tC_i]
                       (mdistiller `distillers/ReviewKD.py`)
=====================  =====================================================  ==========================

Initialisation follows the references (PyTorch defaults unless they set one).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models.layers import (
    adaptive_avg_pool,
    batch_norm,
    conv,
    kaiming_normal_fan_out,
    resize_nearest,
    torch_default_bias,
    torch_default_kernel,
    torch_linear,
)

__all__ = [
    "ConvReg",
    "ABConnector",
    "OFDConnector",
    "Embed",
    "Paraphraser",
    "Translator",
    "VIDRegressor",
    "ABF",
    "ReviewKDFusion",
    "adaptive_avg_pool",
    "resize_nearest",
]


# PyTorch's ConvTranspose2d computes its default init's fan-in from the *output* channels.
_torch_transposed_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def _hw(x: jax.Array) -> tuple[int, int]:
  return int(x.shape[1]), int(x.shape[2])


def _torch_conv(features, kernel, fan_in, **kwargs):
  """A conv with bias and PyTorch's default init (`nn.Conv2d(...)` without arguments)."""
  return conv(features, kernel, bias=True, kernel_init=torch_default_kernel, bias_init=torch_default_bias(fan_in),
              **kwargs)


class ConvReg(nn.Module):
  """FitNets' regressor: maps a student feature map onto the teacher's shape.

  As RepDistiller's `ConvReg(s_shape, t_shape)`, by the spatial sizes sH (student)
  and tH (teacher): sH == 2 tH: 3x3 conv, stride 2; 2 sH == tH: 4x4 transposed
  conv, stride 2; sH >= tH: a valid conv with kernel (1 + sH - tH, 1 + sW - tW),
  which is the 1x1 regressor when the sizes agree (`kernel_size=3` gives a
  3x3 'same' conv there instead). Then BN and, if `use_relu`, ReLU.

  Attributes:
    out_channels: tC.
    out_hw: (tH, tW); None: the input's.
    kernel_size: 1 (FitNets/RepDistiller) or 3, used when the sizes agree.
    use_relu: ReLU after the BN (FitNets: True; AB: False).

  Call: x [B, sH, sW, sC] -> [B, tH, tW, tC].
  """

  out_channels: int
  out_hw: Sequence[int] | None = None
  kernel_size: int = 1
  use_relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    (sh, sw), cin = _hw(x), x.shape[-1]
    th, tw = (sh, sw) if self.out_hw is None else (int(self.out_hw[0]), int(self.out_hw[1]))
    if (sh, sw) == (th, tw) and self.kernel_size == 3:
      x = _torch_conv(self.out_channels, 3, 9 * cin, padding=1, name="conv")(x)
    elif sh == 2 * th:
      x = _torch_conv(self.out_channels, 3, 9 * cin, stride=2, padding=1, name="conv")(x)
    elif 2 * sh == th:
      # PyTorch ConvTranspose2d(k=4, s=2, p=1) doubles the size; Flax pads the dilated input by k - 1 - p.
      x = nn.ConvTranspose(
          self.out_channels, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
          kernel_init=_torch_transposed_kernel, bias_init=torch_default_bias(16 * self.out_channels), name="conv",
      )(x)
    elif sh >= th and sw >= tw:
      kh, kw = 1 + sh - th, 1 + sw - tw
      x = _torch_conv(self.out_channels, (kh, kw), kh * kw * cin, name="conv")(x)
    else:
      raise ValueError(f"ConvReg: cannot map student size {(sh, sw)} to teacher size {(th, tw)}")
    x = batch_norm(train, name="bn")(x)
    return nn.relu(x) if self.use_relu else x


class ABConnector(nn.Module):
  """AB's connector (RepDistiller `Connector`): identity if channels and height already match,
  else `ConvReg(use_relu=False)` (a 1x1 conv + BN when the sizes agree).

  Call: x [B, sH, sW, sC] -> [B, tH, tW, tC].
  """

  out_channels: int
  out_hw: Sequence[int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    th = x.shape[1] if self.out_hw is None else int(self.out_hw[0])
    if x.shape[-1] == self.out_channels and x.shape[1] == th:
      return x
    return ConvReg(self.out_channels, self.out_hw, use_relu=False, name="reg")(x, train=train)


class OFDConnector(nn.Module):
  """OFD's student-side connector (RepDistiller `ConnectorV2`): 1x1 conv (no bias) + BN.

  Call: x [B, H, W, sC] -> [B, H, W, tC].
  """

  out_channels: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = conv(self.out_channels, 1, kernel_init=kaiming_normal_fan_out, name="conv")(x)
    return batch_norm(train, name="bn")(x)


class Embed(nn.Module):
  """CRD's embedding head: flatten, linear to `dim`, L2-normalise each row.

  Call: x [B, ...] -> [B, dim] with unit L2 norm (if `normalize`).
  """

  dim: int = 128
  normalize: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = torch_linear(self.dim, x.shape[-1], name="linear")(x)
    if self.normalize:
      # RepDistiller divides by the norm itself; the floor only guards all-zero rows.
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x


def _ft_stage(x, features, use_bn, train, conv_name, bn_name, transpose=False):
  cin = x.shape[-1]
  if transpose:
    # ConvTranspose2d(k=3, s=1, p=1): same size; Flax pads by k - 1 - p = 1.
    x = nn.ConvTranspose(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_torch_transposed_kernel,
                         bias_init=torch_default_bias(9 * features), name=conv_name)(x)
  else:
    x = _torch_conv(features, 3, 9 * cin, padding=1, name=conv_name)(x)
  if use_bn:
    x = batch_norm(train, name=bn_name)(x)
  return nn.leaky_relu(x, 0.1)


class Paraphraser(nn.Module):
  """FT's paraphraser: a conv autoencoder on the teacher's feature (trained before distillation).

  Encoder: three 3x3 convs (C -> C -> int(C*rate) -> int(C*rate)), decoder: three
  3x3 transposed convs back to C; each followed by optional BN and LeakyReLU(0.1).

  Call: x [B, H, W, C] -> (factor [B, H, W, int(C*rate)], reconstruction [B, H, W, C]).
  """

  rate: float = 0.5
  use_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    c = x.shape[-1]
    k = int(c * self.rate)
    factor = x
    for i, width in enumerate((c, k, k)):
      factor = _ft_stage(factor, width, self.use_bn, train, f"encoder_{3 * i}", f"encoder_{3 * i + 1}")
    rec = factor
    for i, width in enumerate((k, c, c)):
      rec = _ft_stage(rec, width, self.use_bn, train, f"decoder_{3 * i}", f"decoder_{3 * i + 1}", transpose=True)
    return factor, rec


class Translator(nn.Module):
  """FT's translator: the student-side encoder onto the paraphraser's factor space.

  Three 3x3 convs (sC -> sC -> int(tC*rate) -> int(tC*rate)), each with optional BN and LeakyReLU(0.1).

  Call: x [B, H, W, sC] -> [B, H, W, int(teacher_channels * rate)].
  """

  teacher_channels: int
  rate: float = 0.5
  use_bn: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    k = int(self.teacher_channels * self.rate)
    for i, width in enumerate((x.shape[-1], k, k)):
      x = _ft_stage(x, width, self.use_bn, train, f"encoder_{3 * i}", f"encoder_{3 * i + 1}")
    return x


class VIDRegressor(nn.Module):
  """VID's variational regressor: the mean of a Gaussian over the teacher's feature, and its variance.

  The mean is 1x1 conv - ReLU - 1x1 conv - ReLU - 1x1 conv (no biases); the
  variance is softplus(log_scale) + eps per teacher channel, initialised to
  `init_pred_var`. The loss is 0.5 * mean((mu - t)^2 / var + log var); match
  spatial sizes first (VID average-pools the larger map: `adaptive_avg_pool`).

  Call: x [B, H, W, sC] -> (mean [B, H, W, tC], variance [tC]).
  """

  out_channels: int
  mid_channels: int | None = None  # RepDistiller: the teacher's channels
  init_pred_var: float = 5.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    mid = self.mid_channels or self.out_channels
    x = nn.relu(conv(mid, 1, kernel_init=torch_default_kernel, name="regressor_0")(x))
    x = nn.relu(conv(mid, 1, kernel_init=torch_default_kernel, name="regressor_2")(x))
    mean = conv(self.out_channels, 1, kernel_init=torch_default_kernel, name="regressor_4")(x)
    init = float(np.log(np.expm1(self.init_pred_var - self.eps)))
    log_scale = self.param("log_scale", nn.initializers.constant(init), (self.out_channels,))
    return mean, jax.nn.softplus(log_scale) + self.eps


class ABF(nn.Module):
  """ReviewKD's attention-based fusion of one student level with the residual from the level below.

  x -> 1x1 conv + BN to `mid_channels`; if `fuse`, the residual (upsampled,
  nearest, to x's size) and x are mixed by two sigmoid attention maps from a
  1x1 conv on their concatenation; resized (nearest) to `out_hw`; 3x3 conv + BN
  to `out_channels`.

  Call: (x [B, H, W, C], residual [B, h, w, mid] or None) ->
    (output [B, oH, oW, out_channels], new residual [B, oH, oW, mid]).
  """

  mid_channels: int
  out_channels: int
  fuse: bool

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None, *, out_hw: Sequence[int] | None = None,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    # kaiming_uniform_(a=1): U(-sqrt(3 / fan_in), sqrt(3 / fan_in)).
    kaiming_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
    x = conv(self.mid_channels, 1, kernel_init=kaiming_a1, name="conv1_0")(x)
    x = batch_norm(train, name="conv1_1")(x)
    if self.fuse:
      if residual is None:
        raise ValueError("ABF(fuse=True) needs the residual from the deeper level")
      residual = resize_nearest(residual, _hw(x))
      z = jnp.concatenate([x, residual], axis=-1)
      z = nn.sigmoid(_torch_conv(2, 1, z.shape[-1], name="att_conv_0")(z))
      x = x * z[..., 0:1] + residual * z[..., 1:2]
    if out_hw is not None:
      x = resize_nearest(x, out_hw)
    y = conv(self.out_channels, 3, padding=1, kernel_init=kaiming_a1, name="conv2_0")(x)
    y = batch_norm(train, name="conv2_1")(y)
    return y, x


class ReviewKDFusion(nn.Module):
  """ReviewKD's review mechanism over all student levels (mdistiller `ReviewKD.abfs`).

  Attributes:
    out_channels: teacher channels of each level, shallow to deep (the last one
      the pooled embedding's).
    mid_channels: width of the fused residual; mdistiller: min(512, channels of
      the student's last level). None: that default.
    out_hw: teacher spatial size of each level, shallow to deep (1 for the pooled
      level); None: the student's sizes.

  Call: features, a list of student features shallow to deep (e.g. `stage1..N`
  preacts then `pre_logits`; a [B, C] entry is treated as [B, 1, 1, C]) ->
  list of [B, out_hw_i, out_hw_i, out_channels_i], shallow to deep. The deepest
  level is transformed alone, each shallower one fused with the residual from
  the level below it.
  """

  out_channels: Sequence[int]
  mid_channels: int | None = None
  out_hw: Sequence[int | Sequence[int]] | None = None

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool = False) -> list[jax.Array]:
    features = [f[:, None, None, :] if f.ndim == 2 else f for f in features]
    if len(features) != len(self.out_channels):
      raise ValueError(f"ReviewKDFusion: {len(features)} student features for {len(self.out_channels)} teacher levels")
    mid = self.mid_channels or min(512, features[-1].shape[-1])
    outputs: list[jax.Array] = [None] * len(features)  # type: ignore[list-item]
    residual = None
    for i in reversed(range(len(features))):
      hw = None
      if self.out_hw is not None:
        size = self.out_hw[i]
        hw = (size, size) if isinstance(size, int) else tuple(size)
      deepest = i == len(features) - 1
      outputs[i], residual = ABF(mid, self.out_channels[i], fuse=not deepest, name=f"abf_{i}")(
          features[i], None if deepest else residual, out_hw=hw, train=train
      )
    return outputs

