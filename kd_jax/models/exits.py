"""Early exits on any zoo model: the architecture of self-distillation (BYOT) and multi-exit networks.

`with_exits` wraps a registered model and attaches an exit to each named stage
feature: global average pooling, a bottleneck projecting to the width of the
model's `pre_logits` (so shallow features can be compared with the deepest),
ReLU, and a classifier. `bottleneck=False` makes each exit a linear classifier
on the pooled stage feature (`exit_<stage>` is then that feature): cheaper
exits, for multi-exit networks whose early exits should cost less than the final. Features add `exit_<stage>` [B, D] and
`exit_<stage>_logits` [B, classes]; the wrapped model's own features and logits
are unchanged (its logits are the deepest exit). The evaluation reports each
exit's test accuracy as `test_accuracy/exit_<stage>` and its cost (FLOPs and
params up to it) in the result's `cost` (`eval_heads`; kd_jax/train/stages.py).

  model = kd_jax.models.create("with_exits", num_classes=100, base="resnet8",
                               stages=("stage1", "stage2"))
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import create, register


class WithExits(nn.Module):
  base: nn.Module
  stages: Sequence[str]
  num_classes: int
  bottleneck: bool = True

  @property
  def eval_heads(self) -> tuple[str, ...]:
    """Features holding other predictions [B, classes] of the model, evaluated besides its logits."""
    return tuple(f"exit_{stage}_logits" for stage in self.stages)

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    logits, features = self.base(x, train=train, return_features=True)
    missing = [s for s in self.stages if s not in features]
    if missing:
      raise KeyError(f"cannot attach exits to {missing}: the base model's features are {sorted(features)}")
    width = features["pre_logits"].shape[-1]
    out = dict(features)
    for stage in self.stages:
      pooled = features[stage]
      if pooled.ndim == 4:
        pooled = jnp.mean(pooled, axis=(1, 2))
      hidden = nn.relu(nn.Dense(width, name=f"{stage}_bottleneck")(pooled)) if self.bottleneck else pooled
      out[f"exit_{stage}"] = hidden
      out[f"exit_{stage}_logits"] = nn.Dense(self.num_classes, name=f"{stage}_classifier")(hidden)
    return (logits, out) if return_features else logits


@register("with_exits", input_shape=None)
def with_exits(*, num_classes: int, base: str, stages: Sequence[str] = ("stage1", "stage2"),
               base_kwargs: Mapping[str, Any] | None = None, bottleneck: bool = True):
  return WithExits(create(base, num_classes=num_classes, **dict(base_kwargs or {})), tuple(stages), num_classes,
                   bool(bottleneck))
