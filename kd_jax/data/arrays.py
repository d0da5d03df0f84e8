"""Your own data as numpy arrays: `from_arrays(name, (x, y), ...)` -> an in-memory dataset.

Inputs may be any numeric array [N, ...]: uint8 images [N, H, W, C] stay uint8
and are normalised on device, `(x * scale - mean) / std` per channel, where the
row's `augment` applies; anything else (float or integer features of any
shape, uint8 of another rank) is normalised the same way once, on the host,
and stored as float32 (the engine passes such inputs through unchanged, with
`augment="none"`). Without a test split a fixed fraction of the examples,
drawn from `split_seed`, is held out.

    data.register("my_data", lambda directory: data.from_arrays(
        "my_data", (x_train, y_train), (x_test, y_test), mean=x_train.mean(0), std=x_train.std(0) + 1e-6))
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kd_jax.data import Dataset

__all__ = ["ArrayDataset", "from_arrays"]


@dataclasses.dataclass(frozen=True)
class ArrayDataset(Dataset):
  """A `Dataset` of any numeric inputs: uint8 images [N, H, W, C] or float32 features [N, ...]."""

  def __post_init__(self):
    for split in ("train", "test"):
      inputs, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if not _is_images(inputs) and inputs.dtype != np.float32:
        raise ValueError(f"{self.name}: {split} inputs must be uint8 [N, H, W, C] or float32 [N, ...], "
                         f"got {inputs.dtype} {inputs.shape}")
      if inputs.ndim < 2:
        raise ValueError(f"{self.name}: {split} inputs must be [N, ...] with at least one feature axis, got "
                         f"{inputs.shape}")
      if labels.shape != inputs.shape[:1] or labels.dtype != np.int32:
        raise ValueError(f"{self.name}: {split} labels must be int32 [N] = {inputs.shape[:1]}, got "
                         f"{labels.dtype} {labels.shape}")
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(f"{self.name}: {split} labels outside [0, {self.num_classes})")
    if self.train_images.shape[1:] != self.test_images.shape[1:] or self.train_images.dtype != self.test_images.dtype:
      raise ValueError(f"{self.name}: train inputs {self.train_images.dtype} {self.train_images.shape[1:]} and test "
                       f"inputs {self.test_images.dtype} {self.test_images.shape[1:]} differ")

  @property
  def input_dtype(self) -> np.dtype:
    """What the engine reads: uint8 inputs are normalised (and may be augmented) on device, others not."""
    return self.train_images.dtype


def _is_images(x: np.ndarray) -> bool:
  return x.dtype == np.uint8 and x.ndim == 4


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"test_fraction must lie in (0, 1) when no test split is given, got {fraction}")
  order = np.random.default_rng([seed, 0x7e57]).permutation(x.shape[0])
  count = max(1, int(round(fraction * x.shape[0])))
  return (x[order[count:]], y[order[count:]]), (x[order[:count]], y[order[:count]])


def from_arrays(name: str, train: tuple[Any, Any], test: tuple[Any, Any] | None = None, *,
                num_classes: int | None = None, scale: float | None = None, mean: Any = 0.0, std: Any = 1.0,
                test_fraction: float = 0.2, split_seed: int = 0) -> ArrayDataset:
  """An in-memory dataset from numpy arrays.

  Args:
    name: the dataset's name (as registered with `kd_jax.data.register`).
    train: (inputs [N, ...], integer labels [N]).
    test: (inputs [M, ...], labels [M]); None: `test_fraction` of `train` is held out.
    num_classes: the class count; None: 1 + the largest label.
    scale, mean, std: the normalisation `(x * scale - mean) / std`; mean and std broadcast
      against one example (a scalar, per channel [C], or per feature [...]). scale defaults
      to 1/255 for uint8 inputs, else 1.
    test_fraction, split_seed: the held-out part when `test` is None (a fixed permutation).
  """
  x, y = (np.asarray(a) for a in train)
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise ValueError(f"{name}: inputs must be numeric, got {x.dtype}")
  if not np.issubdtype(np.asarray(y).dtype, np.integer):
    raise ValueError(f"{name}: labels must be integers, got {y.dtype}")
  if test is None:
    (x, y), (test_x, test_y) = _split(x, y, test_fraction, split_seed)
  else:
    test_x, test_y = (np.asarray(a) for a in test)
  if num_classes is None:
    num_classes = int(max(y.max(initial=0), test_y.max(initial=0))) + 1
  images = _is_images(x) and _is_images(test_x)
  scale = (1.0 / 255.0 if x.dtype == np.uint8 else 1.0) if scale is None else float(scale)
  if images:
    channels = x.shape[-1]
    per_channel = lambda v: tuple(float(c) for c in np.broadcast_to(np.asarray(v, np.float64).reshape(-1),
                                                                          (channels,)))
    try:
      mean_c, std_c = per_channel(mean), per_channel(std)
    except ValueError as e:
      raise ValueError(f"{name}: uint8 images take a scalar or per-channel ({channels}) mean and std") from e
    return ArrayDataset(name, np.ascontiguousarray(x), y.astype(np.int32), np.ascontiguousarray(test_x),
                        test_y.astype(np.int32), num_classes=num_classes, scale=scale, mean=mean_c, std=std_c)
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if np.any(std == 0):
    raise ValueError(f"{name}: std has zeros (add a small constant, e.g. x.std(0) + 1e-6)")
  normalize = lambda v: np.ascontiguousarray(((v.astype(np.float32) * scale - mean) / std).astype(np.float32))
  try:
    train_x, test_x = normalize(x), normalize(test_x)
  except ValueError as e:
    raise ValueError(f"{name}: mean {mean.shape} and std {std.shape} do not broadcast against one example "
                     f"{x.shape[1:]}") from e
  # Already normalised: the constants the engine would apply are the identity.
  return ArrayDataset(name, train_x, y.astype(np.int32), test_x, test_y.astype(np.int32), num_classes=num_classes,
                      scale=1.0, mean=(0.0,), std=(1.0,))
