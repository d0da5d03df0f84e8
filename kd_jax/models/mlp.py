"""Multi-layer perceptrons for MNIST (Hinton et al. 2015, section 3)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import register


class MLP(nn.Module):
  """ReLU MLP on flattened inputs.

  Features: `stageK_preact` / `stageK` (hidden layer K before / after its ReLU,
  [B, width_K]) and `pre_logits` (the last hidden layer, after ReLU).
  """

  num_classes: int
  widths: Sequence[int] = (800, 800)
  dropout: float = 0.0  # on hidden units
  input_dropout: float = 0.0  # on input pixels (Hinton's teacher used 20%)

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    features = {}
    x = x.reshape((x.shape[0], -1))
    x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)  # bf16 inputs stay bf16
    x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
    for i, width in enumerate(self.widths, start=1):
      x = nn.Dense(width, name=f"dense{i}")(x)
      features[f"stage{i}_preact"] = x
      x = nn.relu(x)
      features[f"stage{i}"] = x
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    features["pre_logits"] = features[f"stage{len(self.widths)}"]
    logits = nn.Dense(self.num_classes, name="head")(x)
    return (logits, features) if return_features else logits


@register("mlp", input_shape=None)
def mlp(*, num_classes: int, widths: Sequence[int] = (800, 800), dropout: float = 0.0, input_dropout: float = 0.0):
  return MLP(num_classes=num_classes, widths=tuple(widths), dropout=dropout, input_dropout=input_dropout)


@register("mlp_1200", input_shape=None)
def mlp_1200(*, num_classes: int, dropout: float = 0.5, input_dropout: float = 0.2):
  """Hinton et al. 2015's teacher: 784-1200-1200-10, dropout 50% hidden / 20% input."""
  return MLP(num_classes=num_classes, widths=(1200, 1200), dropout=dropout, input_dropout=input_dropout)


@register("mlp_800", input_shape=None)
def mlp_800(*, num_classes: int, dropout: float = 0.0, input_dropout: float = 0.0):
  """Hinton et al. 2015's student: 784-800-800-10, no regularisation."""
  return MLP(num_classes=num_classes, widths=(800, 800), dropout=dropout, input_dropout=input_dropout)
