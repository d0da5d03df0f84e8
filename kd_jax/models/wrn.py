"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

Layout of RepDistiller / CRD (github.com/HobbitLong/RepDistiller `models/wrn.py`):
pre-activation blocks (BN-ReLU-conv), depth = 6n + 4, widths (16, 16k, 32k, 64k);
where a block changes the width, its 1x1 shortcut conv reads the activated
input. A final BN-ReLU precedes the pooling.

Features (`return_features=True`), widen factor k:

=======================  ================
stem                     [B, 32, 32, 16]
stage1                   [B, 32, 32, 16k]
stage2                   [B, 16, 16, 32k]
stage3                   [B, 8, 8, 64k]
pre_logits               [B, 64k]
=======================  ================

The blocks are pre-activation, so a stage's output has not been through a ReLU.
As in RepDistiller's `preact=True` (and its `get_bn_before_relu`, used by OFD),
`stem_preact` / `stageK_preact` are the stage output after the BN that comes
next (the first BN of the next stage, or the final BN for `stage3`): the tensor
that the network's next ReLU reads. Shapes as the stage's.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from kd_jax.models import register
from kd_jax.models.layers import batch_norm, conv, global_avg_pool, output, torch_default_kernel


class WideBasicBlock(nn.Module):
  """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut.

  Returns (sum, bn1(x)): the second value is the BN output preceding the block's
  first ReLU, i.e. the pre-activation of the block's input.
  """

  out_planes: int
  stride: int
  drop_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    equal_in_out = x.shape[-1] == self.out_planes
    preact = batch_norm(train, name="bn1")(x)
    act = nn.relu(preact)
    out = conv(self.out_planes, 3, stride=self.stride, padding=1, name="conv1")(act)
    out = nn.relu(batch_norm(train, name="bn2")(out))
    if self.drop_rate > 0:
      out = nn.Dropout(self.drop_rate, deterministic=not train)(out)
    out = conv(self.out_planes, 3, padding=1, name="conv2")(out)
    if equal_in_out:
      shortcut = x
    else:
      shortcut = conv(self.out_planes, 1, stride=self.stride, name="convShortcut")(act)
    return shortcut + out, preact


class NetworkBlock(nn.Module):
  """A stage of `num_layers` blocks (named `layer_0..`). Returns (out, bn1 of the stage input)."""

  num_layers: int
  out_planes: int
  stride: int
  drop_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    input_preact = None
    for i in range(self.num_layers):
      x, preact = WideBasicBlock(self.out_planes, self.stride if i == 0 else 1, self.drop_rate, name=f"layer_{i}")(
          x, train
      )
      if i == 0:
        input_preact = preact
    return x, input_preact


class WideResNet(nn.Module):
  """WRN-depth-k for 32x32 inputs; `drop_rate` is the dropout inside each block (rng 'dropout')."""

  num_classes: int
  depth: int
  widen_factor: int
  drop_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    """x: [B, 32, 32, 3] -> logits [B, K] (and the features dict)."""
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got {self.depth}")
    n = (self.depth - 4) // 6
    k = self.widen_factor
    feats = {}
    x = conv(16, 3, padding=1, name="conv1")(x)
    feats["stem"] = x
    names = ["stem", "stage1", "stage2"]
    for s, (width, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
      x, input_preact = NetworkBlock(n, width, stride, self.drop_rate, name=f"block{s}")(x, train)
      feats[f"{names[s - 1]}_preact"] = input_preact
      feats[f"stage{s}"] = x
    x = batch_norm(train, name="bn1")(x)
    feats["stage3_preact"] = x
    x = global_avg_pool(nn.relu(x))
    feats["pre_logits"] = x
    # RepDistiller: default (PyTorch) weight init, zero bias.
    logits = nn.Dense(self.num_classes, kernel_init=torch_default_kernel, name="fc")(x)
    return output(logits, feats, return_features)


def _register(depth: int, k: int) -> None:
  def build(*, num_classes: int, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(num_classes=num_classes, depth=depth, widen_factor=k, drop_rate=drop_rate)

  build.__name__ = build.__qualname__ = f"wrn_{depth}_{k}"
  build.__doc__ = f"RepDistiller's WRN-{depth}-{k} for CIFAR."
  register(f"wrn_{depth}_{k}", input_shape=(32, 32, 3))(build)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
  _register(_depth, _k)
