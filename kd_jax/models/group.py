"""A group of different networks trained together as one model: online distillation between architectures.

The engine's peers (`row(peers=K)`) are K copies of one architecture, stacked
on a leading axis. `group` holds M members that may differ (a full-conv ResNet
and its cheap-conv version; an MLP and a narrower one), each with its own
params (`member_<m>`) and BatchNorm statistics, all run on the same batch in
one forward. Online terms read the members from the features (their `group`
option, e.g. `{"dml": {"group": "member"}}`, or `ffl`):

  * `member_<m>_logits` [B, K] for every member, and `member_<m>_<feature>` for
    each of member m's own features (`member_1_pre_logits`, `member_0_stage3`);
  * the output member's features unprefixed (`stage1`, `pre_logits`, ...);
  * `ensemble_logits` [B, K], the mean of the members' logits;
  * with `fusion="<feature>"` (FFL, Kim et al. 2019), `fused_logits` [B, K]:
    a fusion module takes the members' `<feature>` concatenated on the channel
    axis; for feature maps [B, H, W, C_m] (ResNets' `stage3`) a depthwise 3x3
    conv, BN, ReLU, a pointwise 1x1 conv to C_0 channels, BN, ReLU, global
    average pooling; for vectors [B, D_m] (MLPs' `pre_logits`) a Dense to D_0
    and ReLU; then a linear classifier (`fusion/...`). Its input is not
    stop-gradiented: the fused classifier's losses reach the members too.

The model's logits are member `output`'s (an int, 0 by default), or
"ensemble" or "fused". The parameters do not depend on `output`.

  model = kd_jax.models.create("group", num_classes=10, members=[
      {"model": "resnet8"}, {"model": "resnet8", "conv_kind": "depthwise"}])
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import create, register
from kd_jax.models.layers import batch_norm, conv, global_avg_pool, torch_linear


class Fusion(nn.Module):
  """FFL's fusion module and fused classifier over the members' features (see the module docstring)."""

  num_classes: int

  @nn.compact
  def __call__(self, features: Sequence, train: bool):
    shapes = [f.shape for f in features]
    if len({len(s) for s in shapes}) != 1 or len({s[:-1] for s in shapes}) != 1:
      raise ValueError(f"group: fusion needs the members' features to agree in all but the last (channel) axis, "
                       f"got shapes {shapes}")
    x = jnp.concatenate([f.astype(jnp.float32) for f in features], axis=-1)
    width = shapes[0][-1]
    if x.ndim == 4:
      x = conv(x.shape[-1], 3, padding=1, groups=x.shape[-1], name="depthwise")(x)
      x = nn.relu(batch_norm(train, name="bn1")(x))
      x = conv(width, 1, name="pointwise")(x)
      x = nn.relu(batch_norm(train, name="bn2")(x))
      x = global_avg_pool(x)
    elif x.ndim == 2:
      x = nn.relu(nn.Dense(width, name="dense")(x))
    else:
      raise ValueError(f"group: fusion takes feature maps [B, H, W, C] or vectors [B, D], got shapes {shapes}")
    return torch_linear(self.num_classes, x.shape[-1], name="classifier")(x)


class Group(nn.Module):
  """M member networks, each its own params, on one batch; see the module docstring."""

  members: tuple[nn.Module, ...]  # templates, cloned as `member_<m>`
  num_classes: int
  output: int | str = 0
  fusion: str = ""  # the members' feature that FFL's fusion module takes ("" = no fusion)

  @property
  def eval_heads(self) -> tuple[str, ...]:
    """Every member's logits (and the fused classifier's), evaluated besides the model's output."""
    return tuple(f"member_{m}_logits" for m in range(len(self.members))) + (("fused_logits",) if self.fusion else ())

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    features, member_logits, member_features = {}, [], []
    for m, member in enumerate(self.members):
      logits, own = member.clone(name=f"member_{m}", parent=self)(x, train=train, return_features=True)
      member_logits.append(logits)
      member_features.append(own)
      features[f"member_{m}_logits"] = logits
      features.update({f"member_{m}_{name}": value for name, value in own.items()})
    if isinstance(self.output, int):
      features.update(member_features[self.output])
    features["ensemble_logits"] = jnp.mean(jnp.stack(member_logits).astype(jnp.float32), axis=0)
    if self.fusion:
      missing = [m for m, own in enumerate(member_features) if self.fusion not in own]
      if missing:
        raise KeyError(f"group: fusion={self.fusion!r}, but member(s) {missing} have no such feature; member 0's "
                       f"features: {sorted(member_features[0])}")
      features["fused_logits"] = Fusion(self.num_classes, name="fusion")(
          [own[self.fusion] for own in member_features], train)
    if self.output == "ensemble":
      logits = features["ensemble_logits"]
    elif self.output == "fused":
      logits = features["fused_logits"]
    else:
      logits = member_logits[self.output]
    return (logits, features) if return_features else logits


@register("group", input_shape=None)
def group(*, num_classes: int, members: Sequence[Mapping[str, Any]], output: int | str = 0,
          fusion: str = "") -> Group:
  """Zoo models trained side by side: members=[{"model": name, **its kwargs}, ...]."""
  if not isinstance(members, (list, tuple)) or not members:
    raise ValueError(f"group: members must be a non-empty list of {{'model': name, ...}} dicts, got {members!r}")
  modules = []
  for m, member in enumerate(members):
    member = dict(member) if isinstance(member, Mapping) or hasattr(member, "items") else None
    if member is None or "model" not in member:
      raise ValueError(f"group: members[{m}] must be a dict with a 'model' name (and that model's options), "
                       f"got {members[m]!r}")
    name = member.pop("model")
    if name == "group":
      raise ValueError(f"group: members[{m}] is itself a group; list its members instead")
    modules.append(create(name, num_classes=num_classes, **member))
  valid_outputs = list(range(len(modules))) + ["ensemble"] + (["fused"] if fusion else [])
  if isinstance(output, bool) or output not in valid_outputs:
    raise ValueError(f"group: output must be one of {valid_outputs} (a member's index, 'ensemble', or 'fused' with "
                     f"a fusion), got {output!r}")
  if not isinstance(fusion, str):
    raise ValueError(f"group: fusion must be a feature name of the members (e.g. 'pre_logits'), got {fusion!r}")
  return Group(tuple(modules), num_classes, output, fusion)
