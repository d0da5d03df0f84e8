"""ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Three reference layouts share the blocks below:

* CIFAR ResNets of RepDistiller / CRD (Tian et al., ICLR 2020;
  github.com/HobbitLong/RepDistiller `models/resnet.py`): a 3x3 stem conv and
  three stages of BasicBlocks, depth = 6n + 2, filters (16, 16, 32, 64) or
  four times that for `resnet8x4` / `resnet32x4`. torchdistill's
  `resnet20/32/44/56/110` for CIFAR have the same layout.
* `ResNet50`, CRD's CIFAR teacher (`models/resnetv2.py`): a 3x3 stem with 64
  filters and four stages of Bottlenecks (3, 4, 6, 3) at 32x32 resolution.
* ImageNet `resnet18/34/50` in torchvision's layout (`torchvision.models.resnet`):
  7x7 stride-2 stem, 3x3 stride-2 max pool, four stages, stride on the 3x3 conv
  of the bottleneck (ResNet v1.5).

Features (`return_features=True`); every block ends in a ReLU, so each stage has
a `_preact` version (the residual sum before the last ReLU, as RepDistiller's
`preact=True`):

=========================  =====================  ======================  ==================
name                       resnet8..110 (x4)      ResNet50 (CIFAR)        resnet18/34 | 50
=========================  =====================  ======================  ==================
stem, stem_preact          [B,32,32,16 (32)]      [B,32,32,64]            [B,112,112,64]
stage1, stage1_preact      [B,32,32,16 (64)]      [B,32,32,256]           [B,56,56,64 | 256]
stage2, stage2_preact      [B,16,16,32 (128)]     [B,16,16,512]           [B,28,28,128 | 512]
stage3, stage3_preact      [B,8,8,64 (256)]       [B,8,8,1024]            [B,14,14,256 | 1024]
stage4, stage4_preact      --                     [B,4,4,2048]            [B,7,7,512 | 2048]
pre_logits                 [B,64 (256)]           [B,2048]                [B,512 | 2048]
=========================  =====================  ======================  ==================

(`stem` is the first conv-BN-ReLU; for ImageNet it is taken before the max pool.
These are RepDistiller's `feat[0..N]` in order.)

Cheap convolutions (Xie, Lin, Zhang & Luo 2019, "Training convolutional neural
networks with cheap convolutions and online distillation"): `conv_kind` swaps
every 3x3 conv of the blocks (the stem and the 1x1 convs stay) for
  * "group": a grouped 3x3 conv with `conv_groups` groups (1/g of the weights);
  * "depthwise": a depthwise 3x3 conv (one filter per input channel, with the
    stride) then a pointwise 1x1 conv to the output channels (`<name>/depthwise`,
    `<name>/pointwise`);
  * "full" (default): the standard conv.

  model = kd_jax.models.create("resnet8", num_classes=10, conv_kind="depthwise")
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from kd_jax.models import register
from kd_jax.models.layers import batch_norm, conv, global_avg_pool, max_pool, output, torch_linear

CONV_KINDS = ("full", "group", "depthwise")


class DepthwiseSeparable(nn.Module):
  """A depthwise k x k conv (groups = input channels, with the stride), then a pointwise 1x1 conv."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = conv(channels, self.kernel_size, stride=self.stride, padding=self.padding, groups=channels,
             name="depthwise")(x)
    return conv(self.features, 1, name="pointwise")(x)


def block_conv(kind: str, groups: int, features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
               name: str):
  """A block's k x k conv of the given kind ("full", "group", "depthwise"); 1x1 convs stay full."""
  if kernel_size == 1 or kind == "full":
    return conv(features, kernel_size, stride=stride, padding=padding, name=name)
  if kind == "group":
    return conv(features, kernel_size, stride=stride, padding=padding, groups=groups, name=name)
  if kind == "depthwise":
    return DepthwiseSeparable(features, kernel_size, stride, padding, name=name)
  raise ValueError(f"conv_kind must be one of {CONV_KINDS}, got {kind!r}")


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection. Returns (relu(sum), sum)."""

  planes: int
  stride: int = 1
  shortcut_name: str = "downsample"  # RepDistiller/torchvision: downsample; resnetv2: shortcut
  zero_init_residual: bool = False
  conv_kind: str = "full"
  conv_groups: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    kind = (self.conv_kind, self.conv_groups)
    out = block_conv(*kind, self.planes, 3, stride=self.stride, padding=1, name="conv1")(x)
    out = nn.relu(batch_norm(train, name="bn1")(out))
    out = block_conv(*kind, self.planes, 3, padding=1, name="conv2")(out)
    out = batch_norm(train, name="bn2", zero_init=self.zero_init_residual)(out)
    preact = out + _shortcut(self, x, self.planes * self.expansion, train)
    return nn.relu(preact), preact


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, residual. Returns (relu(sum), sum)."""

  planes: int
  stride: int = 1
  shortcut_name: str = "downsample"
  zero_init_residual: bool = False
  conv_kind: str = "full"
  conv_groups: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    out = conv(self.planes, 1, name="conv1")(x)
    out = nn.relu(batch_norm(train, name="bn1")(out))
    out = block_conv(self.conv_kind, self.conv_groups, self.planes, 3, stride=self.stride, padding=1,
                     name="conv2")(out)
    out = nn.relu(batch_norm(train, name="bn2")(out))
    out = conv(self.planes * self.expansion, 1, name="conv3")(out)
    out = batch_norm(train, name="bn3", zero_init=self.zero_init_residual)(out)
    preact = out + _shortcut(self, x, self.planes * self.expansion, train)
    return nn.relu(preact), preact


def _shortcut(block: nn.Module, x: jax.Array, out_channels: int, train: bool) -> jax.Array:
  """Identity, or 1x1 conv + BN when the shape changes (named `<shortcut_name>_0/_1`)."""
  if block.stride == 1 and x.shape[-1] == out_channels:
    return x
  x = conv(out_channels, 1, stride=block.stride, name=f"{block.shortcut_name}_0")(x)
  return batch_norm(train, name=f"{block.shortcut_name}_1")(x)


class ResNet(nn.Module):
  """A ResNet: stem, stages of residual blocks, global average pool, linear head.

  Attributes:
    num_classes: K, the logits' size.
    block: `BasicBlock` or `Bottleneck`.
    blocks_per_stage: number of blocks in each stage; the first stage has stride 1,
      the others 2.
    widths: `planes` of each stage (the output has `planes * block.expansion` channels).
    stem_width: output channels of the stem conv.
    imagenet_stem: 7x7/2 conv + 3x3/2 max pool (torchvision) instead of a 3x3/1 conv.
    shortcut_name / head_name: parameter names, as in the reference's state dict.
    zero_init_residual: zero-initialise the last BN of each block (torchvision option).
    conv_kind / conv_groups: the blocks' 3x3 convs, "full", "group" (conv_groups
      groups) or "depthwise" (depthwise + pointwise); see the module docstring.
  """

  num_classes: int
  block: type[BasicBlock] | type[Bottleneck]
  blocks_per_stage: Sequence[int]
  widths: Sequence[int]
  stem_width: int
  imagenet_stem: bool = False
  shortcut_name: str = "downsample"
  head_name: str = "fc"
  zero_init_residual: bool = False
  conv_kind: str = "full"
  conv_groups: int = 1

  def __post_init__(self):
    check_conv_kind(self.conv_kind, self.conv_groups, self.stem_width, self.widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    """x: [B, H, W, 3] -> logits [B, K] (and the features dict)."""
    feats = {}
    if self.imagenet_stem:
      x = conv(self.stem_width, 7, stride=2, padding=3, name="conv1")(x)
    else:
      x = conv(self.stem_width, 3, padding=1, name="conv1")(x)
    x = batch_norm(train, name="bn1")(x)
    feats["stem_preact"] = x
    x = nn.relu(x)
    feats["stem"] = x
    if self.imagenet_stem:
      x = max_pool(x, 3, 2, padding=1)
    for s, (n, planes) in enumerate(zip(self.blocks_per_stage, self.widths), start=1):
      for j in range(n):
        block = self.block(
            planes,
            stride=(1 if s == 1 else 2) if j == 0 else 1,
            shortcut_name=self.shortcut_name,
            zero_init_residual=self.zero_init_residual,
            conv_kind=self.conv_kind,
            conv_groups=self.conv_groups,
            name=f"layer{s}_{j}",
        )
        x, preact = block(x, train)
      feats[f"stage{s}"] = x
      feats[f"stage{s}_preact"] = preact
    x = global_avg_pool(x)
    feats["pre_logits"] = x
    logits = torch_linear(self.num_classes, x.shape[-1], name=self.head_name)(x)
    return output(logits, feats, return_features)


def check_conv_kind(kind: str, groups: int, stem_width: int, widths) -> None:
  """A clear error for a conv kind the ResNet cannot take (unknown, or groups not dividing the channels)."""
  if kind not in CONV_KINDS:
    raise ValueError(f"resnet: conv_kind must be one of {CONV_KINDS}, got {kind!r}")
  if not isinstance(groups, int) or groups < 1:
    raise ValueError(f"resnet: conv_groups must be a positive int, got {groups!r}")
  if kind == "group":
    channels = [stem_width, *widths]
    if groups < 2 or any(c % groups for c in channels):
      raise ValueError(f"resnet: conv_kind='group' needs conv_groups >= 2 dividing every block's channels "
                       f"{channels}, got conv_groups={groups}")
  elif groups != 1:
    raise ValueError(f"resnet: conv_groups={groups} is for conv_kind='group', not {kind!r}")


def _cifar_resnet(depth: int, filters: Sequence[int], num_classes: int, **kwargs) -> ResNet:
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
  n = (depth - 2) // 6
  return ResNet(
      num_classes=num_classes,
      block=BasicBlock,
      blocks_per_stage=(n, n, n),
      widths=tuple(filters[1:]),
      stem_width=filters[0],
      **kwargs,
  )


_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)


def _register_cifar_resnet(depth: int) -> None:
  def build(*, num_classes: int, **kwargs) -> ResNet:
    return _cifar_resnet(depth, (16, 16, 32, 64), num_classes, **kwargs)

  build.__name__ = build.__qualname__ = f"resnet{depth}"
  build.__doc__ = f"RepDistiller's CIFAR resnet{depth}: BasicBlocks, filters 16-16-32-64."
  register(f"resnet{depth}", input_shape=_CIFAR)(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
  _register_cifar_resnet(_depth)


@register("resnet8x4", input_shape=_CIFAR)
def resnet8x4(*, num_classes: int, **kwargs) -> ResNet:
  """RepDistiller's resnet8x4 (CRD's student): depth 8, filters 32-64-128-256."""
  return _cifar_resnet(8, (32, 64, 128, 256), num_classes, **kwargs)


@register("resnet32x4", input_shape=_CIFAR)
def resnet32x4(*, num_classes: int, **kwargs) -> ResNet:
  """RepDistiller's resnet32x4 (CRD's teacher): depth 32, filters 32-64-128-256."""
  return _cifar_resnet(32, (32, 64, 128, 256), num_classes, **kwargs)


@register("ResNet50", input_shape=_CIFAR)
def resnet50_cifar(*, num_classes: int, **kwargs) -> ResNet:
  """CRD's CIFAR ResNet50 teacher (RepDistiller `resnetv2.ResNet50`): Bottlenecks 3-4-6-3, 3x3 stem."""
  return ResNet(
      num_classes=num_classes, block=Bottleneck, blocks_per_stage=(3, 4, 6, 3), widths=(64, 128, 256, 512),
      stem_width=64, shortcut_name="shortcut", head_name="linear", **kwargs,
  )


@register("resnet18", input_shape=_IMAGENET)
def resnet18(*, num_classes: int, **kwargs) -> ResNet:
  """torchvision's resnet18 (ImageNet)."""
  return ResNet(num_classes=num_classes, block=BasicBlock, blocks_per_stage=(2, 2, 2, 2),
                widths=(64, 128, 256, 512), stem_width=64, imagenet_stem=True, **kwargs)


@register("resnet34", input_shape=_IMAGENET)
def resnet34(*, num_classes: int, **kwargs) -> ResNet:
  """torchvision's resnet34 (ImageNet)."""
  return ResNet(num_classes=num_classes, block=BasicBlock, blocks_per_stage=(3, 4, 6, 3),
                widths=(64, 128, 256, 512), stem_width=64, imagenet_stem=True, **kwargs)


@register("resnet50", input_shape=_IMAGENET)
def resnet50(*, num_classes: int, **kwargs) -> ResNet:
  """torchvision's resnet50 (ImageNet; stride on the 3x3 conv, 'ResNet v1.5')."""
  return ResNet(num_classes=num_classes, block=Bottleneck, blocks_per_stage=(3, 4, 6, 3),
                widths=(64, 128, 256, 512), stem_width=64, imagenet_stem=True, **kwargs)
