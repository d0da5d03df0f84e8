"""Datasets as deterministic functions of (seed, step).

A `Dataset` holds its examples in host memory as uint8 images [N, H, W, C] and
int32 labels [N]; normalisation and augmentation run on device inside the jitted
step (`kd_jax.data.augment`). The batch of step `s` is a pure function of
(seed, s): a per-epoch permutation drawn from (seed, epoch). A resumed run, or a
run on another number of devices or hosts, therefore sees identical batches.

Sources:
  mnist   raw IDX files from `$KD_JAX_DATA_DIR/mnist/` (or `data_dir`), else TFDS
  digits  scikit-learn's bundled 8x8 digits, fixed stratified 80/20 split
  cifar10, cifar100  TFDS, in memory (`tfds_source`; `data_dir` is the TFDS data directory)
  imagenet2012  TFDS ArrayRecord files, streamed: an `imagenet.ImageNetSource`
    decodes each batch on request (`train_batch`, `test_batches`), same contract
  reverse  synthetic sequence reversal, token ids int32 [N, 2, T] with per-position
    labels [N, T] (`sequences.TokenDataset`, whose `input_dtype` is int32: inputs
    that are not uint8 pixels are neither normalised nor augmented)

Your own data: `register(name, loader)` with `from_arrays` (numpy arrays, any
numeric features; `arrays.ArrayDataset`) or `register_tfds(name)` (any TFDS
image/label dataset, its class count and shapes from the builder's info).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from typing import TYPE_CHECKING, Callable, Iterator, Union

import numpy as np

from kd_jax.data.prefetch import prefetch
from kd_jax.errors import ConfigError, same_definition

if TYPE_CHECKING:
  from kd_jax.data.imagenet import ImageNetSource

__all__ = ["Dataset", "load", "names", "prefetch", "register", "register_tfds", "from_arrays", "ArrayDataset",
           "batch_indices", "steps_per_epoch", "data_dir", "labelled_subset", "train_subset"]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An in-memory dataset with its on-device normalisation constants."""

  name: str
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray  # uint8 [M, H, W, C]
  test_labels: np.ndarray  # int32 [M]
  num_classes: int
  # pixel value (uint8) -> float: (x * scale - mean) / std, per channel.
  scale: float = 1.0 / 255.0
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return int(self.train_images.shape[0])

  def __post_init__(self):
    for split in ("train", "test"):
      images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{self.name}: {split} images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
      if labels.shape != images.shape[:1]:
        raise ValueError(f"{self.name}: {split} labels {labels.shape} do not match images {images.shape}")
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(f"{self.name}: {split} labels outside [0, {self.num_classes})")

  def train_batch(self, seed: int, step: int, batch_size: int, rows: slice = slice(None), *,
                  stream: int = 0) -> dict[str, np.ndarray]:
    """Rows `rows` of the global training batch of `step` (the streaming sources' interface).

    {"image": uint8 [R, H, W, C], "label": int32 [R], "index": int32 [R]}.
    """
    indices = batch_indices(self.num_train, batch_size, seed=seed, step=step, stream=stream)[rows]
    return {"image": self.train_images[indices], "label": self.train_labels[indices],
            "index": indices.astype(np.int32)}

  def test_batches(self, batch_size: int, rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size eval batches, the last zero-padded: rows `rows` of each global batch.

    {"image": the inputs' dtype [R, ...] (uint8 [R, H, W, C] for images), "label": int32 [R, ...],
    "mask": float32 [R] (0 on padding)}; inputs and labels of any rank (token sequences, tabular features).
    """
    n = self.test_images.shape[0]
    for start in range(0, n, batch_size):
      positions = np.arange(start, start + batch_size)[rows]
      valid = positions < n
      safe = np.where(valid, positions, 0)
      pad = lambda x: np.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x[safe], 0).astype(x.dtype)
      yield {"image": pad(self.test_images), "label": pad(self.test_labels).astype(np.int32),
             "mask": valid.astype(np.float32)}


def data_dir(override: str | None = None) -> str | None:
  """The local data directory: `override`, else `$KD_JAX_DATA_DIR`, else None (TFDS)."""
  return override or os.environ.get("KD_JAX_DATA_DIR") or None


def _load_mnist(directory):
  from kd_jax.data import mnist

  if directory is not None:
    return mnist.load_idx(os.path.join(directory, "mnist"))
  from kd_jax.data import tfds_source

  return tfds_source.load("mnist", num_classes=10, scale=1.0 / 255.0, mean=(0.0,), std=(1.0,))


def _load_digits(directory):
  del directory  # shipped with scikit-learn
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection

  digits = sk_datasets.load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # values 0..16
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, labels, test_size=0.2, random_state=0, stratify=labels)
  return Dataset("digits", train_x, train_y, test_x, test_y, num_classes=10, scale=1.0 / 16.0)


def _load_cifar(name, num_classes):
  def load(directory):
    # `directory` (config.data.dir or $KD_JAX_DATA_DIR) is searched before TFDS's own.
    from kd_jax.data import tfds_source

    return tfds_source.load(
        name, num_classes=num_classes, scale=1.0 / 255.0,
        mean=(0.5071, 0.4865, 0.4409) if num_classes == 100 else (0.4914, 0.4822, 0.4465),
        std=(0.2673, 0.2564, 0.2762) if num_classes == 100 else (0.2470, 0.2435, 0.2616),
        data_dir=directory)

  return load


def _load_imagenet(directory):
  from kd_jax.data import imagenet

  return imagenet.load("imagenet2012", directory=directory, num_classes=1000)


def _load_reverse(directory):
  del directory  # generated
  from kd_jax.data import sequences

  return sequences.make("reverse")


# A loader returns an in-memory `Dataset` or a streaming `ImageNetSource`; both
# have num_train, num_classes, input_shape, scale/mean/std, train_batch, test_batches.
_SOURCES: dict[str, Callable[[str | None], Union[Dataset, "ImageNetSource"]]] = {
    "mnist": _load_mnist,
    "digits": _load_digits,
    "cifar10": _load_cifar("cifar10", 10),
    "cifar100": _load_cifar("cifar100", 100),
    "imagenet2012": _load_imagenet,
    "reverse": _load_reverse,
}


def names() -> list[str]:
  return sorted(_SOURCES)


def register(name: str, loader: Callable[[str | None], Dataset]) -> None:
  """Adds a dataset: `loader(directory) -> Dataset` (directory: config.data.dir or $KD_JAX_DATA_DIR).

  The loader is called by every `load` (each run); a `from_arrays` dataset is the usual
  result. Registering the same loader again (a re-imported config) replaces it; another
  loader under a registered name is an error.
  """

  old = _SOURCES.get(name)
  if old is not None and not same_definition(old, loader):
    raise ValueError(f"dataset {name!r} is already registered (by {getattr(old, '__qualname__', old)!s}); register "
                     f"{getattr(loader, '__qualname__', loader)!s} under another name")
  _SOURCES[name] = loader


def register_tfds(name: str, *, tfds_name: str | None = None, scale: float = 1.0 / 255.0, mean=(0.0,),
                  std=(1.0,)) -> None:
  """Registers the TFDS image/label dataset `tfds_name` (default `name`) as dataset `name`.

  Its "train" and "test" splits are read into memory (uint8 images [N, H, W, C], labels [N]);
  the class count comes from the builder's info ("label" a ClassLabel). `scale`, `mean`, `std`
  (per channel, or one value for all) normalise the pixels on device. Data is looked for in
  config.data.dir / $KD_JAX_DATA_DIR, then TFDS's own directory, else downloaded (`tfds_source`).
  """
  source_name = tfds_name or name

  def load_tfds(directory):
    from kd_jax.data import tfds_source

    builder = tfds_source.prepared_builder(source_name, directory)
    classes = tfds_source._label_classes(builder)
    if classes is None:
      raise ValueError(f"dataset {name!r}: TFDS {source_name!r} has no ClassLabel feature 'label' to count the "
                       "classes from; load it yourself and register a from_arrays dataset")
    channels = builder.info.features["image"].shape[-1]
    per_channel = lambda v: tuple(float(c) for c in np.broadcast_to(np.asarray(v, np.float64).reshape(-1),
                                                                    (channels,)))
    dataset = tfds_source.load(source_name, num_classes=classes, scale=scale, mean=per_channel(mean),
                               std=per_channel(std), data_dir=directory)
    return dataclasses.replace(dataset, name=name)

  load_tfds.__qualname__ = f"register_tfds({source_name!r})"
  register(name, load_tfds)


from kd_jax.data.arrays import ArrayDataset, from_arrays  # noqa: E402  (it subclasses Dataset)


def load(name: str, *, directory: str | None = None) -> Dataset:
  """Loads dataset `name`; `directory` (or $KD_JAX_DATA_DIR) selects local files."""
  if name not in _SOURCES:

    close = difflib.get_close_matches(name, list(_SOURCES), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(names())}")
  return _SOURCES[name](data_dir(directory))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder of each epoch's permutation is dropped)."""
  if batch_size > num_examples:

    raise ConfigError(f"batch size {batch_size} is larger than the {num_examples} training examples")
  return num_examples // batch_size


def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int, stream: int = 0) -> np.ndarray:
  """Indices of the global batch of `step`: int64 [batch_size], a pure function of (seed, step).

  `stream` selects one of several independent orders (co-distillation replicas
  that each train on their own data).
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(int(step), per_epoch)
  order = _epoch_order(int(num_examples), int(seed), epoch, int(stream))
  return order[position * batch_size:(position + 1) * batch_size]


@functools.lru_cache(maxsize=8)
def _epoch_order(num_examples: int, seed: int, epoch: int, stream: int) -> np.ndarray:
  """The epoch's permutation, drawn once per (seed, epoch, stream) rather than at every step (read-only)."""
  key = [seed, epoch] + ([stream] if stream else [])
  order = np.random.default_rng(key).permutation(num_examples)
  order.flags.writeable = False
  return order


def labelled_subset(num_examples: int, count: int, *, seed: int) -> np.ndarray:
  """The training examples treated as labelled in a semi-supervised row: sorted int64 [count].

  The first `count` of a permutation drawn from (seed, "labelled"), so every row of a
  table (the teacher trained on them, the students that see the rest unlabelled)
  agrees on the same subset.
  """
  if not 0 < count <= num_examples:

    raise ConfigError(f"labelled_examples must lie in [1, {num_examples}] (the training-set size), got {count}")
  order = np.random.default_rng([seed, 0x1abe1]).permutation(num_examples)
  return np.sort(order[:count])


def train_subset(dataset: Dataset, indices: np.ndarray) -> Dataset:
  """`dataset` whose training split is only the examples `indices` (test split unchanged)."""
  if not isinstance(dataset, Dataset):
    raise ValueError(f"a training subset needs an in-memory dataset; {dataset.name!r} is streamed")
  return dataclasses.replace(dataset, train_images=dataset.train_images[indices],
                             train_labels=dataset.train_labels[indices])
