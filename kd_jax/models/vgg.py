"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, ICLR 2015), as in RepDistiller / CRD.

RepDistiller (github.com/HobbitLong/RepDistiller `models/vgg.py`; its names
`vgg8..vgg19` are the `_bn` variants) keeps VGG's conv configurations in five
blocks, drops the fully connected layers for one linear classifier on the
globally pooled 512 channels, and max-pools after blocks 0-2 only (after block 3
too for 64x64 inputs). Each block is conv3x3(+bias)-BN-ReLU repeated, the last
ReLU applied outside the block.

Features (`return_features=True`) for 32x32 inputs; every block ends in a ReLU,
so each has a `_preact` version (the BN output before it):

===========================  ================
stem, stem_preact (block0)   [B, 32, 32, 64]
stage1, stage1_preact        [B, 16, 16, 128]
stage2, stage2_preact        [B, 8, 8, 256]
stage3, stage3_preact        [B, 4, 4, 512]
stage4, stage4_preact        [B, 4, 4, 512]
pre_logits                   [B, 512]
===========================  ================
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from kd_jax.models import register
from kd_jax.models.layers import batch_norm, conv, global_avg_pool, max_pool, output

CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
  """VGG-BN: `blocks[b]` lists the conv widths of block b (named `block{b}_{3i}` / `_{3i+1}`)."""

  num_classes: int
  blocks: Sequence[Sequence[int]]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    """x: [B, H, W, 3] (H = 32 or 64) -> logits [B, K] (and the features dict)."""
    pool_after_block3 = x.shape[1] == 64
    feats = {}
    for b, widths in enumerate(self.blocks):
      if b > 0 and (b < 4 or pool_after_block3):
        x = max_pool(x, 2, 2)
      for i, width in enumerate(widths):
        if i > 0:
          x = nn.relu(x)
        # RepDistiller initialises conv biases to zero.
        x = conv(width, 3, padding=1, bias=True, name=f"block{b}_{3 * i}")(x)
        x = batch_norm(train, name=f"block{b}_{3 * i + 1}")(x)
      name = "stem" if b == 0 else f"stage{b}"
      feats[f"{name}_preact"] = x
      x = nn.relu(x)
      feats[name] = x
    x = global_avg_pool(x)
    feats["pre_logits"] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="classifier")(x)
    return output(logits, feats, return_features)


def _register(name: str) -> None:
  def build(*, num_classes: int) -> VGG:
    return VGG(num_classes=num_classes, blocks=CONFIGS[name])

  build.__name__ = build.__qualname__ = name
  build.__doc__ = f"RepDistiller's {name} (= its {name}_bn) for CIFAR."
  register(name, input_shape=(32, 32, 3))(build)


for _name in CONFIGS:
  _register(_name)
