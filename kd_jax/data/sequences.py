"""Synthetic sequence-to-sequence tasks for encoder-decoder models (weight distillation's Transformer).

An example is a source sequence and its target, both of `length` tokens from a
vocabulary of `vocab` ids; id 0 is the decoder's start token and never a
target. The model input packs both sequences the decoder needs under teacher
forcing, int32 [2, T]: row 0 the source, row 1 the decoder input (the start
token, then the target shifted right); the labels are the target, int32 [T], one
class per position. The engine's metrics count every position as a prediction:
accuracy is per token under teacher forcing, the loss is the per-token mean.

  reverse  the target is the source reversed (Sutskever et al. 2014's toy task)

The examples are a deterministic function of the generator's seed (0 for the
registered `reverse`); train and test are drawn independently.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from kd_jax.data import Dataset

TASKS = ("reverse",)


@dataclasses.dataclass(frozen=True)
class TokenDataset(Dataset):
  """A `Dataset` of token sequences: `*_images` hold the model inputs int32 [N, 2, T], `*_labels` int32 [N, T].

  The engine reads `input_dtype`: inputs that are not uint8 pixels are neither
  normalised nor augmented.
  """

  input_dtype: ClassVar[type] = np.int32

  def __post_init__(self):
    for split in ("train", "test"):
      inputs, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if inputs.ndim != 3 or inputs.shape[1] != 2 or inputs.dtype != np.int32:
        raise ValueError(f"{self.name}: {split} inputs must be int32 [N, 2, T] (source, decoder input), "
                         f"got {inputs.dtype} {inputs.shape}")
      if labels.shape != (inputs.shape[0], inputs.shape[2]) or labels.dtype != np.int32:
        raise ValueError(f"{self.name}: {split} labels must be int32 [N, T] = {(inputs.shape[0], inputs.shape[2])}, "
                         f"got {labels.dtype} {labels.shape}")
      for what, values in (("inputs", inputs), ("labels", labels)):
        if values.size and (values.min() < 0 or values.max() >= self.num_classes):
          raise ValueError(f"{self.name}: {split} {what} outside the vocabulary [0, {self.num_classes})")


def _examples(rng: np.random.Generator, n: int, length: int, vocab: int, task: str):
  source = rng.integers(1, vocab, (n, length), dtype=np.int64).astype(np.int32)
  target = source[:, ::-1] if task == "reverse" else None
  decoder_input = np.concatenate([np.zeros((n, 1), np.int32), target[:, :-1]], axis=1)
  return np.ascontiguousarray(np.stack([source, decoder_input], axis=1)), np.ascontiguousarray(target)


def make(task: str = "reverse", *, num_train: int = 20000, num_test: int = 2000, length: int = 12, vocab: int = 16,
         seed: int = 0, name: str | None = None) -> TokenDataset:
  """The task's train and test sets, a pure function of the arguments; `name` (default: the task's) is the
  dataset's, as registered."""
  if task not in TASKS:
    raise ValueError(f"unknown sequence task {task!r}; known: {TASKS}")
  if length < 2 or vocab < 3:
    raise ValueError(f"{task}: need length >= 2 and vocab >= 3 (id 0 is the start token), got length={length}, "
                     f"vocab={vocab}")
  if num_train < 1 or num_test < 1:
    raise ValueError(f"{task}: need at least one train and one test example, got {num_train} and {num_test}")
  train_rng, test_rng = (np.random.default_rng([seed, split]) for split in (0, 1))
  train_x, train_y = _examples(train_rng, num_train, length, vocab, task)
  test_x, test_y = _examples(test_rng, num_test, length, vocab, task)
  return TokenDataset(name or task, train_x, train_y, test_x, test_y, num_classes=vocab)
