"""TFDS-backed datasets (the only module that imports tensorflow_datasets)."""
from __future__ import annotations

import numpy as np


def load(name: str, *, num_classes: int, scale: float, mean, std, data_dir: str | None = None):
  """Loads train and test splits of TFDS dataset `name` into host memory."""
  import tensorflow_datasets as tfds

  from kd_jax.data import Dataset

  splits = {}
  for split in ("train", "test"):
    ds = tfds.load(name, split=split, batch_size=-1, as_supervised=True, data_dir=data_dir)
    images, labels = tfds.as_numpy(ds)
    splits[split] = (np.asarray(images, np.uint8), np.asarray(labels, np.int32))
  return Dataset(name, *splits["train"], *splits["test"], num_classes=num_classes,
                 scale=scale, mean=tuple(mean), std=tuple(std))
