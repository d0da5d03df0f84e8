"""SLA's joint classifier over (class, rotation) labels (Lee, Hwang & Shin 2020, "Self-supervised Label
Augmentation via Input Transformations", ICML).

`sla` wraps a zoo model built with K·M outputs (M = 4 rotations by 0, 90, 180,
270 degrees of square images, `jnp.rot90` on the spatial axes, before an MLP
flattens them): its head is the joint classifier over the labels (class y,
rotation j) -> y · M + j. In training the M rotated copies of the batch go
through the base as one batch of M·B (BatchNorm statistics over all of them, as
in the paper); in inference each rotation is its own call (same weights), so a
caller that needs only the unrotated input's outputs computes only those.

Features (besides the base's own, on the unrotated input):
  joint_logits       [B, M, K·M]  the joint classifier on each rotation j of the input
  aggregated_logits  [B, K]       (1 / M) Σ_j joint_logits[:, j, k·M + j] (SLA+AG, `losses.sla_aggregated_logits`)
  single_logits      [B, K]       joint_logits[:, 0, k·M] (SLA+SI: the unrotated input, no aggregation)
  sd_logits          [B, K]       the self-distilled head, a Dense on the base's `pre_logits` of the unrotated
                                  input (SLA+SD), which the `sla` term trains to match the aggregate

The model's logits are `output`'s: "sd" (default: one forward pass at test),
"aggregated" (M passes) or "single". The parameters do not depend on `output`;
`sd_head=False` (SLA without SD) has no SD head.
The evaluation reports each of the three as `test_accuracy/<name>` (`eval_heads`).

  model = kd_jax.models.create("sla", num_classes=10, base="mlp_800")
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.models import create, register

OUTPUTS = ("sd", "aggregated", "single")


def rotate(x, k: int):
  """Images [B, H, W, C] rotated by k · 90 degrees (H == W)."""
  return jnp.rot90(x, k, axes=(1, 2))


class SelfSupervisedLabelAugmentation(nn.Module):
  base: nn.Module  # built with num_classes · rotations outputs
  num_classes: int
  rotations: int = 4
  output: str = "sd"
  sd_head: bool = True  # False: SLA alone (no self-distilled head to train or to report)

  @property
  def eval_heads(self) -> tuple[str, ...]:
    return ("aggregated_logits", "single_logits") + (("sd_logits",) if self.sd_head else ())

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
      raise ValueError(f"sla: rotations need square images [B, H, W, C] with H == W, got inputs of shape {x.shape}")
    b = x.shape[0]
    sd_head = nn.Dense(self.num_classes, name="sd_head") if self.sd_head else None
    need_rotations = train or return_features or self.output != "sd"
    if not need_rotations:  # inference of the SD head alone: the unrotated input only
      _, features = self.base(x, train=train, return_features=True)
      return sd_head(features["pre_logits"])
    if train:
      stacked = jnp.concatenate([rotate(x, j) for j in range(self.rotations)])
      joint, features = self.base(stacked, train=train, return_features=True)
      joint = jnp.reshape(joint, (self.rotations, b) + joint.shape[1:])
      features = {name: value[:b] for name, value in features.items()}  # the unrotated input's
    else:
      joint, features = self.base(x, train=train, return_features=True)
      joint = jnp.stack([joint] + [self.base(rotate(x, j), train=train) for j in range(1, self.rotations)])
    features = dict(features)
    # From the unrotated rows alone, so that inference of this head leaves the rotated passes out.
    features["single_logits"] = losses.sla_single_logits(joint[:1].transpose((1, 0, 2)), self.rotations)
    joint = jnp.transpose(joint, (1, 0, 2))  # [B, M, K·M]
    features["joint_logits"] = joint
    features["aggregated_logits"] = losses.sla_aggregated_logits(joint)
    if sd_head is not None:
      features["sd_logits"] = sd_head(features["pre_logits"])
    logits = features[f"{self.output}_logits"]
    return (logits, features) if return_features else logits


@register("sla", input_shape=None)
def sla(*, num_classes: int, base: str, output: str = "sd", sd_head: bool = True,
        base_kwargs: Mapping[str, Any] | None = None) -> SelfSupervisedLabelAugmentation:
  """SLA's joint (class, rotation) classifier on the zoo model `base` (see the module docstring);
  `sd_head=False` leaves out SLA+SD's head (then `output` is "aggregated" or "single")."""
  if output not in OUTPUTS:
    raise ValueError(f"sla: output must be one of {OUTPUTS}, got {output!r}")
  if output == "sd" and not sd_head:
    raise ValueError('sla: output="sd" needs the SD head; with sd_head=False use output="aggregated" or "single"')
  rotations = 4
  return SelfSupervisedLabelAugmentation(create(base, num_classes=num_classes * rotations,
                                                **dict(base_kwargs or {})), num_classes, rotations, output,
                                         bool(sd_head))
