"""The sources (kd_jax/train/sources.py): what each gives the loss terms, checked on small arrays."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.train import sources

RNG = np.random.default_rng(0)


def _inputs(images, clean, batch, forward=None):
  return sources.Inputs(images=images, clean_images=clean, batch=batch, forward=forward,
                        apply_student=None, map_peers=None)


@pytest.fixture(scope="module")
def teacher():
  module = models.create("mlp", num_classes=5, widths=[6])
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))
  return module, variables


def forward(module, variables, x):
  return module.apply(variables, x, train=False, return_features=True)


@pytest.mark.parametrize("view", ["augmented", "clean"])
def test_teacher_reads_the_view_it_is_given_and_is_a_constant(teacher, view):
  module, variables = teacher
  source, constants = sources.create("teacher", input=view).load({"teacher": teacher})
  images = jnp.asarray(RNG.normal(size=(1, 3, 4, 4, 1)), jnp.float32)  # [S=1, B, ...]
  clean = jnp.asarray(RNG.normal(size=(1, 3, 4, 4, 1)), jnp.float32)
  out = source.outputs(constants, {}, _inputs(images, clean, {}, forward))
  expected, _ = module.apply(variables, (images if view == "augmented" else clean)[0], train=False,
                             return_features=True)
  np.testing.assert_array_equal(out.logits, expected)
  # No gradient reaches the teacher's params through its outputs.
  grads = jax.grad(lambda v: jnp.sum(source.outputs(v, {}, _inputs(images, clean, {}, forward)).logits))(constants)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_teacher_cache_reads_the_rows_of_the_batch_indices(teacher):
  cache = jnp.asarray(RNG.normal(size=(10, 5)), jnp.float32)
  source, constants = sources.create("teacher_cache").load({"teacher": teacher, "cache_logits": lambda m, v: cache})
  index = jnp.asarray([[7, 0, 3]])
  out = source.outputs(constants, {}, _inputs(None, None, {"index": index}))
  np.testing.assert_array_equal(out.logits, cache[np.array([7, 0, 3])])
  assert source.init_outputs(constants, jnp.zeros((2, 4, 4, 1)), None, None, None).logits.shape == (2, 5)


def test_peers_see_the_others_predictions_as_constants():
  logits = jnp.asarray(RNG.normal(size=(3, 2, 4)), jnp.float32)  # [K=3, B, classes]
  features = {"f": jnp.asarray(RNG.normal(size=(3, 2, 6)), jnp.float32)}
  source = sources.create("peers", peers=3)
  out = source.from_students(logits, features)
  assert out.logits.shape == (3, 2, 2, 4) and out.features["f"].shape == (3, 2, 2, 6)
  for k in range(3):  # peer k sees peers k-1, k-2 (mod 3): every other peer once, never itself
    np.testing.assert_array_equal(out.logits[k], jnp.stack([logits[(k - 1) % 3], logits[(k - 2) % 3]]))
  grad = jax.grad(lambda z: jnp.sum(source.from_students(z, features).logits * 2.0))(logits)
  assert float(jnp.abs(grad).max()) == 0.0
  assert source.streams(3) == 1 and source.per_peer and source.online


def test_stale_peers_refresh_their_copies_every_n_steps():
  source = sources.create("stale_peers", peers=2, every_steps=3)
  params = {"w": jnp.zeros((2, 4))}
  state = source.init_state(params, {})
  new = {"w": jnp.ones((2, 4))}
  for step, refreshed in [(1, False), (2, False), (3, True), (6, True), (7, False)]:
    got = source.update_state(state, new, {}, jnp.int32(step))
    np.testing.assert_array_equal(got["params"]["w"], new["w"] if refreshed else params["w"])
  assert source.streams(2) == 2 and source.per_peer and not source.online


def test_a_source_name_is_registered_once():
  with pytest.raises(ValueError, match="registered twice"):
    sources.register_source("teacher")(type("Other", (sources.Source,), {}))
