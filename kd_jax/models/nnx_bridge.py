"""NNX models in the zoo protocol: `from_nnx(MyNet, num_classes=10, features={...})`.

Flax's NNX modules are stateful Python objects; the engine's models are linen
modules (pure `init`/`apply` over a variables pytree). `from_nnx` puts an NNX
class behind `flax.nnx.bridge.ToLinen`, which builds the NNX module from the
linen variables at each call and writes its state back, so an NNX model gets
what a linen one has: params under `'params'`, BatchNorm statistics under
`'batch_stats'` (updated in training through `mutable=["batch_stats"]`),
dropout keys from the `'dropout'` rng, sharding of the variables like any
other pytree. Features are recorded by `flax.nnx.capture` with
`method_outputs=nnx.Intermediate`: every submodule method's output, named by
its attribute path (`'conv1'`, `'blocks/0'`; a method other than `__call__`
as `'encoder:embed'`).

The NNX module's variables sit under the key 'module', as in `WithFeatures`:
`{'params': {'module': nnx_params}, 'batch_stats': {'module': ...}}`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import nnx
from flax.core import FrozenDict
from flax.nnx import bridge

from kd_jax.models.features import _pick, call_flag, feature_pairs, flag_kwargs

__all__ = ["from_nnx", "FromNNX", "nnx_feature_paths"]


def _path_name(path: tuple[Any, ...]) -> str:
  """('blocks', 0, '__call__') -> 'blocks/0'; ('encoder', 'embed') -> 'encoder:embed'."""
  *modules, method = path
  name = "/".join(str(p) for p in modules)
  return name if method == "__call__" else f"{name}:{method}"


def _recorded(intermediates) -> dict[str, list[Any]]:
  """{path name: [outputs in call order]} from what `nnx.capture` recorded (the root's own call left out)."""
  seen: dict[str, list[Any]] = {}
  for path, variable in nnx.to_flat_state(intermediates):
    if len(path) > 1:
      seen.setdefault(_path_name(tuple(path)), []).extend(variable.get_value())
  return seen


def _int_keys(tree: Any) -> Any:
  """Dict keys '0', '1', ... back to ints: checkpoints (orbax, msgpack) store NNX's list indices as strings."""
  if not isinstance(tree, Mapping):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


class _ToLinen(bridge.ToLinen):
  """`bridge.ToLinen` reading its variables with list indices as ints, whatever checkpoint they came from
  (with string keys ToLinen would warn of unknown paths and leave those layers at their fresh init)."""

  @property
  def variables(self):
    return {collection: _int_keys(tree) for collection, tree in super().variables.items()}


class FromNNX(nn.Module):
  """A linen module running the NNX class `nnx_class(*args, **kwargs, rngs=...)` in the zoo protocol.

  `__call__(x, *, train=False, return_features=False)`: logits, or (logits,
  {feature name: output}). Build it with `from_nnx`.

  Attributes:
    nnx_class: the NNX module class (or a function returning an instance) taking `rngs=`.
    args: its positional arguments (hashable).
    kwargs: its keyword arguments as (name, value) pairs.
    features: (name, attribute path) pairs; None: every submodule's output, by path.
    train_kwarg: the train flag of the NNX `__call__` ("auto": detected; 'deterministic' gets
      `not train`); without one, `module.train()` / `module.eval()` switch Dropout and BatchNorm.
  """

  nnx_class: Callable[..., nnx.Module]
  args: tuple[Any, ...] = ()
  kwargs: tuple[tuple[str, Any], ...] = ()
  features: Any = None
  train_kwarg: str | None = "auto"

  def __post_init__(self):
    object.__setattr__(self, "args", tuple(self.args))
    if isinstance(self.kwargs, Mapping):
      object.__setattr__(self, "kwargs", tuple(sorted(self.kwargs.items())))
    object.__setattr__(self, "features", feature_pairs(self.features, what=getattr(
        self.nnx_class, "__name__", repr(self.nnx_class))))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Any, *, train: bool = False, return_features: bool = False):
    wrapped = _ToLinen(self.nnx_class, args=self.args, kwargs=FrozenDict(self.kwargs), name="module")
    return call_to_linen(wrapped, x, train=train, return_features=return_features, features=self.features,
                         train_kwarg=self.train_kwarg)


def as_to_linen(module: bridge.ToLinen) -> _ToLinen:
  """A `bridge.ToLinen` as the `_ToLinen` that reads checkpointed list indices (same fields, unbound;
  arguments frozen, so that the module is hashable)."""
  if isinstance(module, _ToLinen):
    return module
  return _ToLinen(module.nnx_class, args=_frozen(module.args), kwargs=_frozen(module.kwargs),
                  skip_rng=module.skip_rng, metadata_fn=module.metadata_fn, parent=None)


def call_to_linen(wrapped: bridge.ToLinen, x: Any, *, train: bool, return_features: bool, features,
                  train_kwarg: str | None):
  """Runs the NNX module inside `wrapped` in the zoo protocol: logits, or (logits, {name: output})."""
  what = getattr(wrapped.nnx_class, "__name__", "NNX model")

  def run(module: nnx.Module, x: Any):
    flag = call_flag(module, train_kwarg)
    if flag is None:
      module.train() if train else module.eval()
    call = lambda module, x: module(x, **flag_kwargs(flag, train))
    if not return_features:
      return call(module, x)
    logits, intermediates = nnx.capture(call, nnx.Intermediate, method_outputs=nnx.Intermediate)(module, x)
    seen = _recorded(intermediates)
    if features is None:
      return logits, {path: outs[0] if len(outs) == 1 else tuple(outs) for path, outs in sorted(seen.items())}
    picked = _pick(seen, [path for _, path in features], what)
    return logits, {name: picked[path] for name, path in features}

  return wrapped(x, nnx_method=run)


def from_nnx(nnx_class: Callable[..., nnx.Module], *args: Any,
             features: Mapping[str, str] | Sequence[str] | None = None, train_kwarg: str | None = "auto",
             **kwargs: Any) -> FromNNX:
  """The NNX model `nnx_class(*args, **kwargs, rngs=...)` as a zoo-protocol linen module.

  features: {feature name: attribute path} (`{"stage1": "block1", "pre_logits": "pool"}`),
    a list of paths (each its own name), or None: every submodule's output, by path
    (`nnx_feature_paths` lists them).

  Register it like any model:
    models.register("my_nnx_net", input_shape=(28, 28, 1))(
        lambda num_classes: models.from_nnx(MyNNXNet, num_classes=num_classes, features={"stage1": "conv1"}))
  """
  if isinstance(nnx_class, nnx.Module):
    raise ValueError(f"from_nnx takes the NNX class (and its arguments), not an instance of "
                     f"{type(nnx_class).__name__}: the engine builds the module from its variables at each call")
  return FromNNX(nnx_class, args=tuple(_frozen(a) for a in args),
                 kwargs=tuple(sorted((k, _frozen(v)) for k, v in kwargs.items())), features=features,
                 train_kwarg=train_kwarg)


def _frozen(value: Any) -> Any:
  """Lists as tuples, dicts as FrozenDicts (model_kwargs read from JSON): the module must be hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, Mapping):
    return FrozenDict({k: _frozen(v) for k, v in value.items()})
  return value


def nnx_feature_paths(model: FromNNX, variables: Mapping[str, Any], x: Any) -> dict[str, Any]:
  """{attribute path: output shape(s)} of every submodule call of the NNX model; nothing is computed."""
  from kd_jax.models.features import module_paths

  return module_paths(model, variables, x)
