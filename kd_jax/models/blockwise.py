"""Hybrid teacher/student MLPs for progressive blockwise KD (Wang, Zhang, Luo, Xu & Wu 2018, "Progressive
Blockwise Knowledge Distillation for Neural Network Acceleration", IJCAI).

The teacher's blocks are replaced by cheaper student blocks one at a time. The
hybrid network of stage k has student blocks 1..k and the teacher's blocks
k+1..n; each student block keeps its teacher block's input and output widths,
so it drops into the same place. Here the teacher is an MLP (e.g. Hinton's
784-1200-1200-10) whose block i is hidden layer i (Dense + ReLU); student block
i is a low-rank (bottleneck) pair Dense(width_i → rank, no bias) → Dense(rank →
width_i) + ReLU: (in + width) · rank weights instead of in · width. The
classifier (`head`) stays the teacher's.

Param names: teacher blocks `dense<i>` and `head` exactly as in `MLP` (so a
stage starts from a trained teacher or the previous stage with `init_partial`),
student blocks `student_block<i>/{down,up}`. Features: `stage<i>` (block i's
output), `stage<i>_preact`, `pre_logits`, as `MLP`'s, so a stage's local loss
is a `hint` of the hybrid's `stage<k>` on the teacher's `stage<k>`.

  model = kd_jax.models.create("blockwise_mlp", num_classes=10, widths=[1200, 1200], rank=100, student_blocks=1)
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import register


class LowRankDense(nn.Module):
  """Dense(rank, no bias) then Dense(width): a rank-`rank` factorisation of a width-`width` Dense layer."""

  width: int
  rank: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.width, name="up")(nn.Dense(self.rank, use_bias=False, name="down")(x))


class BlockwiseMLP(nn.Module):
  """Student blocks 1..student_blocks, teacher blocks after them, the teacher's head (module docstring)."""

  num_classes: int
  widths: Sequence[int] = (1200, 1200)
  rank: int = 100
  student_blocks: int = 0

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    del train  # no dropout: the frozen teacher blocks run as at inference
    features = {}
    x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    for i, width in enumerate(self.widths, start=1):
      if i <= self.student_blocks:
        x = LowRankDense(width, self.rank, name=f"student_block{i}")(x)
      else:
        x = nn.Dense(width, name=f"dense{i}")(x)
      features[f"stage{i}_preact"] = x
      x = nn.relu(x)
      features[f"stage{i}"] = x
    features["pre_logits"] = x
    logits = nn.Dense(self.num_classes, name="head")(x)
    return (logits, features) if return_features else logits


@register("blockwise_mlp", input_shape=None)
def blockwise_mlp(*, num_classes: int, widths: Sequence[int] = (1200, 1200), rank: int = 100,
                  student_blocks: int = 0) -> BlockwiseMLP:
  """The hybrid of stage `student_blocks` (0: the teacher MLP itself; len(widths): all student blocks)."""
  widths = tuple(int(w) for w in widths)
  if not isinstance(student_blocks, int) or not 0 <= student_blocks <= len(widths):
    raise ValueError(f"blockwise_mlp: student_blocks must be an int in [0, {len(widths)}] (the number of hidden "
                     f"blocks, widths={list(widths)}), got {student_blocks!r}")
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"blockwise_mlp: rank must be a positive int, got {rank!r}")
  return BlockwiseMLP(num_classes=num_classes, widths=widths, rank=rank, student_blocks=student_blocks)
