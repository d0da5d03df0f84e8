"""ShuffleNet V1 and V2 for CIFAR, as in RepDistiller / CRD.

* `ShuffleV1` (Zhang et al., CVPR 2018; RepDistiller `models/ShuffleNetv1.py`):
  groups 3, stage widths (240, 480, 960) with (4, 8, 4) bottlenecks, a 1x1 stem
  with 24 channels and no stem pooling; each stage opens with a stride-2 block
  whose 3x3 average-pooled shortcut is concatenated.
* `ShuffleV2` (Ma et al., ECCV 2018; RepDistiller `models/ShuffleNetv2.py`):
  net size 1 (stage widths 116, 232, 464; 3, 7, 3 basic blocks after each
  down-sampling block), a 1x1 stem with 24 channels, a final 1x1 conv to 1024.

Both use PyTorch's default initialisation (the reference sets none).

Features for 32x32 inputs; every stage ends in a ReLU:

=========================  ===================  ===================
name                       ShuffleV1            ShuffleV2
=========================  ===================  ===================
stem, stem_preact          [B, 32, 32, 24]      [B, 32, 32, 24]
stage1, stage1_preact      [B, 16, 16, 240]     [B, 16, 16, 116]
stage2, stage2_preact      [B, 8, 8, 480]       [B, 8, 8, 232]
stage3, stage3_preact      [B, 4, 4, 960]       [B, 4, 4, 464]
pre_logits                 [B, 960]             [B, 1024]
=========================  ===================  ===================

`stageK == relu(stageK_preact)` for both. (For ShuffleV2 RepDistiller returns
its pre-activation before the block's final channel shuffle; here it is
shuffled like the output, so the two line up channel by channel.)
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models import register
from kd_jax.models.layers import (
    avg_pool,
    batch_norm,
    channel_shuffle,
    conv,
    global_avg_pool,
    output,
    torch_default_kernel,
    torch_linear,
)


def _conv(features, kernel, **kwargs):
  return conv(features, kernel, kernel_init=torch_default_kernel, **kwargs)


class ShuffleV1Block(nn.Module):
  """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; add (stride 1) or concat (stride 2). Returns (out, preact)."""

  out_channels: int  # of the residual branch; stride-2 blocks concatenate the input's channels to it
  stride: int
  groups: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    mid = int(self.out_channels / 4)
    g = 1 if x.shape[-1] == 24 else self.groups  # the first block after the stem is not grouped
    out = _conv(mid, 1, groups=g, name="conv1")(x)
    out = nn.relu(batch_norm(train, name="bn1")(out))
    out = channel_shuffle(out, g)
    out = _conv(mid, 3, stride=self.stride, padding=1, groups=mid, name="conv2")(out)
    out = nn.relu(batch_norm(train, name="bn2")(out))
    out = _conv(self.out_channels, 1, groups=self.groups, name="conv3")(out)
    out = batch_norm(train, name="bn3")(out)
    if self.stride == 2:
      preact = jnp.concatenate([out, avg_pool(x, 3, 2, padding=1)], axis=-1)
    else:
      preact = out + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  num_classes: int
  stage_widths: Sequence[int] = (240, 480, 960)
  blocks_per_stage: Sequence[int] = (4, 8, 4)
  groups: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    """x: [B, 32, 32, 3] -> logits [B, K] (and the features dict)."""
    feats = {}
    x = _conv(24, 1, name="conv1")(x)
    x = batch_norm(train, name="bn1")(x)
    feats["stem_preact"] = x
    x = nn.relu(x)
    feats["stem"] = x
    for s, (width, n) in enumerate(zip(self.stage_widths, self.blocks_per_stage), start=1):
      for j in range(n):
        branch = width - x.shape[-1] if j == 0 else width
        x, preact = ShuffleV1Block(branch, 2 if j == 0 else 1, self.groups, name=f"layer{s}_{j}")(x, train)
      feats[f"stage{s}"] = x
      feats[f"stage{s}_preact"] = preact
    x = global_avg_pool(x)
    feats["pre_logits"] = x
    logits = torch_linear(self.num_classes, x.shape[-1], name="linear")(x)
    return output(logits, feats, return_features)


class ShuffleV2Block(nn.Module):
  """Split channels in half; 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU on one half; concat; shuffle."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    c = int(x.shape[-1] * 0.5)
    x1, x2 = x[..., :c], x[..., c:]
    out = _conv(c, 1, name="conv1")(x2)
    out = nn.relu(batch_norm(train, name="bn1")(out))
    out = _conv(c, 3, padding=1, groups=c, name="conv2")(out)
    out = batch_norm(train, name="bn2")(out)
    pre = batch_norm(train, name="bn3")(_conv(c, 1, name="conv3")(out))
    out = channel_shuffle(jnp.concatenate([x1, nn.relu(pre)], axis=-1), 2)
    preact = channel_shuffle(jnp.concatenate([x1, pre], axis=-1), 2)
    return out, preact


class ShuffleV2DownBlock(nn.Module):
  """Two stride-2 branches (depthwise-pointwise | pointwise-depthwise-pointwise), concat, shuffle."""

  out_channels: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cin, mid = x.shape[-1], self.out_channels // 2
    left = batch_norm(train, name="bn1")(_conv(cin, 3, stride=2, padding=1, groups=cin, name="conv1")(x))
    left = nn.relu(batch_norm(train, name="bn2")(_conv(mid, 1, name="conv2")(left)))
    right = nn.relu(batch_norm(train, name="bn3")(_conv(mid, 1, name="conv3")(x)))
    right = batch_norm(train, name="bn4")(_conv(mid, 3, stride=2, padding=1, groups=mid, name="conv4")(right))
    right = nn.relu(batch_norm(train, name="bn5")(_conv(mid, 1, name="conv5")(right)))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  num_classes: int
  stage_widths: Sequence[int] = (116, 232, 464)
  blocks_per_stage: Sequence[int] = (3, 7, 3)
  last_width: int = 1024

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    """x: [B, 32, 32, 3] -> logits [B, K] (and the features dict)."""
    feats = {}
    x = _conv(24, 1, name="conv1")(x)
    x = batch_norm(train, name="bn1")(x)
    feats["stem_preact"] = x
    x = nn.relu(x)
    feats["stem"] = x
    for s, (width, n) in enumerate(zip(self.stage_widths, self.blocks_per_stage), start=1):
      x = ShuffleV2DownBlock(width, name=f"layer{s}_0")(x, train)
      for j in range(1, n + 1):
        x, preact = ShuffleV2Block(name=f"layer{s}_{j}")(x, train)
      feats[f"stage{s}"] = x
      feats[f"stage{s}_preact"] = preact
    x = nn.relu(batch_norm(train, name="bn2")(_conv(self.last_width, 1, name="conv2")(x)))
    x = global_avg_pool(x)
    feats["pre_logits"] = x
    logits = torch_linear(self.num_classes, x.shape[-1], name="linear")(x)
    return output(logits, feats, return_features)


@register("ShuffleV1", input_shape=(32, 32, 3))
def shufflenet_v1(*, num_classes: int) -> ShuffleNetV1:
  """RepDistiller's ShuffleV1: groups 3, widths 240-480-960."""
  return ShuffleNetV1(num_classes=num_classes)


@register("ShuffleV2", input_shape=(32, 32, 3))
def shufflenet_v2(*, num_classes: int) -> ShuffleNetV2:
  """RepDistiller's ShuffleV2: net size 1, widths 116-232-464, 1024-channel last conv."""
  return ShuffleNetV2(num_classes=num_classes)
