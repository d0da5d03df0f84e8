"""Building blocks shared by the zoo: PyTorch-compatible convs, BN and initialisers.

The zoo reproduces PyTorch reference implementations (RepDistiller / CRD for
CIFAR, torchvision for ImageNet), so the layers here follow PyTorch's
conventions where they change results:

* explicit symmetric padding (PyTorch's `padding=p`), never Flax's 'SAME', whose
  stride-2 padding is asymmetric;
* BatchNorm with PyTorch's defaults (running average momentum 0.1, i.e. Flax
  `momentum=0.9`; epsilon 1e-5), statistics in the `batch_stats` collection.
  Under `jax.jit` with a batch sharded over devices the batch moments are those
  of the global batch (XLA inserts the cross-device reductions);
* initialisers equal in distribution to PyTorch's (`kaiming_normal_` with
  `mode='fan_out'`, and the default `kaiming_uniform_(a=sqrt(5))` of
  `nn.Conv2d` / `nn.Linear`).

Module names follow the PyTorch attribute names of the reference, with
`nn.Sequential` indices joined by '_' (`layer1.0.downsample.0` becomes the path
`layer1_0/downsample_0`), which is what lets `third_party/torch_models.py`
convert checkpoints without a per-model table.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., Any]

# torch.nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu'); also
# RepDistiller's `normal_(0, sqrt(2 / (k * k * out_channels)))`.
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default weight init for Conv2d and Linear: kaiming_uniform_(a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default bias init for Conv2d / Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    stride: int = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    bias: bool = False,
    kernel_init: Initializer = kaiming_normal_fan_out,
    bias_init: Initializer = nn.initializers.zeros,
    name: str | None = None,
) -> nn.Conv:
  """An `nn.Conv` behaving like `torch.nn.Conv2d(..., padding=padding, groups=groups)` on NHWC."""
  ph, pw = _pair(padding)
  return nn.Conv(
      features,
      _pair(kernel_size),
      strides=_pair(stride),
      padding=((ph, ph), (pw, pw)),
      feature_group_count=groups,
      use_bias=bias,
      kernel_init=kernel_init,
      bias_init=bias_init,
      name=name,
  )


def batch_norm(train: bool, *, name: str | None = None, zero_init: bool = False) -> nn.BatchNorm:
  """`torch.nn.BatchNorm2d` / `BatchNorm1d` with default arguments, on the last axis."""
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      use_fast_variance=False,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
      name=name,
  )


def torch_linear(features: int, fan_in: int, *, name: str | None = None) -> nn.Dense:
  """`torch.nn.Linear` with PyTorch's default initialisation."""
  return nn.Dense(features, kernel_init=torch_default_kernel, bias_init=torch_default_bias(fan_in), name=name)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C]."""
  return jnp.mean(x, axis=(1, 2))


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """`torch.nn.MaxPool2d(window, stride, padding)` (padding never wins the max)."""
  return nn.max_pool(x, (window, window), (stride, stride), ((padding, padding), (padding, padding)))


def avg_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """`torch.nn.AvgPool2d(window, stride, padding)` (zero padding counted, as PyTorch's default)."""
  return nn.avg_pool(
      x, (window, window), (stride, stride), ((padding, padding), (padding, padding)), count_include_pad=True
  )


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet's channel shuffle on NHWC: channel g*(C/g)+j moves to j*g+g'.

  Same permutation as PyTorch's `view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)` on NCHW.
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, groups, c // groups)
  x = jnp.swapaxes(x, 3, 4)
  return x.reshape(b, h, w, c)


def output(logits: jax.Array, features: dict[str, jax.Array], return_features: bool):
  return (logits, features) if return_features else logits


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """`torch.nn.functional.interpolate(x, size, mode='nearest')` on NHWC: source index floor(i * in / out)."""
  h, w = int(size[0]), int(size[1])
  if x.shape[1:3] == (h, w):
    return x
  rows = (jnp.arange(h) * x.shape[1]) // h
  cols = (jnp.arange(w) * x.shape[2]) // w
  return x[:, rows][:, :, cols]


def adaptive_avg_pool(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """`torch.nn.functional.adaptive_avg_pool2d(x, size)` on NHWC.

  Output cell i averages input rows floor(i * H / h) .. ceil((i + 1) * H / h) - 1
  (and likewise for columns), PyTorch's binning, also when H is not a multiple of h.
  """
  h, w = int(size[0]), int(size[1])
  big_h, big_w = x.shape[1], x.shape[2]
  if (big_h, big_w) == (h, w):
    return x
  if big_h % h == 0 and big_w % w == 0:
    b, c = x.shape[0], x.shape[3]
    return x.reshape(b, h, big_h // h, w, big_w // w, c).mean(axis=(2, 4))

  def bins(n_in, n_out):
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]

  rows = [jnp.mean(x[:, r0:r1], axis=1) for r0, r1 in bins(big_h, h)]  # each [B, W, C]
  x = jnp.stack(rows, axis=1)
  cols = [jnp.mean(x[:, :, c0:c1], axis=2) for c0, c1 in bins(big_w, w)]
  return jnp.stack(cols, axis=2)
