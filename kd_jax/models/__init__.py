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

Your own models: `register` any constructor returning a linen module; one that
does not follow the protocol (no `return_features`) is wrapped by `create` in
`WithFeatures` (features: its submodules' outputs by module path, params under
'module'). NNX models go through `from_nnx`; a teacher trained elsewhere becomes
a teacher directory with `import_teacher`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax.nnx import bridge

from kd_jax.errors import ConfigError, same_definition

__all__ = ["register", "create", "names", "input_shape", "select_features", "ModelSpec", "same_definition",
           "WithFeatures", "capture", "module_paths", "feature_shapes", "from_nnx", "FromNNX", "import_teacher"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  constructor: Callable[..., nn.Module]
  input_shape: tuple[int, ...] | None  # one example, e.g. (32, 32, 3); None: any shape


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, input_shape: Sequence[int] | None):
  """Decorator: registers `constructor(num_classes=..., **kwargs) -> nn.Module` as model `name`.

  Registering the same constructor again (a re-imported config) replaces it; another
  constructor under a registered name is an error.
  """

  def wrap(constructor):
    shape = None if input_shape is None else tuple(input_shape)
    old = _REGISTRY.get(name)
    if old is not None and not (same_definition(old.constructor, constructor) and old.input_shape == shape):
      raise ValueError(f"model {name!r} is already registered (by {_describe(old.constructor)}, input_shape "
                       f"{old.input_shape}); register {_describe(constructor)} under another name")
    _REGISTRY[name] = ModelSpec(name, constructor, shape)
    return constructor

  return wrap


def _describe(fn: Any) -> str:
  code = getattr(fn, "__code__", None)
  where = f" at {code.co_filename}:{code.co_firstlineno}" if code is not None else ""
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}{where}"


def _unknown(name: str) -> ValueError:

  close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  return ConfigError(f"unknown model {name!r}.{hint} Known models: {', '.join(names())}")


def spec(name: str) -> ModelSpec:
  if name not in _REGISTRY:
    raise _unknown(name)
  return _REGISTRY[name]


def create(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
  """Returns the registered model `name` with `num_classes` outputs, in the zoo protocol.

  A module that does not take `return_features` is wrapped in `WithFeatures(module)`
  (its features: every submodule's output, by module path); an `nnx.bridge.ToLinen`
  becomes a `FromNNX` (the same, for the NNX module's attributes).
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  module = spec(name).constructor(num_classes=num_classes, **kwargs)
  if not isinstance(module, nn.Module):
    raise ValueError(f"model {name!r}: its constructor returned a {type(module).__name__}, not a flax.linen "
                     "Module (an NNX model goes through kd_jax.models.from_nnx)")
  module = as_protocol(module)
  try:
    hash(module)
  except TypeError as e:
    bad = [f.name for f in dataclasses.fields(module) if not _hashable(getattr(module, f.name, None))]
    raise ValueError(f"model {name!r}: the module is not hashable (the engine's jitted steps take it as a static "
                     f"argument); attributes {bad or '(nested)'} hold lists or dicts: convert them in the "
                     "constructor (tuple(widths), flax.core.FrozenDict(options))") from e
  return module


def _hashable(value: Any) -> bool:
  try:
    hash(value)
    return True
  except TypeError:
    return False


def as_protocol(module: nn.Module) -> nn.Module:
  """`module` itself if it takes `return_features`, else wrapped so that it does (see `create`)."""
  if isinstance(module, bridge.ToLinen):
    return from_nnx(module.nnx_class, *module.args, **dict(module.kwargs))
  return module if follows_protocol(module) else WithFeatures(module)


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
from kd_jax.models.features import (  # noqa: E402,F401
    WithFeatures, capture, feature_shapes, follows_protocol, module_paths)
from kd_jax.models.nnx_bridge import FromNNX, from_nnx, nnx_feature_paths  # noqa: E402,F401
from kd_jax.models.teachers import import_teacher  # noqa: E402,F401
from kd_jax.models import quantized  # noqa: E402,F401  (quantized distillation's k-bit version of a zoo model)
from kd_jax.models import residual  # noqa: E402,F401  (a student with a residual-error assistant)
from kd_jax.models import blockwise  # noqa: E402,F401  (progressive blockwise KD's hybrid MLPs)
