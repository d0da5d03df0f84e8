"""TFDS-backed data (the only module that imports tensorflow_datasets).

Reading goes through TFDS's random-access data sources (`builder.as_data_source`
over ArrayRecord files), which need no TensorFlow. What does need TensorFlow:
  * preparing most image datasets (`tfds build`, or the first `load`): TFDS
    encodes decoded pixels (CIFAR, MNIST) and reads ImageNet's tar files with it;
  * reading data prepared in the older TFRecord format (`tfds.load`), the
    fallback when a dataset has no ArrayRecord files.
Data is looked for in `data_dir` (`--config.data.dir` or $KD_JAX_DATA_DIR), then
in TFDS's own directory ($TFDS_DATA_DIR, else ~/tensorflow_datasets); a dataset
found in neither is downloaded into the first, as ArrayRecord.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["DataNotAvailable", "prepared_builder", "data_sources", "read_examples", "load"]

# Examples read per call when a whole split is loaded into memory.
_CHUNK = 4096


class DataNotAvailable(FileNotFoundError):
  """A dataset is not prepared locally and could not be downloaded or read."""


def _default_data_dir() -> str:
  """TFDS's default directory, read at call time so that a changed $TFDS_DATA_DIR counts."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _build_hint(name: str, data_dir: str) -> str:
  """How to provide `name` offline."""
  hint = (f"To work offline, prepare it on a machine with network access and tensorflow: "
          f"`tfds build {name} --file_format=array_record --data_dir {data_dir}` "
          f"(then copy that directory here), or point KD_JAX_DATA_DIR / --config.data.dir "
          f"at a directory that holds {name}/ prepared by TFDS.")
  if name == "mnist":  # read without TFDS when KD_JAX_DATA_DIR is set
    from kd_jax.data import mnist

    hint += (f" Or put the four original MNIST files ({', '.join(mnist.FILES)}) in <dir>/mnist/ and set "
             "KD_JAX_DATA_DIR=<dir>: they are read without TFDS.")
  return hint


def prepared_builder(name: str, data_dir: str | None = None):
  """The TFDS builder of `name` with its data prepared.

  Looks in `data_dir`, then in TFDS's default directory; if neither holds the
  prepared dataset, downloads and prepares it (ArrayRecord) into the first.
  Raises DataNotAvailable, naming the dataset and the directory, if that fails.
  """
  import tensorflow_datasets as tfds

  candidates = list(dict.fromkeys([data_dir, _default_data_dir()] if data_dir else [_default_data_dir()]))
  builders = [tfds.builder(name, data_dir=d) for d in candidates]
  for builder in builders:
    if builder.is_prepared():
      return builder
  target, target_dir = builders[0], candidates[0]
  # Offline, TFDS's download retries with backoff take minutes before failing: say what is going on.
  log.warning("dataset %r is not prepared in %s: downloading it through TFDS into %s", name,
              " or ".join(candidates), target_dir)
  try:
    target.download_and_prepare(file_format="array_record")
  except Exception as e:  # network, manual-download, or missing-tensorflow failures alike
    searched = " or ".join(candidates)
    detail = " ".join(str(e).split())  # TFDS's messages span lines (ImageNet's lists the manual paths)
    why = f"{type(e).__name__}: {detail[:600]}"
    if isinstance(e, ModuleNotFoundError) and "tensorflow" in str(e):
      why += " (TFDS needs tensorflow to prepare this dataset, though not to read it afterwards)"
    raise DataNotAvailable(
        f"dataset {name!r} is not prepared in {searched}, and downloading it into {target_dir} failed ({why}). "
        + _build_hint(name, target_dir)) from e
  return target


def _label_classes(builder) -> int | None:
  try:
    return int(builder.info.features["label"].num_classes)
  except (KeyError, AttributeError, TypeError):
    return None


def _random_access(builder, split: str, decoders) -> Sequence[dict[str, Any]] | None:
  """A random-access source of `split`, or None when the data is stored as TFRecord only."""
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError:  # TFDS: "Random access data source for file format ... is not supported"
    return None


def data_sources(name: str, splits: Sequence[str], *, data_dir: str | None = None,
                 raw_images: bool = False) -> tuple[list[Sequence[dict[str, Any]]], int | None]:
  """Random-access sources of `splits` of dataset `name`, and its label count (None if unknown).

  Each source is a Sequence of example dicts, read without TensorFlow. With
  `raw_images`, "image" holds the encoded bytes (JPEG/PNG) for the caller to
  decode; otherwise a decoded uint8 array [H, W, C].
  """
  import tensorflow_datasets as tfds

  builder = prepared_builder(name, data_dir)
  sources = []
  for split in splits:
    source = None
    if raw_images:
      source = _random_access(builder, split, {"image": tfds.decode.SkipDecoding()})
      if source is not None and len(source):
        try:
          source[0]
        except ModuleNotFoundError:
          # tfds.testing.mock_data makes undecoded images by encoding pixels with
          # tensorflow; real ArrayRecord files need none. Use decoded images then.
          source, raw_images = None, False
    if source is None:
      source = _random_access(builder, split, None)
    if source is None:
      raise DataNotAvailable(
          f"dataset {name!r} is prepared at {builder.data_dir} in the {builder.info.file_format} format, "
          "which has no random access. " + _build_hint(name, str(builder.data_dir_root)))
    sources.append(source)
  return sources, _label_classes(builder)


def read_examples(source: Sequence[dict[str, Any]], indices: Iterable[int]) -> list[dict[str, Any]]:
  """The examples of `source` at `indices`, in that order (one batched read when possible)."""
  keys = [int(i) for i in indices]
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(keys))
    except TypeError:
      # TFDS 4.9's mock_data installs a __getitems__ with a broken signature;
      # per-example reads give the same examples.
      pass
  return [source[k] for k in keys]


def _read_split(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """All examples of a random-access split: uint8 images [N, H, W, C], int32 labels [N]."""
  images, labels = [], []
  for start in range(0, len(source), _CHUNK):
    for example in read_examples(source, range(start, min(start + _CHUNK, len(source)))):
      image = np.asarray(example["image"], np.uint8)
      images.append(image[..., None] if image.ndim == 2 else image)
      labels.append(example["label"])
  return np.stack(images), np.asarray(labels, np.int32)


def _read_split_with_tensorflow(builder, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A TFRecord-only split through `tfds.load`'s machinery, which needs tensorflow."""
  import tensorflow_datasets as tfds

  try:
    import tensorflow  # noqa: F401
  except ImportError as e:
    raise DataNotAvailable(
        f"dataset {name!r} is prepared at {builder.data_dir} in the {builder.info.file_format} format, which "
        "only tensorflow can read (pip install tensorflow-cpu). Or rebuild it for reading without tensorflow: "
        + _build_hint(name, str(builder.data_dir_root))) from e
  images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
  return np.asarray(images, np.uint8), np.asarray(labels, np.int32)


def load(name: str, *, num_classes: int, scale: float, mean, std, data_dir: str | None = None):
  """Train and test splits of TFDS dataset `name` in host memory, as a `kd_jax.data.Dataset`.

  Images: uint8 [N, H, W, C]; labels: int32 [N]. `data_dir` as in `prepared_builder`.
  """
  from kd_jax.data import Dataset

  builder = prepared_builder(name, data_dir)
  classes = _label_classes(builder)
  if classes is not None and classes != num_classes:
    raise ValueError(f"dataset {name!r}: TFDS has {classes} classes, the registry expects {num_classes}")
  splits = {}
  for split in ("train", "test"):
    source = _random_access(builder, split, None)
    splits[split] = _read_split(source) if source is not None else _read_split_with_tensorflow(builder, name, split)
  return Dataset(name, *splits["train"], *splits["test"], num_classes=num_classes,
                 scale=scale, mean=tuple(mean), std=tuple(std))
