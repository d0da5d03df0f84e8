"""The data layer: local MNIST, digits, deterministic batch order, placement on a mesh."""
import gzip
import os
import shutil

import jax
import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import augment, mnist
from kd_jax.train import mesh as mesh_lib

SHARED_MNIST = os.path.join(os.environ.get("KD_JAX_DATA_DIR", ""), "mnist")
needs_mnist = pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="no local MNIST (set KD_JAX_DATA_DIR)")


@needs_mnist
def test_mnist_from_local_idx_files():
  ds = data.load("mnist")
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8 and ds.num_classes == 10
  # Label counts published with the data (../shared/data/README.md).
  counts = np.bincount(ds.train_labels, minlength=10)
  np.testing.assert_array_equal(counts, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
  assert ds.test_labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_missing_data_dir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"MNIST files missing from .*train-images-idx3-ubyte.gz"):
    data.load("mnist", directory=str(tmp_path))


@needs_mnist
def test_corrupt_idx_file_names_the_checksum(tmp_path):
  target = tmp_path / "mnist"
  shutil.copytree(SHARED_MNIST, target)
  labels = target / "t10k-labels-idx1-ubyte.gz"
  raw = bytearray(gzip.decompress(labels.read_bytes()))
  raw[100] ^= 1
  labels.write_bytes(gzip.compress(bytes(raw)))
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz is corrupt: md5 [0-9a-f]{32}, expected bad2870d"):
    data.load("mnist", directory=str(tmp_path))


def test_unknown_dataset_suggests_a_name():
  with pytest.raises(ValueError, match=r"unknown dataset 'mnits'.*'mnist'"):
    data.load("mnits")


def test_digits_split_is_fixed_and_stratified():
  a, b = data.load("digits"), data.load("digits")
  assert a.train_images.shape == (1437, 8, 8, 1) and a.test_images.shape == (360, 8, 8, 1)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  assert np.bincount(a.test_labels).min() >= 35  # every class present in the test split


def test_batch_order_is_a_pure_function_of_seed_and_step():
  n, b = 103, 10
  per_epoch = data.steps_per_epoch(n, b)
  first = np.concatenate([data.batch_indices(n, b, seed=3, step=s) for s in range(per_epoch)])
  assert len(set(first.tolist())) == per_epoch * b  # an epoch sees each example at most once
  again = data.batch_indices(n, b, seed=3, step=4)
  np.testing.assert_array_equal(again, first[40:50])
  next_epoch = data.batch_indices(n, b, seed=3, step=per_epoch)
  assert not np.array_equal(next_epoch, first[:10])  # reshuffled each epoch
  assert not np.array_equal(data.batch_indices(n, b, seed=4, step=0), first[:10])


def test_batch_larger_than_dataset_is_an_error():
  with pytest.raises(ValueError, match="batch size 64 is larger than the 10 training examples"):
    data.steps_per_epoch(10, 64)


def test_global_batch_is_identical_on_1_and_8_devices():
  images = np.arange(16 * 4, dtype=np.uint8).reshape(16, 2, 2, 1)
  batch = {"image": images, "label": np.arange(16, dtype=np.int32)}
  one = mesh_lib.put_batch(batch, mesh_lib.batch_sharding(mesh_lib.make_mesh(data=1)))
  eight = mesh_lib.put_batch(batch, mesh_lib.batch_sharding(mesh_lib.make_mesh(data=8)))
  assert len(eight["image"].sharding.device_set) == 8
  for key in batch:
    np.testing.assert_array_equal(np.asarray(one[key]), batch[key])
    np.testing.assert_array_equal(np.asarray(eight[key]), batch[key])


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="data.batch_size 12 is not divisible by the 8 devices of mesh axis .data."):
    mesh_lib.check_batch_size(12, 8, what="data.batch_size", axis="data")


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error():
  with pytest.raises(ValueError, match=r"replica=3 x data=3 = 9 devices, but 8 are available"):
    mesh_lib.make_mesh(replica=3, data=3)


def test_augmentations_do_not_depend_on_sharding():
  rng = jax.random.PRNGKey(0)
  x = np.random.default_rng(0).uniform(size=(8, 6, 6, 3)).astype(np.float32)
  sharded = jax.device_put(x, mesh_lib.batch_sharding(mesh_lib.make_mesh(data=8)))
  for kind in ("jitter", "crop_flip"):
    fn = jax.jit(lambda r, v, kind=kind: augment.augment(r, v, kind=kind))
    np.testing.assert_array_equal(np.asarray(fn(rng, x)), np.asarray(fn(rng, sharded)))


def test_jitter_shifts_each_image_by_at_most_two_pixels():
  x = np.zeros((64, 9, 9, 1), np.float32)
  x[:, 4, 4, 0] = 1.0  # a single lit pixel in the centre
  out = np.asarray(augment.augment(jax.random.PRNGKey(1), x, kind="jitter", max_shift=2))
  rows, cols = np.nonzero(out[..., 0].sum(0) > 0)
  assert out.sum() == 64  # the pixel is never pushed out of the 9x9 frame
  assert rows.min() == 2 and rows.max() == 6 and cols.min() == 2 and cols.max() == 6


def test_unknown_augmentation_is_an_error():
  with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
    augment.augment(jax.random.PRNGKey(0), np.zeros((1, 2, 2, 1), np.float32), kind="flip")


def test_idx_reader_rejects_a_bad_magic_number(tmp_path):
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(gzip.compress(b"\x00\x00\x09\x99" + b"\x00" * 8))
  with pytest.raises(ValueError, match="bad IDX magic number 2457"):
    mnist._read_idx(str(path), verify=False)
