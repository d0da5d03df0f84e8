"""AFD (Chung et al. 2020): the adversarial losses vs numpy, the discriminator living in the term state
(updated by its own step, untouched by the networks' gradient, per peer, checkpointed); slow: MNIST."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import data, losses, models
from kd_jax.data import augment
from kd_jax.distill import Objective, Outputs
from kd_jax.distill.adversarial import AdversarialFeatureDistillation
from kd_jax.train import checkpoint as checkpoint_lib
from kd_jax.train import engine, loop
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import sources


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("kind", ["lsgan", "bce"])
def test_adversarial_losses_match_numpy(kind):
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(3, 5)), rng.normal(size=5)
  if kind == "lsgan":
    generator = (1 - fake) ** 2
    discriminator = np.mean((1 - real) ** 2, axis=0) + fake ** 2
  else:
    generator = -np_log_sigmoid(fake)
    discriminator = np.mean(-np_log_sigmoid(real), axis=0) - np_log_sigmoid(-fake)
  np.testing.assert_allclose(losses.adversarial_generator_loss(jnp.asarray(fake), kind=kind), generator, rtol=1e-5)
  np.testing.assert_allclose(losses.adversarial_discriminator_loss(jnp.asarray(real), jnp.asarray(fake), kind=kind),
                             discriminator, rtol=1e-5)


def test_adversarial_bad_inputs():
  with pytest.raises(ValueError, match="kind must be one of"):
    losses.adversarial_generator_loss(jnp.zeros(3), kind="wgan")
  with pytest.raises(ValueError, match=r"real_scores .* must be \[P, B\]"):
    losses.adversarial_discriminator_loss(jnp.zeros((2, 4)), jnp.zeros(3))
  with pytest.raises(ValueError, match="afd: pool must be one of"):
    Objective({"afd": {"pool": "max"}})


def np_discriminator(params, x):
  """The discriminator's forward in numpy: Dense -> LeakyReLU(0.2) -> Dense(1)."""
  h = x @ np.asarray(params["dense0"]["kernel"]) + np.asarray(params["dense0"]["bias"])
  h = np.where(h > 0, h, 0.2 * h)
  return (h @ np.asarray(params["score"]["kernel"]) + np.asarray(params["score"]["bias"]))[:, 0]


@pytest.fixture(scope="module")
def term_case():
  rng = np.random.default_rng(1)
  own = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  peers = jnp.asarray(rng.normal(size=(1, 6, 5)) + 1.0, jnp.float32)  # the peer's features: shifted
  term = AdversarialFeatureDistillation(feature="h", hidden=(8,), learning_rate=1e-2)
  student = Outputs(jnp.zeros((6, 3)), {"h": own})
  source = Outputs(jnp.zeros((1, 6, 3)), {"h": peers})
  _, state = term.init(jax.random.PRNGKey(0), student, source)
  call = jax.jit(lambda st: term(student, source, {}, {}, st, step=jnp.zeros((), jnp.int32)))  # one compile
  return term, student, source, state, call


def test_network_loss_is_the_lsgan_formula_on_the_pre_update_discriminator(term_case):
  term, student, source, state, call = term_case
  loss, new_state = call(state)
  fake = np_discriminator(state["discriminator"], np.asarray(student.features["h"]))
  np.testing.assert_allclose(loss, (1 - fake) ** 2, rtol=1e-5)
  real = np_discriminator(state["discriminator"], np.asarray(source.features["h"][0]))
  np.testing.assert_allclose(new_state["discriminator_loss"], np.mean((1 - real) ** 2 + fake ** 2), rtol=1e-5)


def test_discriminator_takes_its_own_adam_step(term_case):
  term, student, source, state, call = term_case
  _, new_state = call(state)

  @jax.jit
  def expected_update(params):
    d_loss = lambda p: jnp.mean(losses.adversarial_discriminator_loss(
        jax.vmap(lambda f: term.score(p, f))(source.features["h"]), term.score(p, student.features["h"])))
    adam = optax.adam(1e-2, b1=0.5)
    updates, _ = adam.update(jax.grad(d_loss)(params), adam.init(params))
    return optax.apply_updates(params, updates)

  expected = expected_update(state["discriminator"])
  changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state["discriminator"],
                         state["discriminator"])
  assert min(jax.tree.leaves(changed)) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state["discriminator"],
               expected)
  # Trained on these features, the discriminator tells them apart better and better.
  values = []
  for _ in range(30):
    _, state = call(state)
    values.append(float(state["discriminator_loss"]))
  assert values[-1] < 0.5 * values[0]


def test_networks_gradient_does_not_reach_the_discriminator(term_case):
  term, student, source, state, _ = term_case

  def network_loss(d_params, own):
    loss, _ = term(Outputs(student.logits, {"h": own}), source, {}, {}, {**state, "discriminator": d_params},
                   step=jnp.zeros((), jnp.int32))
    return jnp.mean(loss)

  d_grad, own_grad = jax.jit(jax.grad(network_loss, argnums=(0, 1)))(state["discriminator"], student.features["h"])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(d_grad))
  assert float(jnp.max(jnp.abs(own_grad))) > 1e-4  # the network does learn from it


DIGITS = data.load("digits")
AFD = {"ce": {}, "dml": {"temperature": 1.0}, "afd": {"feature": "pre_logits", "hidden": [16]}}


@pytest.fixture(scope="module")
def afd_engine():
  schedule = optax.constant_schedule(0.01)
  spec = engine.StepSpec(
      student=models.create("mlp", num_classes=10, widths=[32]), objective=Objective(AFD),
      optimizer=optax.adam(schedule), schedule=schedule,
      normalize=lambda x: augment.normalize(x, scale=DIGITS.scale, mean=DIGITS.mean, std=DIGITS.std),
      peers=2, source=sources.create("peers", peers=2))
  mesh = mesh_lib.make_mesh(replica=1, data=1)
  example = jnp.zeros((1, 8, 8, 1), jnp.uint8)
  abstract = jax.eval_shape(lambda: engine.init_state(spec, jax.random.PRNGKey(0), {}, example))
  shardings = engine.state_shardings(mesh, abstract, spec)
  state = jax.jit(engine.init_state, static_argnums=0, out_shardings=shardings)(
      spec, jax.random.PRNGKey(0), {}, example)
  step_fn = engine.make_train_step(spec, mesh, shardings)
  put = lambda s: mesh_lib.put_batch(loop._train_batch(DIGITS, 32, seed=0, step=s), engine.batch_sharding(mesh, spec))
  return spec, abstract, shardings, state, step_fn, put


def test_discriminators_are_per_peer_and_updated_in_the_train_step(afd_engine):
  spec, _, _, state, step_fn, put = afd_engine
  kernel = state.method_state["afd"]["discriminator"]["dense0"]["kernel"]
  assert kernel.shape == (2, 32, 16)  # [K, features, hidden]: one discriminator per peer
  assert float(jnp.max(jnp.abs(kernel[0] - kernel[1]))) > 0  # initialised independently
  before = jax.device_get(state.method_state)
  new_state, metrics = step_fn(jax.tree.map(jnp.copy, state), {}, put(0))
  assert np.isfinite(float(metrics["loss/afd"]))
  after = jax.device_get(new_state.method_state)
  for k in range(2):
    assert np.max(np.abs(after["afd"]["discriminator"]["dense0"]["kernel"][k]
                         - before["afd"]["discriminator"]["dense0"]["kernel"][k])) > 0
  assert after["afd"]["opt_state"][0].count.tolist() == [1, 1]
  assert "afd" not in new_state.params["terms"]  # not trained by the networks' optimizer


def test_resume_carries_the_discriminator_state(afd_engine, tmp_path):
  spec, abstract, shardings, state, step_fn, put = afd_engine
  state, _ = step_fn(jax.tree.map(jnp.copy, state), {}, put(0))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"))
  checkpointer.save(1, state, {"step": 1})
  checkpointer.close()
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  restored, _ = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints")).restore_latest(abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.method_state), jax.device_get(state.method_state))
  # The continuation from the checkpoint is the continuation of the run.
  continued, _ = step_fn(jax.tree.map(jnp.copy, state), {}, put(1))
  resumed, _ = step_fn(restored, {}, put(1))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.method_state),
               jax.device_get(continued.method_state))


def test_afd_needs_exchanged_features():
  schedule = optax.constant_schedule(0.01)
  spec = engine.StepSpec(
      student=models.create("mlp", num_classes=10, widths=[8]), objective=Objective(AFD),
      optimizer=optax.adam(schedule), schedule=schedule, normalize=lambda x: x / 255.0,
      peers=2, source=sources.create("stale_peers", peers=2))
  with pytest.raises(ValueError, match="exchange='predictions'"):
    jax.eval_shape(lambda: engine.init_state(spec, jax.random.PRNGKey(0), {}, jnp.zeros((1, 8, 8, 1), jnp.uint8)))


@pytest.mark.slow
def test_mnist_afd_learns(tmp_path):
  from experiments.configs import mnist_afd
  from kd_jax import train

  config = mnist_afd.get_config("afd")
  config.rows.afd.epochs = 2
  config.mesh.data = 1
  config.progress = False
  result = train.run(config, str(tmp_path))["afd"]
  print(f"afd: 2 epochs, test accuracy {result['test_accuracy']:.4f} (peers {result['peer_test_accuracy']}), "
        f"{result['wall_time_s']} s")
  assert min(result["peer_test_accuracy"]) > 0.97


def test_mnist_afd_config_is_valid():
  from experiments.configs import mnist_afd
  from kd_jax.train import config as config_lib

  config = config_lib.validate(mnist_afd.get_config())
  assert config.rows.afd.peers.count == 2 and config.rows.afd.peers.exchange == "predictions"
  assert set(config.rows.afd.terms) == {"ce", "dml", "afd"}
