"""Features from any Flax module, by module path, without editing the module.

The zoo's models return named features themselves (`return_features=True`).
For a model a user brings, these helpers record the outputs of its submodules
while it runs, through `flax.linen.intercept_methods` (the mechanism behind
`capture_intermediates`). Everything happens at trace time, so they work
under `jax.jit`, `jax.grad` and sharding like a plain `apply`; XLA drops the
outputs nobody asked for.

A module path is the '/'-joined names from the root to the submodule, as in
the params tree: `'layer1_0'`, `'encoder/block_2/conv'`. `module_paths` lists
them.

    logits, feats = capture(model, variables, x, ["layer1_0", "layer2_0"], train=False)
    teacher = WithFeatures(MyNet(num_classes=10), {"stage1": "block1", "pre_logits": "pool"})
    student = WithFeatures(MyNet(num_classes=10))   # every submodule's output, named by its path
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["capture", "module_paths", "feature_shapes", "WithFeatures", "TRAIN_KWARGS"]


def _recorder(prefix: tuple[str, ...] = ()) -> tuple[dict[str, list[Any]], Callable[..., Any]]:
  """An interceptor recording every submodule `__call__` output under `prefix`, keyed by its relative path."""
  seen: dict[str, list[Any]] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      path = tuple(context.module.path)
      if path[: len(prefix)] == prefix and len(path) > len(prefix):
        seen.setdefault("/".join(path[len(prefix):]), []).append(out)
    return out

  return seen, interceptor


def _pick(seen: Mapping[str, list[Any]], wanted: Sequence[str], what: str) -> dict[str, Any]:
  missing = [p for p in wanted if p not in seen]
  if missing:
    raise KeyError(f"{what} has no submodule(s) {missing} (or they were not called); "
                   f"available module paths: {sorted(seen)}")
  return {p: seen[p][0] if len(seen[p]) == 1 else tuple(seen[p]) for p in wanted}


def capture(module: nn.Module, variables: Mapping[str, Any], x: Any, paths: Sequence[str], **apply_kwargs: Any):
  """Runs `module.apply(variables, x, **apply_kwargs)` and records submodule outputs.

  Args:
    module: any `flax.linen` module (unbound).
    variables: its variables.
    x: its input.
    paths: module paths to record ('/'-joined names, e.g. 'layer1_0/conv1').
    **apply_kwargs: passed to `apply` (`train=...`, `mutable=...`, `rngs=...`).

  Returns:
    (what `apply` returns, {path: output of that submodule's `__call__`}); a
    submodule called several times gives the tuple of its outputs in call order.

  Raises:
    KeyError listing the available module paths if a path was not called.
  """
  seen, interceptor = _recorder()
  with nn.intercept_methods(interceptor):
    out = module.apply(variables, x, **apply_kwargs)
  return out, _pick(seen, list(paths), type(module).__name__)


def module_paths(module: nn.Module, variables: Mapping[str, Any], x: Any, **apply_kwargs: Any) -> dict[str, Any]:
  """{module path: output shape(s)} of every submodule call; abstract evaluation, nothing is computed.

  For an NNX model (`nnx.bridge.ToLinen`, `from_nnx`, `WithFeatures` of either) the paths are the NNX
  module's attribute paths, as `from_nnx(features=...)` takes them.
  """
  from kd_jax.models import nnx_bridge

  every = None
  if isinstance(module, nnx_bridge.bridge.ToLinen):
    every, variables = WithFeatures(module), {c: {"module": tree} for c, tree in variables.items()}
  elif isinstance(module, nnx_bridge.FromNNX) or (
      isinstance(module, WithFeatures) and isinstance(module.module, nnx_bridge.bridge.ToLinen)):
    every = module.clone(features=None)
  if every is not None:
    _, feats = jax.eval_shape(lambda v, x: every.apply(v, x, return_features=True, **apply_kwargs), variables, x)
    return {p: jax.tree.map(lambda s: tuple(s.shape), v) for p, v in sorted(feats.items())}
  seen, interceptor = _recorder()

  def run(variables, x):
    with nn.intercept_methods(interceptor):
      module.apply(variables, x, **apply_kwargs)
    return {p: outs[0] if len(outs) == 1 else tuple(outs) for p, outs in seen.items()}

  shapes = jax.eval_shape(run, variables, x)
  return {p: jax.tree.map(lambda s: tuple(s.shape), v) for p, v in sorted(shapes.items())}


def feature_shapes(module: nn.Module, input_shape: Sequence[int], *, batch: int = 1) -> dict[str, tuple[int, ...]]:
  """{feature name: shape} of a zoo-protocol model for inputs [batch, *input_shape]; nothing is computed.

  Connectors are sized from these, e.g. `feature_shapes(teacher, (32, 32, 3))['stage3']`.
  """
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  (_, feats), _ = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.key(0), x, train=False, return_features=True), x
  )
  return {k: tuple(v.shape) for k, v in sorted(feats.items())}


TRAIN_KWARGS = ("train", "training", "is_training", "deterministic")


def call_flag(module: Any, train_kwarg: str | None) -> str | None:
  """The train flag to pass `module` ("auto": the first of TRAIN_KWARGS its `__call__` takes; None: none)."""
  if train_kwarg != "auto":
    return train_kwarg
  try:
    parameters = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return None
  return next((name for name in TRAIN_KWARGS if name in parameters), None)


def flag_kwargs(flag: str | None, train: bool) -> dict[str, bool]:
  """{flag: train} ({flag: not train} for 'deterministic'), or {} without a flag."""
  if flag is None:
    return {}
  return {flag: (not train) if flag == "deterministic" else train}


def feature_pairs(features: Mapping[str, str] | Sequence[str] | None, *,
                  what: str) -> tuple[tuple[str, str], ...] | None:
  """A feature map as hashable (name, path) pairs: a dict {name: path}, a sequence of paths (each its own
  name), or None (every submodule's output, named by its path)."""
  if features is None:
    return None
  if isinstance(features, str):
    raise ValueError(f"{what}: features must be a dict {{name: module path}} or a list of module paths, "
                     f"got the string {features!r}")
  items = tuple(features.items()) if isinstance(features, Mapping) else tuple(
      (p, p) if isinstance(p, str) else tuple(p) for p in features)
  for item in items:
    if len(item) != 2 or not all(isinstance(v, str) for v in item):
      raise ValueError(f"{what}: features must map names to module paths (str), got {item!r}")
  return items


def pick_features(seen: Mapping[str, list[Any]], pairs: tuple[tuple[str, str], ...] | None, what: str):
  """{feature name: recorded output} for `pairs` (None: every recorded path)."""
  if pairs is None:
    return {path: outs[0] if len(outs) == 1 else tuple(outs) for path, outs in sorted(seen.items())}
  picked = _pick(seen, [path for _, path in pairs], what)
  return {name: picked[path] for name, path in pairs}


class WithFeatures(nn.Module):
  """Wraps a user's module in the zoo protocol, its features picked by module path.

  `WithFeatures(net, {"stage1": "block1", "pre_logits": "pool"})` behaves like a
  zoo model: `__call__(x, *, train=False, return_features=False)` returns
  logits, or (logits, {feature name: output of the submodule at that path}).
  The wrapped module's variables sit under the key 'module' (e.g.
  `{'params': {'module': net_params}}`).

  The feature map may be a dict, a list of paths (each its own name) or None
  (every submodule's output, named by its path; XLA drops those no loss reads).
  It is stored as a tuple of (name, path) pairs, so the module stays hashable
  (the engine's jitted steps take it as a static argument).

  Attributes:
    module: the user's module; called as `module(x, **{train_kwarg: train})`.
    features: feature name -> module path (relative to `module`), see above.
    train_kwarg: name of the module's train flag; 'deterministic' is passed
      `not train`; "auto": the first of `TRAIN_KWARGS` its `__call__` takes;
      None: not passed.
  """

  module: nn.Module
  features: Any = None
  train_kwarg: str | None = "auto"

  def __post_init__(self):
    from kd_jax.models import nnx_bridge  # an NNX model in `nnx.bridge.ToLinen`: its features by NNX capture

    if isinstance(self.module, nnx_bridge.bridge.ToLinen):
      object.__setattr__(self, "module", nnx_bridge.as_to_linen(self.module))
    object.__setattr__(self, "features", feature_pairs(self.features, what=type(self.module).__name__))
    super().__post_init__()

  @property
  def feature_map(self) -> dict[str, str] | None:
    """The features as a dict {name: module path}; None: every submodule's output."""
    return None if self.features is None else dict(self.features)

  @nn.compact
  def __call__(self, x: Any, *, train: bool = False, return_features: bool = False):
    from kd_jax.models import nnx_bridge

    if isinstance(self.module, nnx_bridge.bridge.ToLinen):
      return nnx_bridge.call_to_linen(self.module, x, train=train, return_features=return_features,
                                      features=self.features, train_kwarg=self.train_kwarg)
    kwargs = flag_kwargs(call_flag(self.module, self.train_kwarg), train)
    seen, interceptor = _recorder(tuple(self.path) + (self.module.name,))
    with nn.intercept_methods(interceptor):
      logits = self.module(x, **kwargs)
    if not return_features:
      return logits
    return logits, pick_features(seen, self.features, type(self.module).__name__)


def follows_protocol(module: nn.Module) -> bool:
  """Whether `module.__call__` takes `return_features` (the zoo protocol)."""
  try:
    return "return_features" in inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return True
