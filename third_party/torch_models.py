"""PyTorch <-> Flax weights for the kd_jax model zoo.

The zoo's modules name their parameters after the PyTorch attributes of the
reference implementations (RepDistiller / CRD, mdistiller, torchvision), with
`nn.Sequential` indices joined by '_': the PyTorch key
`layer1.0.downsample.0.weight` is the Flax parameter
`params['layer1_0']['downsample_0']['kernel']`. So one generic rule converts a
state dict, with no per-model table:

* conv weights [O, I/groups, kh, kw] -> `kernel` [kh, kw, I/groups, O];
* linear weights [O, I] -> `kernel` [I, O]; biases as they are;
* BatchNorm `weight` / `bias` -> `scale` / `bias` in `params`,
  `running_mean` / `running_var` -> `mean` / `var` in `batch_stats`
  (`num_batches_tracked` is dropped).

Every converted array is checked against the shape the Flax module expects, and
a key on either side with no counterpart is an error naming it.

Starting from a published PyTorch teacher
-----------------------------------------
RepDistiller / CRD publish their CIFAR-100 teachers
(`scripts/fetch_pretrained_teachers.sh` of github.com/HobbitLong/RepDistiller,
e.g. `resnet32x4_vanilla/ckpt_epoch_240.pth`), and mdistiller (DKD) ships the
same teachers; torchvision publishes the ImageNet ResNets. Download the file
yourself (kd_jax never fetches weights), then::

    from third_party import torch_models
    module, variables = torch_models.load_checkpoint(
        "resnet32x4_vanilla/ckpt_epoch_240.pth", "resnet32x4", num_classes=100)
    logits = module.apply(variables, images_nhwc, train=False)

`load_checkpoint` accepts a bare state dict or the dicts these projects save
(`{'model': state_dict, ...}` or `{'state_dict': ...}`), and strips the
`module.` prefix that `nn.DataParallel` adds. For an in-memory PyTorch model use
`convert_state_dict(torch_model.state_dict(), template)`, where `template` is
the Flax variables (or their `jax.eval_shape`) of the matching zoo model. Inputs
are NHWC: transpose PyTorch's NCHW batches with `x.transpose(0, 2, 3, 1)`, and
normalise them as the checkpoint's training did (RepDistiller: CIFAR-100 mean
(0.5071, 0.4867, 0.4408), std (0.2675, 0.2565, 0.2761)).

The model names to use: the zoo names of RepDistiller's `model_dict`
(`resnet8` ... `resnet110`, `resnet8x4`, `resnet32x4`, `wrn_16_1` ...
`wrn_40_2`, `vgg8` ... `vgg19` (RepDistiller's `_bn` models), `ResNet50`,
`MobileNetV2`, `ShuffleV1`, `ShuffleV2`), torchvision's `resnet18/34/50`, and
mdistiller's ImageNet `MobileNetV1`. torchdistill's CIFAR `resnet20..110` have
RepDistiller's layout and load into the zoo models of the same name.

`to_torch_state_dict` goes the other way (a trained student back to PyTorch).

torchvision beside the CPU build of torch
-----------------------------------------
PyPI's torchvision wheels link torch's CUDA libraries; next to the CPU wheel of
torch their compiled operators do not load and `import torchvision` fails,
although the model definitions are pure Python. `torchvision_models()` then
imports `torchvision.models` without torchvision's compiled extension (enough
for building the models and running them on CPU; detection ops such as NMS
would not work). torchdistill's CIFAR models import torchvision too, so the
parity tests call it before importing torchdistill.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any, Mapping

import numpy as np

__all__ = [
    "flax_path",
    "convert_state_dict",
    "load_checkpoint",
    "unwrap_checkpoint",
    "to_torch_state_dict",
    "torchvision_models",
]

_BN_PARAM = {"weight": "scale", "bias": "bias"}
_BN_STAT = {"running_mean": "mean", "running_var": "var"}


def flax_path(torch_module_path: str) -> tuple[str, ...]:
  """`layer1.0.downsample.0` -> ('layer1_0', 'downsample_0'): numeric parts join the previous name."""
  out: list[str] = []
  for part in torch_module_path.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def _torch_module_path(path: tuple[str, ...]) -> str:
  """Inverse of `flax_path`: ('blocks_0_0', 'conv_3') -> 'blocks.0.0.conv.3'."""
  parts = []
  for name in path:
    pieces = name.split("_")
    head = [pieces[0]]
    i = 1
    while i < len(pieces) and not pieces[i].isdigit():
      head.append(pieces[i])
      i += 1
    parts.append("_".join(head))
    for p in pieces[i:]:
      if not p.isdigit():
        raise ValueError(f"cannot map Flax module name {name!r} to a PyTorch path")
      parts.append(p)
  return ".".join(parts)


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
  """The state dict inside a saved checkpoint, without `module.` prefixes."""
  state = checkpoint
  for key in ("model", "state_dict", "model_state_dict"):
    if key in state and isinstance(state[key], Mapping):
      state = state[key]
      break
  return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  node = tree
  for p in path:
    if not isinstance(node, Mapping) or p not in node:
      return None
    node = node[p]
  return node


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  node = tree
  for p in path[:-1]:
    node = node.setdefault(p, {})
  node[path[-1]] = value


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.extend(_leaf_paths(v, prefix + (k,)))
    else:
      out.append(prefix + (k,))
  return out


def convert_state_dict(state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
  """PyTorch state dict -> Flax variables shaped like `template`.

  Args:
    state_dict: PyTorch parameter name -> tensor (or numpy array); checkpoint
      wrappers and `module.` prefixes are removed (see `unwrap_checkpoint`).
    template: the zoo model's variables, e.g. `model.init(...)` or
      `jax.eval_shape(model.init, ...)`: only the structure and shapes are used.

  Returns:
    {'params': ..., 'batch_stats': ...} (the latter only if the template has
    it) of float32 numpy arrays, ready for `model.apply`.

  Raises:
    ValueError naming every PyTorch key without a Flax counterpart, every Flax
    leaf left unset, and every shape mismatch.
  """
  state_dict = unwrap_checkpoint(state_dict)
  params_t = template.get("params", {})
  stats_t = template.get("batch_stats", {})
  out: dict[str, dict[str, Any]] = {"params": {}}
  if stats_t:
    out["batch_stats"] = {}
  unknown, mismatched = [], []
  seen_mismatch: set[tuple[str, tuple[str, ...]]] = set()
  for key, value in state_dict.items():
    module_key, _, leaf = key.rpartition(".")
    path = flax_path(module_key)
    module = _get(params_t, path)
    if leaf == "num_batches_tracked" and _get(stats_t, path) is not None:
      continue
    if not isinstance(module, Mapping):
      unknown.append(key)
      continue
    array = _numpy(value)
    torch_shape = array.shape
    if "kernel" in module:
      if leaf == "weight":
        target, collection = path + ("kernel",), "params"
        if array.ndim == 4:  # [O, I/g, kh, kw] -> [kh, kw, I/g, O]
          array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 2:  # [O, I] -> [I, O]
          array = array.T
      elif leaf == "bias":
        target, collection = path + ("bias",), "params"
      else:
        unknown.append(key)
        continue
    elif "scale" in module or "mean" in (_get(stats_t, path) or {}):
      if leaf in _BN_PARAM:
        target, collection = path + (_BN_PARAM[leaf],), "params"
      elif leaf in _BN_STAT:
        target, collection = path + (_BN_STAT[leaf],), "batch_stats"
      else:
        unknown.append(key)
        continue
    else:
      unknown.append(key)
      continue
    expected = _get(params_t if collection == "params" else stats_t, target)
    if expected is None:
      unknown.append(key)
      continue
    if tuple(expected.shape) != array.shape:
      mismatched.append(f"{key}: torch {torch_shape} -> flax {'/'.join(target)} expects {tuple(expected.shape)}")
      seen_mismatch.add((collection, target))
      continue
    _set(out[collection], target, array.astype(np.float32))
  missing = [
      f"{c}:{'/'.join(p)}"
      for c, tree in (("params", params_t), ("batch_stats", stats_t))
      for p in _leaf_paths(tree)
      if _get(out.get(c, {}), p) is None and (c, p) not in seen_mismatch
  ]
  if unknown or missing or mismatched:
    lines = []
    if unknown:
      lines.append(f"PyTorch keys with no Flax counterpart: {unknown}")
    if missing:
      lines.append(f"Flax variables not in the state dict: {missing}")
    if mismatched:
      lines.append(f"shape mismatches: {mismatched}")
    raise ValueError("state dict does not match the Flax model.\n" + "\n".join(lines))
  return out


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax variables of a zoo model -> PyTorch state dict (numpy arrays; wrap with `torch.from_numpy`)."""
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  out: dict[str, np.ndarray] = {}
  for path in _leaf_paths(params):
    module, leaf = _torch_module_path(path[:-1]), path[-1]
    array = np.asarray(_get(params, path))
    if leaf == "kernel":
      if array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
      elif array.ndim == 2:
        array = array.T
      out[f"{module}.weight"] = array
    elif leaf == "scale":
      out[f"{module}.weight"] = array
    elif leaf == "bias":
      out[f"{module}.bias"] = array
    else:
      raise ValueError(f"no PyTorch name for Flax parameter {'/'.join(path)}")
  for path in _leaf_paths(stats):
    module, leaf = _torch_module_path(path[:-1]), path[-1]
    out[f"{module}.running_{leaf}"] = np.asarray(_get(stats, path))
    out.setdefault(f"{module}.num_batches_tracked", np.zeros((), np.int64))
  return out


def load_checkpoint(path: str, name: str, *, num_classes: int, **model_kwargs: Any):
  """Loads a PyTorch checkpoint file into the zoo model `name`. Returns (module, variables).

  Needs torch (the `compare` extra). The file is read with `weights_only=True`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import torch

  from kd_jax import models

  module = models.create(name, num_classes=num_classes, **model_kwargs)
  shape = models.input_shape(name)
  if shape is None:
    raise ValueError(f"{name!r} takes inputs of any shape; use convert_state_dict with an explicit template")
  template = jax.eval_shape(
      lambda x: module.init(jax.random.key(0), x, train=False), jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  )
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  return module, jax.tree.map(jnp.asarray, convert_state_dict(checkpoint, template))


def torchvision_models() -> types.ModuleType:
  """`torchvision.models`, importable even where torchvision's compiled ops do not load (see above)."""
  try:
    return importlib.import_module("torchvision.models")
  except (ImportError, OSError, RuntimeError):
    pass
  for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
    del sys.modules[key]
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("torchvision is not installed")
  package = types.ModuleType("torchvision")
  package.__path__ = list(spec.submodule_search_locations)
  package.__spec__ = spec
  package.__file__ = spec.origin
  sys.modules["torchvision"] = package
  try:
    package.__version__ = importlib.import_module("torchvision.version").__version__
    return importlib.import_module("torchvision.models")
  except Exception:
    for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
      del sys.modules[key]
    raise

