"""TFDS pipelines offline: CIFAR on TFDS mock data, ImageNet streaming on a local JPEG builder.

No test reaches the network: CIFAR and imagenet2012 run under
`tfds.testing.mock_data`; the ImageNet decode path runs on real ArrayRecord
files of 52 JPEG images that a tiny builder writes into a temporary directory.
"""
import io
import itertools
import re
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from kd_jax import data
from kd_jax.data import imagenet, tfds_source

NUM_FAKE_TRAIN, NUM_FAKE_TEST, FAKE_CLASSES = 40, 12, 5


def _jpeg(pixels: np.ndarray) -> io.BytesIO:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  buffer.seek(0)
  return buffer


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A colour gradient plus a little noise: compresses like a photo, unlike pure noise."""
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
  return np.clip(base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


class KdJaxFakeImagenet(tfds.core.GeneratorBasedBuilder):
  """ImageNet's features (JPEG image, label, file_name) with 40 train and 12 validation images.

  Examples are JPEG bytes, so preparing needs no tensorflow (TFDS encodes pixel
  arrays with tensorflow, but stores given bytes as they are).
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, supervised_keys=("image", "label"),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=FAKE_CLASSES),
            "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(NUM_FAKE_TRAIN, 0),
            "validation": self._generate_examples(NUM_FAKE_TEST, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    # Sizes around, below and above 224 (one large enough for JPEG draft decoding).
    sizes = [(375, 500), (500, 333), (120, 90), (640, 480)]
    for i in range(count):
      height, width = sizes[i % len(sizes)]
      yield f"{seed}-{i}", {"image": _jpeg(_smooth_image(rng, height, width)), "label": i % FAKE_CLASSES,
                            "file_name": f"img_{seed}_{i}.JPEG"}


@pytest.fixture(scope="module")
def fake_imagenet_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  KdJaxFakeImagenet(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


@pytest.fixture
def no_download(monkeypatch, tmp_path):
  """An empty TFDS home, and a download that fails the way an offline machine's does (at once)."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_home"))

  def offline(self, *args, **kwargs):
    raise ConnectionError("Failed to establish a new connection: network is unreachable")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)


@pytest.fixture(scope="module")
def fake_source(fake_imagenet_dir):
  with imagenet.load("kd_jax_fake_imagenet", directory=fake_imagenet_dir, num_threads=2) as source:
    yield source


# ---------------------------------------------------------------- CIFAR (mock data)


@pytest.mark.parametrize("name,classes,mean,std", [
    ("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
])
def test_cifar_on_mock_data(name, classes, mean, std):
  with tfds.testing.mock_data(num_examples=48):
    ds = data.load(name)
    again = data.load(name)
  assert isinstance(ds, data.Dataset) and ds.name == name and ds.num_classes == classes
  assert ds.train_images.shape == (48, 32, 32, 3) and ds.test_images.shape == (48, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.test_labels.dtype == np.int32 and ds.input_shape == (32, 32, 3) and ds.num_train == 48
  assert 0 <= ds.train_labels.min() and ds.train_labels.max() < classes
  assert ds.scale == pytest.approx(1 / 255) and ds.mean == mean and ds.std == std
  np.testing.assert_array_equal(ds.train_images, again.train_images)  # mock data is a function of the index


def test_cifar_batch_is_a_pure_function_of_seed_and_step():
  with tfds.testing.mock_data(num_examples=48):
    ds = data.load("cifar10")
  batch = ds.train_batch(7, 5, 16)
  indices = data.batch_indices(48, 16, seed=7, step=5)
  np.testing.assert_array_equal(batch["index"], indices)
  np.testing.assert_array_equal(batch["image"], ds.train_images[indices])
  np.testing.assert_array_equal(batch["label"], ds.train_labels[indices])
  assert batch["image"].shape == (16, 32, 32, 3) and batch["index"].dtype == np.int32
  for key, value in ds.train_batch(7, 5, 16, rows=slice(8, 16)).items():  # one host's half
    np.testing.assert_array_equal(value, batch[key][8:16])
  assert not np.array_equal(ds.train_batch(7, 6, 16)["index"], batch["index"])


@pytest.mark.parametrize("failure,match", [
    (ConnectionError("network is unreachable"), r"ConnectionError: network is unreachable"),
    (ModuleNotFoundError("No module named 'tensorflow'"), r"needs tensorflow to prepare"),
])
def test_cifar_not_prepared_and_no_download_is_a_clear_error(monkeypatch, tmp_path, failure, match):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_home"))

  def download_and_prepare(self, *args, **kwargs):
    raise failure

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
  local = str(tmp_path / "local")
  with pytest.raises(tfds_source.DataNotAvailable) as info:
    data.load("cifar10", directory=local)
  message = str(info.value)
  assert f"dataset 'cifar10' is not prepared in {local} or {tmp_path / 'tfds_home'}" in message
  assert f"downloading it into {local} failed" in message
  assert "tfds build cifar10 --file_format=array_record" in message and "KD_JAX_DATA_DIR" in message
  assert re.search(match, message)
  assert isinstance(info.value, FileNotFoundError)


def test_tfrecord_only_data_without_tensorflow_is_a_clear_error(monkeypatch):
  try:
    import tensorflow  # noqa: F401
    pytest.skip("tensorflow is installed: TFRecord data is readable")
  except ImportError:
    pass
  # TFDS without tensorflow can neither write TFRecord nor read it: stand in for such data.
  monkeypatch.setattr(tfds_source, "_random_access", lambda builder, split, decoders: None)
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(tfds_source.DataNotAvailable, match=r"'cifar10' is prepared at .* only tensorflow can read"):
      data.load("cifar10")
    with pytest.raises(tfds_source.DataNotAvailable, match=r"'imagenet2012' is prepared at .* no random access"):
      data.load("imagenet2012")


# ------------------------------------------------- ImageNet streaming (local builder)


def test_data_dir_is_searched_before_the_tfds_default(no_download, fake_imagenet_dir, monkeypatch):
  source = imagenet.load("kd_jax_fake_imagenet", directory=fake_imagenet_dir)
  assert (source.num_train, source.num_test, source.num_classes) == (NUM_FAKE_TRAIN, NUM_FAKE_TEST, FAKE_CLASSES)
  # No directory given: TFDS's default directory ($TFDS_DATA_DIR) is used.
  monkeypatch.setenv("TFDS_DATA_DIR", fake_imagenet_dir)
  assert imagenet.load("kd_jax_fake_imagenet").num_train == NUM_FAKE_TRAIN


def test_imagenet_train_batch_is_deterministic(fake_imagenet_dir, fake_source):
  batch = fake_source.train_batch(3, 5, 8)
  assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
  np.testing.assert_array_equal(batch["index"], data.batch_indices(NUM_FAKE_TRAIN, 8, seed=3, step=5))
  # Labels as TFDS reads them (it stores examples in a shuffled order of its own).
  reader = tfds.data_source("kd_jax_fake_imagenet", split="train", data_dir=fake_imagenet_dir, download=False)
  np.testing.assert_array_equal(batch["label"], [reader[int(i)]["label"] for i in batch["index"]])
  # A fresh source over the same files (a restarted run) makes the same batch.
  with imagenet.load("kd_jax_fake_imagenet", directory=fake_imagenet_dir, num_threads=1) as other:
    again = other.train_batch(3, 5, 8)
  for key in batch:
    np.testing.assert_array_equal(again[key], batch[key])
  assert fake_source.input_shape == (224, 224, 3) and fake_source.mean == imagenet.IMAGENET_MEAN


def test_imagenet_rows_equal_those_rows_of_the_full_batch(fake_source):
  full = fake_source.train_batch(1, 2, 8)
  parts = [fake_source.train_batch(1, 2, 8, rows=slice(start, start + 2)) for start in range(0, 8, 2)]
  for key in full:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_imagenet_augmentation_varies_across_steps(fake_source):
  # batch = the whole train split, so steps 0 and 1 (two epochs) hold every example.
  first, second = fake_source.train_batch(0, 0, NUM_FAKE_TRAIN), fake_source.train_batch(0, 1, NUM_FAKE_TRAIN)
  order_first, order_second = np.argsort(first["index"]), np.argsort(second["index"])
  a, b = first["image"][order_first], second["image"][order_second]
  np.testing.assert_array_equal(first["label"][order_first], second["label"][order_second])
  differs = [not np.array_equal(x, y) for x, y in zip(a, b)]
  assert all(differs)
  # and across examples within a step: no two crops of a batch are identical.
  assert len({img.tobytes() for img in first["image"]}) == NUM_FAKE_TRAIN


def test_imagenet_eval_batches_are_center_crops_padded_and_masked(fake_imagenet_dir, fake_source):
  batches = list(fake_source.test_batches(8))
  assert len(batches) == 2
  for batch in batches:
    assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1.0] * 12 + [0.0] * 4)
  assert not batches[1]["image"][4:].any()
  reader = tfds.data_source("kd_jax_fake_imagenet", split="validation", data_dir=fake_imagenet_dir, download=False)
  np.testing.assert_array_equal(batches[1]["label"][:4], [reader[i]["label"] for i in range(8, 12)])
  halves = [list(fake_source.test_batches(8, rows=rows)) for rows in (slice(0, 4), slice(4, 8))]
  for i, batch in enumerate(batches):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([halves[0][i][key], halves[1][i][key]]), batch[key])


def _two_colour_png(height: int, width: int) -> bytes:
  """Left half red, right half blue; PNG so that the colours stay exact."""
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[:, :width // 2, 0] = 255
  pixels[:, width // 2:, 2] = 255
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_eval_crop_keeps_the_center_and_train_crop_flips():
  source = imagenet.ImageNetSource([{"image": b"", "label": 0}], [{"image": b"", "label": 0}], num_classes=1)
  image = _two_colour_png(300, 400)
  out = source.eval_image(image)
  assert out.shape == (224, 224, 3)
  assert (out[:, :100, 0] == 255).all() and (out[:, :100, 2] == 0).all()  # red stays left
  assert (out[:, -100:, 2] == 255).all() and (out[:, -100:, 0] == 0).all()  # blue stays right
  # The same decoded array gives the same crop as the encoded bytes.
  np.testing.assert_array_equal(source.eval_image(np.asarray(Image.open(io.BytesIO(image)))), out)
  red_left = [source.train_image(image, source.augment_rng(seed=0, step=s, index=0))[112, 0, 0] == 255
              for s in range(32)]
  assert 0 < sum(red_left) < 32  # flipped about half the time


def test_random_resized_crop_box_stays_in_bounds_and_ranges():
  rng = np.random.default_rng(0)
  for height, width in [(375, 500), (40, 30), (1000, 20)]:
    for _ in range(300):
      top, left, h, w = imagenet.random_resized_crop_box(rng, height, width)
      assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
      if (height, width) == (375, 500):
        assert 0.07 <= h * w / (height * width) <= 1.0 and 0.7 <= w / h <= 1.4
  # A thin image never fits the aspect range: the central crop, clamped to aspect 3/4.
  assert imagenet.random_resized_crop_box(rng, 1000, 20) == (486, 0, 27, 20)


def test_imagenet2012_on_mock_data():
  with tfds.testing.mock_data(num_examples=16):
    source = data.load("imagenet2012")
  with source:
    assert isinstance(source, imagenet.ImageNetSource)
    assert (source.num_train, source.num_test, source.num_classes) == (16, 16, 1000)
    batch = source.train_batch(0, 0, 8, rows=slice(0, 4))
    assert batch["image"].shape == (4, 224, 224, 3) and batch["label"].max() < 1000
    assert next(source.test_batches(8))["image"].shape == (8, 224, 224, 3)


def test_not_prepared_imagenet_is_a_clear_error(no_download, tmp_path):
  with pytest.raises(tfds_source.DataNotAvailable, match=r"dataset 'imagenet2012' is not prepared in .*tfds build"):
    data.load("imagenet2012", directory=str(tmp_path / "local"))


# ------------------------------------------------------------ in-memory Dataset, prefetch


def test_in_memory_test_batches_cover_the_test_split_once():
  ds = data.load("digits")  # 360 test examples
  batches = list(ds.test_batches(128))
  mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
  assert len(batches) == 3 and mask.sum() == 360
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[mask], ds.test_images)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], ds.test_labels)
  last_rows = list(ds.test_batches(128, rows=slice(64, 128)))[-1]
  np.testing.assert_array_equal(last_rows["mask"], [1.0] * 40 + [0.0] * 24)  # 360 = 2 * 128 + 104


def test_prefetch_keeps_order_and_raises_where_the_error_happened():
  assert list(data.prefetch(range(10), 3)) == list(range(10))

  def failing():
    yield from range(3)
    raise RuntimeError("decode failed at item 3")

  items = data.prefetch(failing(), 2)
  assert [next(items) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(RuntimeError, match="decode failed at item 3"):
    next(items)
  with pytest.raises(ValueError, match="prefetch size must be at least 1"):
    data.prefetch(range(3), 0)


def test_prefetch_runs_ahead_and_close_stops_the_thread():
  produced = []
  ready = threading.Event()

  def counting():
    for i in itertools.count():
      produced.append(i)
      if len(produced) >= 3:
        ready.set()
      yield i

  items = data.prefetch(counting(), 2)
  assert ready.wait(5)  # items are made before anyone asks for them
  assert next(items) == 0
  items.close()
  count = len(produced)
  assert count <= 5 and list(items) == []


# ------------------------------------------------- MNIST through TFDS, the network blocked


def test_mnist_through_tfds_offline_fails_at_the_network_step_saying_how_to_work_offline(monkeypatch, tmp_path):
  """No KD_JAX_DATA_DIR, an empty TFDS home, sockets blocked: TFDS's real download path runs (its
  dependencies importable: importlib_resources was missing once) and fails only where it connects."""
  import socket

  from tensorflow_datasets.core.download import downloader

  attempts = []

  def blocked(*args, **kwargs):
    attempts.append(args[1:2] or args[:1])
    raise OSError("network blocked by the test")

  monkeypatch.setattr(socket.socket, "connect", blocked)
  monkeypatch.setattr(socket, "create_connection", blocked)
  monkeypatch.setattr(socket, "getaddrinfo", blocked)
  monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS backs off for minutes before giving up
  monkeypatch.delenv("KD_JAX_DATA_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_home"))
  with pytest.raises(tfds_source.DataNotAvailable) as info:
    data.load("mnist")
  message = str(info.value)
  assert attempts, "the download never reached the network"
  assert f"dataset 'mnist' is not prepared in {tmp_path / 'tfds_home'}" in message
  assert re.search(r"failed \(ConnectionError: .*network blocked by the test", message)
  assert "To work offline" in message and "tfds build mnist --file_format=array_record" in message
  assert ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
          "t10k-labels-idx1-ubyte.gz) in <dir>/mnist/ and set KD_JAX_DATA_DIR=<dir>") in message
