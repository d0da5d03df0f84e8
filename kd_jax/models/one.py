"""ONE's multi-branch network (Lan, Zhu & Gong 2018, "Knowledge Distillation by On-the-Fly Native Ensemble").

`one` rebuilds a zoo model as a shared trunk (its low layers), m branches (each
its own copy of the high layers and classifier) and a gate that weights the
branches from the trunk's pooled output. As in the authors' code
(github.com/Lan1991Xu/ONE_NeurIPS2018, `models/cifar/resnet.py`), the gate is
Dense -> BatchNorm -> ReLU, and the softmax over its scores gives the weights of
the ensemble Σ_m softmax(gate)_m · z_m (`losses.gated_ensemble_logits`):

  * MLPs (`mlp`, `mlp_800`, `mlp_1200`): the first `shared_layers` hidden layers
    are the trunk; each branch has the remaining hidden layers and the head.
  * ResNets: the stem and all stages but the last are the trunk; each branch has
    the last stage, the pooling and the classifier (ResNet-32/110 in the paper).

Features: the trunk's own features (`stage1`, ..., as the base names them),
branch 0's (`stageN`, `pre_logits`), `branch_<m>_logits` [B, K] and
`branch_<m>_pre_logits` [B, D] for every branch, `gate_logits` [B, m] (before
the softmax) and `ensemble_logits` [B, K]. With `gate=False` (a plain
multi-branch network, as OKDDip's) there is no gate, and `ensemble_logits` is
the mean of the branches' logits.

The model's logits are branch 0's by default (`output="branch_0"`): a single
branch is the target network, of the base model's size and cost, which the
paper's main tables report ("ONE") and by which the authors' code picks its
checkpoint; `output="ensemble"` makes the logits the gated ensemble ("ONE-E",
all branches kept at test time). The parameters do not depend on `output`, so a
model trained with one can be evaluated with the other.

  model = kd_jax.models.create("one", num_classes=10, base="mlp_800", branches=3)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.models import create, register
from kd_jax.models.layers import batch_norm, conv, global_avg_pool, max_pool, torch_linear
from kd_jax.models.mlp import MLP
from kd_jax.models.resnet import ResNet

OUTPUTS = ("branch_0", "ensemble")


class _MLPPart(nn.Module):
  """Hidden layers `first..first+len(widths)-1` of an MLP (named `dense<i>` as in `MLP`), and its head if `head`."""

  widths: Sequence[int]
  first: int
  num_classes: int
  head: bool
  dropout: float = 0.0
  input_dropout: float | None = None  # on the input of the trunk only

  @nn.compact
  def __call__(self, x, train: bool):
    features = {}
    if self.input_dropout is not None:
      x = x.reshape((x.shape[0], -1))
      x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)
      x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
    for i, width in enumerate(self.widths, start=self.first):
      x = nn.Dense(width, name=f"dense{i}")(x)
      features[f"stage{i}_preact"] = x
      x = nn.relu(x)
      features[f"stage{i}"] = x
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if not self.head:
      return x, features
    features["pre_logits"] = features[f"stage{self.first + len(self.widths) - 1}"]
    return nn.Dense(self.num_classes, name="head")(x), features


class _ResNetPart(nn.Module):
  """Stages `first..last` (1-based) of a `ResNet`: with the stem if first == 1, with pooling and head if last is
  the last stage. Block and layer names are `ResNet`'s."""

  net: tuple[tuple[str, Any], ...]  # the base ResNet's hyper-parameters (its fields), as hashable pairs
  first: int
  last: int

  @nn.compact
  def __call__(self, x, train: bool):
    net, feats = dict(self.net), {}
    if self.first == 1:
      if net["imagenet_stem"]:
        x = conv(net["stem_width"], 7, stride=2, padding=3, name="conv1")(x)
      else:
        x = conv(net["stem_width"], 3, padding=1, name="conv1")(x)
      x = batch_norm(train, name="bn1")(x)
      feats["stem_preact"] = x
      x = nn.relu(x)
      feats["stem"] = x
      if net["imagenet_stem"]:
        x = max_pool(x, 3, 2, padding=1)
    for s in range(self.first, self.last + 1):
      n, planes = net["blocks_per_stage"][s - 1], net["widths"][s - 1]
      for j in range(n):
        block = net["block"](planes, stride=(1 if s == 1 else 2) if j == 0 else 1,
                             shortcut_name=net["shortcut_name"], zero_init_residual=net["zero_init_residual"],
                             conv_kind=net["conv_kind"], conv_groups=net["conv_groups"], name=f"layer{s}_{j}")
        x, preact = block(x, train)
      feats[f"stage{s}"] = x
      feats[f"stage{s}_preact"] = preact
    if self.last < len(net["blocks_per_stage"]):
      return x, feats
    x = global_avg_pool(x)
    feats["pre_logits"] = x
    return torch_linear(net["num_classes"], x.shape[-1], name=net["head_name"])(x), feats


class OnTheFlyNativeEnsemble(nn.Module):
  """A shared trunk, `branches` copies of the high layers, and a gate over them (see the module docstring)."""

  trunk: nn.Module
  branch: nn.Module  # a template, cloned once per branch as `branch_<m>`
  branches: int
  output: str = "branch_0"
  gate: bool = True

  @property
  def eval_heads(self) -> tuple[str, ...]:
    """The ensemble's logits, evaluated besides the model's output (branch 0, ONE's reported network)."""
    return ("ensemble_logits",)

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    shared, features = self.trunk(x, train)
    branch_logits = []
    for m in range(self.branches):
      logits, branch_features = self.branch.clone(name=f"branch_{m}", parent=self)(shared, train)
      branch_logits.append(logits)
      features[f"branch_{m}_logits"] = logits
      features[f"branch_{m}_pre_logits"] = branch_features["pre_logits"]
      if m == 0:
        features.update(branch_features)
    if self.gate:
      pooled = shared.reshape((shared.shape[0], -1)) if shared.ndim == 2 else global_avg_pool(shared)
      gate = nn.Dense(self.branches, name="gate_fc")(pooled)
      gate = nn.relu(batch_norm(train, name="gate_bn")(gate))
      ensemble = losses.gated_ensemble_logits(jnp.stack(branch_logits), gate)
      features["gate_logits"] = gate
    else:  # no gate (OKDDip's branches): the plain mean of the branches' logits
      ensemble = jnp.mean(jnp.stack(branch_logits).astype(jnp.float32), axis=0)
    features["ensemble_logits"] = ensemble
    logits = ensemble if self.output == "ensemble" else branch_logits[0]
    return (logits, features) if return_features else logits


def _split(base: nn.Module, num_classes: int, shared_layers: int | None):
  """(trunk, branch template) of a zoo model."""
  if isinstance(base, MLP):
    widths = tuple(base.widths)
    shared = len(widths) - 1 if shared_layers is None else shared_layers
    if not 1 <= shared < len(widths):
      raise ValueError(f"one: shared_layers must lie in [1, {len(widths) - 1}] for an MLP with hidden widths "
                       f"{list(widths)} (the trunk keeps at least one layer, each branch at least one), got {shared}")
    trunk = _MLPPart(widths[:shared], 1, num_classes, head=False, dropout=base.dropout,
                     input_dropout=base.input_dropout)
    branch = _MLPPart(widths[shared:], shared + 1, num_classes, head=True, dropout=base.dropout)
    return trunk, branch
  if isinstance(base, ResNet):
    stages = len(base.blocks_per_stage)
    if shared_layers not in (None, stages - 1):
      raise ValueError(f"one: a ResNet branches at its last stage (shared_layers={stages - 1}), got {shared_layers}")
    net = tuple((f, getattr(base, f)) for f in ("num_classes", "block", "blocks_per_stage", "widths", "stem_width",
                                                "imagenet_stem", "shortcut_name", "head_name", "zero_init_residual",
                                                "conv_kind", "conv_groups"))
    return _ResNetPart(net, 1, stages - 1), _ResNetPart(net, stages, stages)
  raise ValueError(f"one: cannot split a {type(base).__name__} into trunk and branches; supported bases are the "
                   "zoo's MLPs (mlp, mlp_800, mlp_1200) and ResNets (resnet8..110, resnet8x4, resnet32x4, ...)")


@register("one", input_shape=None)
def one(*, num_classes: int, base: str, branches: int = 3, shared_layers: int | None = None,
        output: str = "branch_0", base_kwargs: Mapping[str, Any] | None = None,
        gate: bool = True) -> OnTheFlyNativeEnsemble:
  """ONE's multi-branch version of the zoo model `base` (3 branches as in the paper); gate=False: no gate."""
  if not isinstance(branches, int) or branches < 2:
    raise ValueError(f"one: branches must be an int >= 2 (an ensemble needs two members), got {branches!r}")
  if output not in OUTPUTS:
    raise ValueError(f"one: output must be one of {OUTPUTS}, got {output!r}")
  trunk, branch = _split(create(base, num_classes=num_classes, **dict(base_kwargs or {})), num_classes,
                         shared_layers)
  return OnTheFlyNativeEnsemble(trunk, branch, branches, output, bool(gate))
