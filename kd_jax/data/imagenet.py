"""ImageNet as a stream: each step reads and decodes only the examples it uses.

1.28M images do not fit in host memory, so `ImageNetSource` keeps random-access
handles on the TFDS ArrayRecord files (`tfds_source.data_sources`, no
TensorFlow) and builds the batch of step `s` on request. It keeps the data
contract of the in-memory `Dataset`:
  * which examples: `batch_indices(num_train, B, seed=seed, step=s)`;
  * how each is augmented: a numpy RNG seeded from (seed, s, example index), so
    the global batch is a pure function of (seed, s), whatever the host count;
  * multi-host: `train_batch(..., rows=slice(a, b))` decodes only rows a..b-1 of
    the global batch, equal to those rows of the full batch.

Train: Inception-style random-resized crop (area 8-100%, aspect 3/4-4/3) to
224x224 and a horizontal flip with probability 1/2. Eval: torchvision's
Resize(256) then CenterCrop(224): the shorter side resized to 256, the central
224x224 cut out. Resampling is bilinear (PIL's, antialiased), the default of
torchvision's `RandomResizedCrop` and `Resize` that mdistiller's recipes and the
torchvision teachers kd_jax converts were trained and evaluated with. Training
crops of JPEGs decode at a reduced DCT scale first (`draft`, keeping the crop at
least 224 pixels a side: several times faster; `draft=False` decodes in full as
torchvision does); evaluation always decodes in full.
Normalisation runs on device, as for every dataset (`scale`, `mean`, `std`).

"""
from __future__ import annotations

import concurrent.futures
import io
import math
import os
import threading
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["ImageNetSource", "load", "random_resized_crop_box", "center_crop_box",
           "crop_resize", "resize_center_crop", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Folded into every augmentation seed so that these draws never coincide with the
# batch-order permutation, which is seeded from (seed, epoch).
_AUGMENT_TAG = 0x1A6E

Box = tuple[float, float, float, float]  # (top, left, height, width) in pixels of the decoded image


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, *,
                            area_range: tuple[float, float] = (0.08, 1.0),
                            aspect_range: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> Box:
  """A random crop (top, left, height, width) of an image [height, width]: Inception / torchvision style.

  Area a uniform fraction of the image in `area_range`, aspect ratio (w/h)
  log-uniform in `aspect_range`; after `attempts` misses, the central crop with
  the aspect ratio clamped into `aspect_range`.
  """
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  for _ in range(attempts):
    area = height * width * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      return top, left, h, w
  aspect = width / height
  if aspect < aspect_range[0]:
    w, h = width, int(round(width / aspect_range[0]))
  elif aspect > aspect_range[1]:
    w, h = int(round(height * aspect_range[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, *, fraction: float) -> Box:
  """The central square whose side is `fraction` of the shorter side: (top, left, side, side)."""
  side = fraction * min(height, width)
  return (height - side) / 2, (width - side) / 2, side, side


def resize_center_crop(image: Any, resize_size: int, size: int) -> np.ndarray:
  """torchvision's Resize(resize_size) then CenterCrop(size) on a PIL image: uint8 [size, size, 3].

  The shorter side goes to `resize_size` and the longer to int(resize_size · long / short),
  bilinearly; the crop's corner is round((H − size) / 2), round((W − size) / 2).
  """
  from PIL import Image

  picture = _open(image).convert("RGB")
  width, height = picture.size
  if width <= height:
    new_width, new_height = resize_size, int(resize_size * height / width)
  else:
    new_width, new_height = int(resize_size * width / height), resize_size
  picture = picture.resize((new_width, new_height), Image.BILINEAR)
  top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
  return np.asarray(picture.crop((left, top, left + size, top + size)), np.uint8)


def _open(image: Any):
  """A PIL image from encoded bytes (JPEG/PNG) or a decoded uint8 array [H, W, C] / [H, W]."""
  from PIL import Image

  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(image)))
  array = np.asarray(image, np.uint8)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array)


def crop_resize(image: Any, box_fn, size: int, *, flip: bool = False, draft: bool = True) -> np.ndarray:
  """Crops `box_fn(height, width)` (a `Box`) out of `image` and resizes it bilinearly: uint8 [size, size, 3].

  `image`: encoded bytes or a decoded uint8 array. The box is computed from the
  header's size before decoding, so that a JPEG can be decoded at a reduced DCT
  scale (`draft`) that still keeps the crop at least `size` pixels on each side:
  several times faster for the small crops of random-resized-crop. Without
  draft, an integer box gives torchvision's `resized_crop` (crop, then a bilinear resize).
  """
  from PIL import Image

  picture = _open(image)
  width, height = picture.size
  top, left, h, w = box_fn(height, width)
  scale_x = scale_y = 1.0
  if draft and picture.format == "JPEG":
    picture.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
    scale_x, scale_y = width / picture.size[0], height / picture.size[1]
  picture = picture.convert("RGB")
  out = picture.resize((size, size), Image.BILINEAR,
                       box=(left / scale_x, top / scale_y, (left + w) / scale_x, (top + h) / scale_y))
  if flip:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(out, np.uint8)


class ImageNetSource:
  """Train and eval batches of an ImageNet-style dataset, decoded on request.

  `train` and `test`: random-access Sequences of {"image": encoded bytes or
  uint8 [H, W, C], "label": int} (TFDS data sources, or any list). Decoding
  and resizing run on a pool of `num_threads` threads (PIL releases the GIL).
  """

  def __init__(self, train: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]], *,
               name: str = "imagenet2012", num_classes: int = 1000, image_size: int = 224,
               resize_size: int = 256, scale: float = 1.0 / 255.0, mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD, area_range: tuple[float, float] = (0.08, 1.0),
               aspect_range: tuple[float, float] = (3 / 4, 4 / 3), num_threads: int | None = None):
    if len(train) == 0 or len(test) == 0:
      raise ValueError(f"{name}: empty split (train {len(train)}, test {len(test)} examples)")
    if not 0 < image_size <= resize_size:
      raise ValueError(f"{name}: need 0 < image_size <= resize_size, got {image_size} and {resize_size}")
    self.name = name
    self.num_classes = num_classes
    self.image_size = image_size
    self.resize_size = resize_size
    self.scale, self.mean, self.std = scale, tuple(mean), tuple(std)
    self.area_range, self.aspect_range = tuple(area_range), tuple(aspect_range)
    self._train, self._test = train, test
    self._num_threads = num_threads or min(32, os.cpu_count() or 1)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool_lock = threading.Lock()

  @property
  def num_train(self) -> int:
    return len(self._train)

  @property
  def num_test(self) -> int:
    return len(self._test)

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def _map(self, fn, items: list) -> list:
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._num_threads, thread_name_prefix=f"{self.name}-decode")
    return list(self._pool.map(fn, items))

  def close(self) -> None:
    """Stops the decoding threads (a later batch starts them again)."""
    with self._pool_lock:
      if self._pool is not None:
        self._pool.shutdown(wait=True)
        self._pool = None

  def __enter__(self) -> "ImageNetSource":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _label(self, example: dict[str, Any], split: str, index: int) -> int:
    label = int(example["label"])
    if not 0 <= label < self.num_classes:
      raise ValueError(f"{self.name} {split} example {index}: label {label} outside [0, {self.num_classes})")
    return label

  def augment_rng(self, *, seed: int, step: int, index: int, stream: int = 0) -> np.random.Generator:
    """The RNG of example `index`'s augmentation at `step`: a function of (seed, step, index[, stream])."""
    return np.random.default_rng([_AUGMENT_TAG, int(seed), int(step), int(index)] + ([int(stream)] if stream else []))

  def train_image(self, image: Any, rng: np.random.Generator) -> np.ndarray:
    """Random-resized crop + flip of one image: uint8 [image_size, image_size, 3]."""
    box_fn = lambda h, w: random_resized_crop_box(rng, h, w, area_range=self.area_range,
                                                  aspect_range=self.aspect_range)
    # The box is drawn first (inside crop_resize), then the flip: a fixed order of draws.
    out = crop_resize(image, box_fn, self.image_size)
    return out[:, ::-1] if rng.random() < 0.5 else out

  def eval_image(self, image: Any) -> np.ndarray:
    """torchvision's Resize(resize_size) + CenterCrop(image_size): uint8 [image_size, image_size, 3]."""
    return resize_center_crop(image, self.resize_size, self.image_size)

  def train_batch(self, seed: int, step: int, batch_size: int, rows: slice = slice(None), *,
                  stream: int = 0) -> dict[str, np.ndarray]:
    """Rows `rows` of the global training batch of `step`.

    Returns {"image": uint8 [R, S, S, 3], "label": int32 [R], "index": int32 [R]}
    (S = image_size, R = rows of the slice); equal to `rows` of the full batch.
    """
    from kd_jax.data import batch_indices
    from kd_jax.data.tfds_source import read_examples

    indices = batch_indices(self.num_train, batch_size, seed=seed, step=step, stream=stream)[rows]
    examples = read_examples(self._train, indices)

    def make(item):
      index, example = item
      try:
        image = self.train_image(example["image"], self.augment_rng(seed=seed, step=step, index=index, stream=stream))
      except Exception as e:
        raise ValueError(f"{self.name} train example {index}: cannot decode its image ({e})") from e
      return image, self._label(example, "train", index)

    made = self._map(make, list(zip(indices.tolist(), examples)))
    return _stack(made, indices, self.input_shape)

  def test_batches(self, batch_size: int, rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size eval batches over the test split, in order; the last is zero-padded.

    Yields {"image": uint8 [R, S, S, 3], "label": int32 [R], "mask": float32 [R]}
    (mask 0 on padding), R = rows of `rows` of each global batch of `batch_size`.
    """
    from kd_jax.data.tfds_source import read_examples

    for start in range(0, self.num_test, batch_size):
      positions = np.arange(start, start + batch_size)[rows]
      valid = positions < self.num_test
      examples = read_examples(self._test, positions[valid])

      def make(item):
        index, example = item
        try:
          image = self.eval_image(example["image"])
        except Exception as e:
          raise ValueError(f"{self.name} test example {index}: cannot decode its image ({e})") from e
        return image, self._label(example, "test", index)

      made = self._map(make, list(zip(positions[valid].tolist(), examples)))
      batch = _stack(made, positions[valid], self.input_shape)
      pad = int((~valid).sum())
      yield {"image": np.concatenate([batch["image"], np.zeros((pad,) + self.input_shape, np.uint8)]),
             "label": np.concatenate([batch["label"], np.zeros(pad, np.int32)]),
             "mask": valid.astype(np.float32)}


def _stack(made: list[tuple[np.ndarray, int]], indices: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  images = np.stack([image for image, _ in made]) if made else np.zeros((0,) + shape, np.uint8)
  return {"image": images, "label": np.asarray([label for _, label in made], np.int32),
          "index": np.asarray(indices, np.int32)}


def load(name: str = "imagenet2012", *, directory: str | None = None, num_classes: int | None = None,
         train_split: str = "train", test_split: str = "validation", **kwargs) -> ImageNetSource:
  """An `ImageNetSource` over TFDS dataset `name` (prepared as ArrayRecord), read without TensorFlow.

  `directory`: the TFDS data directory (`--config.data.dir` / $KD_JAX_DATA_DIR),
  searched before TFDS's default one. `kwargs` go to `ImageNetSource`.
  """
  from kd_jax.data import tfds_source

  (train, test), classes = tfds_source.data_sources(name, (train_split, test_split), data_dir=directory,
                                                    raw_images=True)
  if num_classes is not None and classes is not None and classes != num_classes:
    raise ValueError(f"dataset {name!r}: TFDS has {classes} classes, the registry expects {num_classes}")
  return ImageNetSource(train, test, name=name, num_classes=num_classes or classes or 1000, **kwargs)
