"""Raw MNIST from the original IDX .gz files (LeCun, Cortes & Burges)."""
from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np

# md5 of the original .gz files, as published with the dataset.
FILES = {
    "train-images-idx3-ubyte.gz": "e3fc4e8c62dc6b44129a6c5dc73f271c",
    "train-labels-idx1-ubyte.gz": "c65e051d05fdc5c22589d392328c1cde",
    "t10k-images-idx3-ubyte.gz": "9f2b5d50995684d23288c2562d709c8e",
    "t10k-labels-idx1-ubyte.gz": "bad2870d560cabe2e598aa3132b19b9d",
}


def _read_idx(path: str, *, verify: bool) -> np.ndarray:
  with open(path, "rb") as f:
    raw = f.read()
  if verify:
    digest = hashlib.md5(raw).hexdigest()
    expected = FILES[os.path.basename(path)]
    if digest != expected:
      raise ValueError(f"{path} is corrupt: md5 {digest}, expected {expected}")
  try:
    data = gzip.decompress(raw)
  except (OSError, EOFError) as e:
    raise ValueError(f"{path} is not a readable gzip file: {e}") from e
  magic = int.from_bytes(data[:4], "big")
  if magic not in (2049, 2051):
    raise ValueError(f"{path}: bad IDX magic number {magic} (expected 2049 for labels, 2051 for images)")
  ndim = magic - 2048
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds {body.size}")
  return body.reshape(dims)


def load_idx(directory: str, *, verify: bool = True):
  """Reads the four MNIST IDX files from `directory` into a `kd_jax.data.Dataset`."""
  from kd_jax.data import Dataset

  missing = [name for name in FILES if not os.path.isfile(os.path.join(directory, name))]
  if missing:
    raise FileNotFoundError(
        f"MNIST files missing from {directory!r}: {missing}. Put the original IDX .gz files there, "
        "or unset KD_JAX_DATA_DIR to download through TFDS.")
  arrays = {name: _read_idx(os.path.join(directory, name), verify=verify) for name in FILES}
  return Dataset(
      "mnist",
      train_images=arrays["train-images-idx3-ubyte.gz"][..., None],
      train_labels=arrays["train-labels-idx1-ubyte.gz"].astype(np.int32),
      test_images=arrays["t10k-images-idx3-ubyte.gz"][..., None],
      test_labels=arrays["t10k-labels-idx1-ubyte.gz"].astype(np.int32),
      num_classes=10)
