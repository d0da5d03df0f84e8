"""Model zoo: pure flax.linen modules behind a name registry.

Every zoo model follows one protocol::

    model = kd_jax.models.create("resnet8x4", num_classes=100)
    variables = model.init(rng, x, train=False)
    logits = model.apply(variables, x, train=False)                    # [B, K]
    logits, feats = model.apply(variables, x, return_features=True)    # feats: dict name -> array
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": key})               # BN/dropout in training

Features are named `stage1..stageN` (each stage's output), `stageK_preact` (the
same before the final ReLU, where the block ends in one) and `pre_logits` (the
pooled embedding that feeds the classifier).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn

__all__ = ["register", "create", "names", "input_shape", "select_features", "ModelSpec"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  constructor: Callable[..., nn.Module]
  input_shape: tuple[int, ...] | None  # one example, e.g. (32, 32, 3); None: any shape


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, input_shape: Sequence[int] | None):
  """Decorator: registers `constructor(num_classes=..., **kwargs) -> nn.Module`."""

  def wrap(constructor):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelSpec(name, constructor, None if input_shape is None else tuple(input_shape))
    return constructor

  return wrap


def _unknown(name: str) -> ValueError:
  from kd_jax.train.config import ConfigError  # local: kd_jax.train imports the models

  close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  return ConfigError(f"unknown model {name!r}.{hint} Known models: {', '.join(names())}")


def spec(name: str) -> ModelSpec:
  if name not in _REGISTRY:
    raise _unknown(name)
  return _REGISTRY[name]


def create(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
  """Returns the registered model `name` with `num_classes` outputs."""
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return spec(name).constructor(num_classes=num_classes, **kwargs)


def names() -> list[str]:
  return sorted(_REGISTRY)


def input_shape(name: str) -> tuple[int, ...] | None:
  """The shape of one input example the model is built for (no batch axis); None if any."""
  return spec(name).input_shape


def select_features(features: Mapping[str, Any], wanted: Sequence[str], *, model: str = "model") -> dict[str, Any]:
  """Picks `wanted` from a features dict; a missing name is a clear error."""
  missing = [w for w in wanted if w not in features]
  if missing:
    raise KeyError(
        f"{model} has no feature(s) {missing}; available features: {sorted(features)}"
    )
  return {w: features[w] for w in wanted}


# Importing the families registers them.
from kd_jax.models import mlp  # noqa: E402,F401
from kd_jax.models import resnet  # noqa: E402,F401
from kd_jax.models import wrn  # noqa: E402,F401
from kd_jax.models import vgg  # noqa: E402,F401
from kd_jax.models import mobilenet  # noqa: E402,F401
from kd_jax.models import shufflenet  # noqa: E402,F401
from kd_jax.models import transformer  # noqa: E402,F401
from kd_jax.models import exits  # noqa: E402,F401  (early exits on any zoo model)
from kd_jax.models import one  # noqa: E402,F401  (ONE's multi-branch version of a zoo model)
from kd_jax.models import sla  # noqa: E402,F401  (SLA's joint (class, rotation) classifier on a zoo model)
from kd_jax.models import group  # noqa: E402,F401  (different zoo models trained side by side)
# Feature capture for modules outside the zoo.
from kd_jax.models.features import WithFeatures, capture, feature_shapes, module_paths  # noqa: E402,F401
from kd_jax.models import quantized  # noqa: E402,F401  (quantized distillation's k-bit version of a zoo model)
from kd_jax.models import residual  # noqa: E402,F401  (a student with a residual-error assistant)
from kd_jax.models import blockwise  # noqa: E402,F401  (progressive blockwise KD's hybrid MLPs)
