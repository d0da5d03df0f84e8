"""MobileNets: V2 for CIFAR (as in RepDistiller / CRD) and V1 for ImageNet (as in DKD).

`MobileNetV2` (Sandler et al., CVPR 2018) follows RepDistiller's `mobile_half`
(github.com/HobbitLong/RepDistiller `models/mobilenetv2.py`, itself from
"Knowledge Distillation via Route Constrained Optimization"): width 0.5,
expansion 6, a stride-2 stem, every inverted residual keeps its 1x1 expansion
conv (also when the expansion is 1), the last 1x1 conv has 1280 channels.

Features for 32x32 inputs (stages are RepDistiller's `feat[1..4]`: the outputs
of inverted-residual groups 2, 3, 5 and 7). The groups end in a linear
bottleneck without ReLU, so, as with RepDistiller's `preact=True`,
`stageK_preact` is the same array as `stageK`:

=============================  ================
stem, stem_preact              [B, 16, 16, 16]
stage1 (= stage1_preact)       [B, 16, 16, 12]
stage2 (= stage2_preact)       [B, 8, 8, 16]
stage3 (= stage3_preact)       [B, 4, 4, 48]
stage4 (= stage4_preact)       [B, 2, 2, 160]
pre_logits                     [B, 1280]
=============================  ================

`MobileNetV1` (Howard et al., 2017) follows the ImageNet student of DKD
(Zhao et al., CVPR 2022; github.com/megvii-research/mdistiller
`mdistiller/models/imagenet/mobilenetv1.py`): 3x3 stem then 13 depthwise-
separable blocks, PyTorch default initialisation. Features for 224x224 inputs
(stages end at blocks 3, 5, 11 and 13, each ending in a ReLU):

=============================  ==================
stem, stem_preact              [B, 112, 112, 32]
stage1, stage1_preact          [B, 56, 56, 128]
stage2, stage2_preact          [B, 28, 28, 256]
stage3, stage3_preact          [B, 14, 14, 512]
stage4, stage4_preact          [B, 7, 7, 1024]
pre_logits                     [B, 1024]
=============================  ==================
"""
from __future__ import annotations

import flax.linen as nn
import jax

from kd_jax.models import register
from kd_jax.models.layers import (
    batch_norm,
    conv,
    global_avg_pool,
    output,
    torch_default_kernel,
    torch_linear,
)

# (expansion t, channels c, repeats n, stride s) before the width multiplier.
_V2_SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
               (None, 160, 3, 2), (None, 320, 1, 1))
_V2_STAGE_ENDS = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}  # group index -> feature


class InvertedResidual(nn.Module):
  """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (Sequential indices 0/1, 3/4, 6/7)."""

  out_channels: int
  stride: int
  expansion: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = x.shape[-1] * self.expansion
    out = conv(hidden, 1, name="conv_0")(x)
    out = nn.relu(batch_norm(train, name="conv_1")(out))
    out = conv(hidden, 3, stride=self.stride, padding=1, groups=hidden, name="conv_3")(out)
    out = nn.relu(batch_norm(train, name="conv_4")(out))
    out = conv(self.out_channels, 1, name="conv_6")(out)
    out = batch_norm(train, name="conv_7")(out)
    if self.stride == 1 and x.shape[-1] == self.out_channels:
      out = x + out
    return out


class MobileNetV2(nn.Module):
  """RepDistiller's CIFAR MobileNetV2 (`mobilenetv2_T_w(T=expansion, W=width)`)."""

  num_classes: int
  expansion: int = 6
  width: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    """x: [B, H, W, 3], H and W multiples of 32 -> logits [B, K] (and the features dict)."""
    feats = {}
    x = conv(int(32 * self.width), 3, stride=2, padding=1, name="conv1_0")(x)
    x = batch_norm(train, name="conv1_1")(x)
    feats["stem_preact"] = x
    x = nn.relu(x)
    feats["stem"] = x
    for g, (t, c, n, s) in enumerate(_V2_SETTING):
      for j in range(n):
        x = InvertedResidual(int(c * self.width), s if j == 0 else 1, t or self.expansion, name=f"blocks_{g}_{j}")(
            x, train
        )
      if g in _V2_STAGE_ENDS:
        feats[_V2_STAGE_ENDS[g]] = feats[_V2_STAGE_ENDS[g] + "_preact"] = x
    last = int(1280 * self.width) if self.width > 1.0 else 1280
    x = conv(last, 1, name="conv2_0")(x)
    x = nn.relu(batch_norm(train, name="conv2_1")(x))
    x = global_avg_pool(x)
    feats["pre_logits"] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="classifier_0")(x)
    return output(logits, feats, return_features)


@register("MobileNetV2", input_shape=(32, 32, 3))
def mobilenet_v2(*, num_classes: int, expansion: int = 6, width: float = 0.5) -> MobileNetV2:
  """RepDistiller's `mobile_half`: CIFAR MobileNetV2, width 0.5, expansion 6."""
  return MobileNetV2(num_classes=num_classes, expansion=expansion, width=width)


# (output channels, stride) of the 13 depthwise-separable blocks.
_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
              (512, 1), (1024, 2), (1024, 1))
_V1_STAGE_ENDS = {3: "stage1", 5: "stage2", 11: "stage3", 13: "stage4"}


class MobileNetV1(nn.Module):
  """ImageNet MobileNetV1 (DKD's student); blocks named `model_{i}_{0,1,3,4}` as mdistiller's `model.i.*`."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    """x: [B, 224, 224, 3] -> logits [B, K] (and the features dict)."""
    feats = {}
    x = conv(32, 3, stride=2, padding=1, kernel_init=torch_default_kernel, name="model_0_0")(x)
    x = batch_norm(train, name="model_0_1")(x)
    feats["stem_preact"] = x
    x = nn.relu(x)
    feats["stem"] = x
    for i, (c, s) in enumerate(_V1_BLOCKS, start=1):
      x = conv(x.shape[-1], 3, stride=s, padding=1, groups=x.shape[-1], kernel_init=torch_default_kernel,
               name=f"model_{i}_0")(x)
      x = nn.relu(batch_norm(train, name=f"model_{i}_1")(x))
      x = conv(c, 1, kernel_init=torch_default_kernel, name=f"model_{i}_3")(x)
      x = batch_norm(train, name=f"model_{i}_4")(x)
      if i in _V1_STAGE_ENDS:
        feats[_V1_STAGE_ENDS[i] + "_preact"] = x
      x = nn.relu(x)
      if i in _V1_STAGE_ENDS:
        feats[_V1_STAGE_ENDS[i]] = x
    x = global_avg_pool(x)
    feats["pre_logits"] = x
    logits = torch_linear(self.num_classes, x.shape[-1], name="fc")(x)
    return output(logits, feats, return_features)


@register("MobileNetV1", input_shape=(224, 224, 3))
def mobilenet_v1(*, num_classes: int) -> MobileNetV1:
  """DKD's ImageNet MobileNetV1 student."""
  return MobileNetV1(num_classes=num_classes)
