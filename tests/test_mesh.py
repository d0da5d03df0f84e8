"""The mesh (jax.make_mesh order, each process one contiguous block) and padded evaluation batches, on 8
fake CPU devices."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from kd_jax.train import mesh as mesh_lib


def _fake_mesh(processes):
  """An object with `.devices`, as check_process_blocks reads it: devices of the given process indices."""
  grid = np.asarray(processes)
  devices = np.vectorize(lambda p: types.SimpleNamespace(process_index=int(p)), otypes=[object])(grid)
  return types.SimpleNamespace(devices=devices)


def test_make_mesh_orders_devices_as_jax_make_mesh_with_auto_axes():
  mesh = mesh_lib.make_mesh(replica=2, data=-1)
  assert dict(mesh.shape) == {"replica": 2, "data": 4}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  expected = jax.make_mesh((2, 4), mesh_lib.AXES, axis_types=(AxisType.Auto,) * 2)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in expected.devices.flat]
  # A subset of one process's devices (comparing device counts) still works.
  assert mesh_lib.make_mesh(data=2, devices=jax.devices()[:2]).devices.size == 2


@pytest.mark.parametrize("processes", [[[0, 0, 0, 0, 1, 1, 1, 1]], [[0, 0, 1, 1], [2, 2, 3, 3]],
                                       [[0, 0, 0, 0], [1, 1, 1, 1]]])
def test_contiguous_process_blocks_pass(processes):
  mesh_lib.check_process_blocks(_fake_mesh(processes))


def test_interleaved_processes_are_refused_naming_the_positions():
  with pytest.raises(mesh_lib.MeshError, match=r"process 0 holds mesh positions \[0, 2, 4, 6\] of 8"):
    mesh_lib.check_process_blocks(_fake_mesh([[0, 1, 0, 1, 0, 1, 0, 1]]))
  # Contiguous in the flattened order, split inside a replica row's "data" axis is impossible with equal rows;
  # a process whose two runs are in different rows is caught by the flattened check.
  with pytest.raises(mesh_lib.MeshError, match="process 0 holds mesh positions"):
    mesh_lib.check_process_blocks(_fake_mesh([[0, 0, 1, 1], [1, 1, 0, 0]]))


def test_local_block_refuses_shards_that_are_not_one_block():
  """With interleaved devices the min/max block would take other processes' rows (JAX: "Invalid host data")."""
  index_map = {0: (slice(0, 2),), 1: (slice(4, 6),)}  # this process's shards: rows 0-1 and 4-5 of 8
  fake = types.SimpleNamespace(addressable_devices_indices_map=lambda shape: index_map, spec=P("data"))
  with pytest.raises(mesh_lib.MeshError, match=r"do not form one contiguous block"):
    mesh_lib.local_block(fake, (8,))
  index_map = {0: (slice(0, 2),), 1: (slice(2, 4),), 2: (slice(2, 4),)}  # a replicated duplicate is fine
  assert mesh_lib.local_block(fake, (8,)) == (slice(0, 4),)


def test_local_block_of_a_real_sharding_is_the_whole_batch_on_one_process():
  mesh = mesh_lib.make_mesh()
  assert mesh_lib.local_block(mesh_lib.batch_sharding(mesh), (16, 3)) == (slice(0, 16), slice(0, 3))


@pytest.mark.parametrize("batch_size,devices,expected", [(1000, 16, 1008), (1000, 8, 1000), (13, 8, 16), (1, 8, 8)])
def test_padded_size(batch_size, devices, expected):
  assert mesh_lib.padded_size(batch_size, devices) == expected


def test_padded_size_refuses_empty():
  with pytest.raises(ValueError, match="batch_size >= 1"):
    mesh_lib.padded_size(0, 8)


@pytest.mark.parametrize("size", [13, 5, 21])
def test_padded_eval_batch_counts_every_example_once_on_8_devices(size):
  """A batch no device count divides, padded and masked, sums as the unpadded batch in numpy."""
  rng = np.random.RandomState(size)
  batch = {"image": rng.rand(size, 3).astype(np.float32), "label": rng.randint(0, 3, size).astype(np.int32)}
  mesh = mesh_lib.make_mesh()
  padded = mesh_lib.pad_batch(batch, mesh_lib.padded_size(size, mesh.devices.size))
  assert padded["image"].shape[0] % 8 == 0 and padded["mask"].sum() == size

  @jax.jit
  def sums(b):
    loss = -jax.nn.log_softmax(b["image"])[jnp.arange(b["label"].shape[0]), b["label"]]
    correct = (jnp.argmax(b["image"], -1) == b["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(loss * b["mask"]), "correct": jnp.sum(correct * b["mask"]), "count": jnp.sum(b["mask"])}

  got = jax.device_get(sums(mesh_lib.put_batch(padded, mesh_lib.batch_sharding(mesh))))
  log_p = batch["image"] - np.log(np.exp(batch["image"]).sum(-1, keepdims=True))
  np.testing.assert_allclose(got["loss"], -log_p[np.arange(size), batch["label"]].sum(), rtol=1e-5)
  assert got["correct"] == (batch["image"].argmax(-1) == batch["label"]).sum() and got["count"] == size


def test_pad_batch_keeps_an_existing_mask():
  batch = {"image": np.ones((3, 2), np.uint8), "mask": np.array([1, 1, 0], np.float32)}
  padded = mesh_lib.pad_batch(batch, 8)
  np.testing.assert_array_equal(padded["mask"], [1, 1, 0, 0, 0, 0, 0, 0])
  assert padded["image"].shape == (8, 2) and padded["image"][3:].sum() == 0
  with pytest.raises(ValueError, match="cannot pad a batch of 3 examples to 2"):
    mesh_lib.pad_batch(batch, 2)


def test_evaluation_in_padded_batches_counts_every_test_example_once():
  """loop.evaluate with an eval batch rounded up by padded_size (digits' 360 test images, which neither 100 nor
  104 divides) on 8 devices gives the test errors and loss of 1 device with batches of 100."""
  from kd_jax import data, models
  from kd_jax.data import augment
  from kd_jax.train import engine, loop

  digits = data.load("digits")
  model = models.create("mlp", num_classes=10, widths=[16])
  normalize = lambda x: augment.normalize(x, scale=digits.scale, mean=digits.mean, std=digits.std)
  variables = model.init(jax.random.key(0), normalize(jnp.zeros((1,) + digits.input_shape, jnp.uint8)))
  stacked = jax.tree.map(lambda x: x[None], variables)  # one peer
  results = []
  for devices, batch_size in ((1, 100), (8, mesh_lib.padded_size(100, 8))):
    mesh = mesh_lib.make_mesh(data=devices, devices=jax.devices()[:devices])
    eval_step = engine.make_eval_step(model, normalize, mesh)
    results.append(loop.evaluate(eval_step, stacked, digits, batch_size, mesh))
  one, eight = results
  assert one["test_errors"] == eight["test_errors"] and 0 < one["test_errors"] < 360
  np.testing.assert_allclose(eight["test_loss"], one["test_loss"], rtol=1e-6)
