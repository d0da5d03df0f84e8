"""Online distillation on the replica axis: DML and co-distillation (predictions / stale)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import data, losses, models, train
from kd_jax.data import augment
from kd_jax.distill import Objective
from kd_jax.train import engine, loop
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import sources

DIGITS = data.load("digits")
NORMALIZE = lambda x: augment.normalize(x, scale=DIGITS.scale, mean=DIGITS.mean, std=DIGITS.std)


def make_spec(terms, *, peers=2, exchange="predictions", every=1):
  schedule = optax.constant_schedule(0.05)
  source = sources.create("peers", peers=peers) if exchange == "predictions" else sources.create(
      "stale_peers", peers=peers, every_steps=every)
  return engine.StepSpec(
      student=models.create("mlp", num_classes=10, widths=[32]), objective=Objective(terms),
      optimizer=optax.sgd(schedule, momentum=0.9), schedule=schedule, normalize=NORMALIZE,
      peers=peers, source=source)


def setup(spec, mesh):
  example = jnp.zeros((8, 8, 8, 1), jnp.uint8)
  abstract = jax.eval_shape(lambda: engine.init_state(spec, jax.random.PRNGKey(0), {}, example))
  shardings = engine.state_shardings(mesh, abstract, spec)
  state = jax.jit(engine.init_state, static_argnums=0, out_shardings=shardings)(
      spec, jax.random.PRNGKey(0), {}, example)
  return state, engine.make_train_step(spec, mesh, shardings), engine.batch_sharding(mesh, spec)


def batch(step, spec, sharding):
  host = loop._train_batch(DIGITS, 32, seed=0, step=step, streams=spec.streams)
  return mesh_lib.put_batch(host, sharding)


DML = {"ce": {}, "dml": {"temperature": 1.0}}


@pytest.fixture(scope="module")
def dml_2x4():
  """DML, 2 peers on 2 replica groups x 4 data devices."""
  spec = make_spec(DML)
  mesh = mesh_lib.make_mesh(replica=2, data=4)
  return spec, mesh, *setup(spec, mesh)


def test_peers_live_on_their_own_replica_group(dml_2x4):
  spec, mesh, state, step_fn, sharding = dml_2x4
  kernel = state.params["student"]["dense1"]["kernel"]
  assert kernel.shape[0] == 2 and kernel.sharding.spec[0] == "replica"
  shard_devices = {s.index[0].start: {d.id for d in [s.device]} for s in kernel.addressable_shards}
  assert len(shard_devices) == 2  # peer 0 and peer 1 on different devices


def test_dml_loss_uses_the_other_peers_predictions(dml_2x4):
  spec, mesh, state, _, sharding = dml_2x4
  b = batch(0, spec, sharding)
  step = jax.jit(lambda s, b: engine.train_step(spec, s, {}, b)[1])
  images = NORMALIZE(b["image"][0].astype(jnp.float32))
  logits = lambda st, k: spec.student.apply({"params": engine.unstack(st.params["student"], k)}, images)

  def expected(st):
    l0, l1 = logits(st, 0), logits(st, 1)
    dml = (jnp.mean(losses.kd_loss(l0, l1, temperature=1.0)) + jnp.mean(losses.kd_loss(l1, l0, temperature=1.0))) / 2
    return float(dml)

  before = step(state, b)["loss/dml"]
  np.testing.assert_allclose(before, expected(state), rtol=1e-5)
  # Swap peer 1 for another model: peer 0's target changes, and so does the loss, as computed by hand.
  other = jax.tree.map(lambda x: x[::-1] * 1.5, state.params["student"])
  swapped = state.replace(params={**state.params, "student": other})
  after = step(swapped, b)["loss/dml"]
  assert abs(float(after) - float(before)) > 1e-3
  np.testing.assert_allclose(after, expected(swapped), rtol=1e-5)


def test_dml_peers_learn(dml_2x4):
  spec, mesh, state, step_fn, sharding = dml_2x4
  state = jax.tree.map(jnp.copy, state)
  losses_seen = []
  for s in range(40):
    state, metrics = step_fn(state, {}, batch(s, spec, sharding))
    losses_seen.append(float(metrics["loss/ce"]))
  assert np.mean(losses_seen[-5:]) < 0.5 * np.mean(losses_seen[:5])


def test_dml_on_one_device_matches_two_replicas_of_four(dml_2x4):
  spec, mesh, state, step_fn, sharding = dml_2x4
  state8 = jax.tree.map(jnp.copy, state)
  state1, step1, sharding1 = setup(spec, mesh_lib.make_mesh(replica=1, data=1))
  for s in range(5):
    state8, m8 = step_fn(state8, {}, batch(s, spec, sharding))
    state1, m1 = step1(state1, {}, batch(s, spec, sharding1))
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)


def test_stale_exchange_happens_exactly_every_n_steps():
  spec = make_spec({"ce": {}, "codistill": {"temperature": 1.0}}, exchange="stale", every=3)
  mesh = mesh_lib.make_mesh(replica=2, data=4)
  state, step_fn, sharding = setup(spec, mesh)
  b0 = batch(0, spec, sharding)
  assert not np.array_equal(np.asarray(b0["index"][0]), np.asarray(b0["index"][1]))  # own data per replica
  copies = []
  for s in range(7):
    state, _ = step_fn(state, {}, batch(s, spec, sharding))
    copies.append((int(state.step), np.asarray(state.source["params"]["dense1"]["kernel"]),
                   np.asarray(state.params["student"]["dense1"]["kernel"])))
  for done, stale, current in copies:
    if done % 3 == 0:
      np.testing.assert_array_equal(stale, current)  # refreshed to the peers' current params
  last_refresh = {done: stale for done, stale, _ in copies if done % 3 == 0}
  for done, stale, _ in copies:
    if done % 3:
      np.testing.assert_array_equal(stale, last_refresh.get(done - done % 3, copies[0][1] * 0 + stale))
  assert not np.array_equal(copies[3][1], copies[4][2])  # between refreshes the copy is stale


def test_stale_peers_predictions_are_the_other_replica_copies():
  spec = make_spec({"codistill": {"temperature": 1.0}}, exchange="stale", every=100)
  mesh = mesh_lib.make_mesh(replica=2, data=4)
  state, _, sharding = setup(spec, mesh)
  # Make the stale copies differ from the live params, then check peer 0 distils from copy 1 on its own batch.
  stale = jax.tree.map(lambda x: x * 0.5, state.source["params"])
  state = state.replace(source={**state.source, "params": stale})
  b = batch(0, spec, sharding)
  metrics = jax.jit(lambda s, b: engine.train_step(spec, s, {}, b)[1])(state, b)
  apply = lambda p, k, stream: spec.student.apply({"params": engine.unstack(p, k)},
                                                  NORMALIZE(b["image"][stream].astype(jnp.float32)))
  kl = lambda s_logits, t_logits: jnp.mean(losses.kd_loss(s_logits, t_logits, temperature=1.0))
  expected = (kl(apply(state.params["student"], 0, 0), apply(stale, 1, 0)) +
              kl(apply(state.params["student"], 1, 1), apply(stale, 0, 1))) / 2
  np.testing.assert_allclose(metrics["loss/codistill"], expected, rtol=1e-5)


def test_burn_in_keeps_distillation_off_until_its_start():
  objective = Objective({"ce": {}, "codistill": {"start_epoch": 2}}, steps_per_epoch=10)
  assert float(objective.weight("codistill", jnp.int32(19))) == 0.0
  assert float(objective.weight("codistill", jnp.int32(20))) == 1.0
  warm = Objective({"ce": {}, "kd": {"warmup_epochs": 2, "weight": 2.0}}, steps_per_epoch=10)
  np.testing.assert_allclose(float(warm.weight("kd", jnp.int32(5))), 0.5)


def test_online_term_without_peers_is_refused():
  config = train.base_config()
  config.rows.dml = train.row(model="mlp", terms=DML, peers=1, epochs=1)
  with pytest.raises(train.ConfigError, match="an online term .* needs peers >= 2"):
    train.plan(config, "dml", DIGITS)


def test_peers_that_do_not_fit_the_replica_axis_are_refused(tmp_path):
  config = train.base_config()
  config.epochs = 1
  config.data.batch_size = 32
  config.data.eval_batch_size = 360
  config.progress = False
  config.mesh.replica = 2
  config.mesh.data = 4
  config.rows.dml = train.row(model="mlp", model_kwargs={"widths": [16]}, terms=DML, peers={"count": 3, "exchange": "predictions"})
  with pytest.raises(ValueError, match=r"3 peers cannot be spread over mesh.replica=2"):
    train.run(config, str(tmp_path))


def test_run_reports_each_peer_and_their_ensemble(tmp_path):
  config = train.base_config()
  config.epochs = 2
  config.data.batch_size = 32
  config.data.eval_batch_size = 360
  config.progress = False
  config.mesh.replica = 2
  config.mesh.data = 4
  config.rows.dml = train.row(model="mlp", model_kwargs={"widths": [32]}, terms=DML, peers={"count": 2, "exchange": "predictions"},
                              optimizer={"name": "adam", "learning_rate": 1e-2})
  result = train.run(config, str(tmp_path))["dml"]
  assert len(result["peer_test_accuracy"]) == 2 and min(result["peer_test_accuracy"]) > 0.8
  assert result["ensemble_test_accuracy"] > 0.8
  np.testing.assert_allclose(result["test_accuracy"], np.mean(result["peer_test_accuracy"]))
