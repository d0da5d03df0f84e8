"""kd_jax.train.optim: options by signature, momentum ramps, Hinton et al. 2012's update, the max-norm projection."""
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.train import ConfigError, optim, row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ramp(epoch, start=0.5, end=0.99, epochs=500):
  """Hinton et al. 2012, A.1: p = (1 - t/T) p_i + t/T p_f for t < T, p_f after (t in epochs)."""
  return (1 - epoch / epochs) * start + epoch / epochs * end if epoch < epochs else end


def test_momentum_ramp_at_epochs_0_250_500_600():
  steps_per_epoch = 600
  schedule = optim.momentum_schedule({"start": 0.5, "end": 0.99, "epochs": 500}, steps_per_epoch)
  for epoch in (0, 250, 500, 600):
    np.testing.assert_allclose(schedule(epoch * steps_per_epoch), _ramp(epoch), rtol=1e-6)
  # Constant within an epoch: the last step of epoch 250 has epoch 250's momentum.
  np.testing.assert_allclose(schedule(251 * steps_per_epoch - 1), _ramp(250), rtol=1e-6)


def test_dropout_sgd_matches_the_2012_update_in_numpy():
  """delta_t = p_t delta_{t-1} - (1 - p_t) eps_t g_t; w_t = w_{t-1} + delta_t, eps_t = eps_0 f^epoch."""
  steps_per_epoch, eps0, f = 3, 2.0, 0.9
  cfg = {"name": "dropout_sgd", "learning_rate": eps0, "momentum": {"start": 0.5, "end": 0.9, "epochs": 4}}
  schedule = optim.make_schedule({"name": "exponential", "factor": f}, base_lr=eps0, steps_per_epoch=steps_per_epoch,
                                 total_steps=30)
  tx = optim.make_optimizer(cfg, schedule)
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  params, state = {"w": jnp.asarray(w)}, tx.init({"w": jnp.asarray(w)})
  delta = np.zeros_like(w)
  for t in range(20):
    g = rng.normal(size=w.shape).astype(np.float32)
    epoch = t // steps_per_epoch
    p = _ramp(epoch, 0.5, 0.9, 4)
    delta = p * delta - (1 - p) * eps0 * f ** epoch * g
    w = w + delta
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["w"], w, rtol=1e-5, atol=1e-6)


def test_sgd_with_a_momentum_ramp_and_with_a_constant_momentum():
  """sgd: trace = p_t trace + g, w -= lr * trace (PyTorch/optax SGD), with p_t a ramp; a float is optax.sgd."""
  schedule = optim.make_schedule({"name": "constant"}, base_lr=0.1, steps_per_epoch=2, total_steps=10)
  ramp = optim.make_optimizer({"name": "sgd", "momentum": {"start": 0.0, "end": 0.8, "epochs": 2}}, schedule)
  rng = np.random.default_rng(1)
  w = rng.normal(size=(3,)).astype(np.float32)
  params, state = jnp.asarray(w), ramp.init(jnp.asarray(w))
  trace = np.zeros_like(w)
  for t in range(8):
    g = rng.normal(size=w.shape).astype(np.float32)
    trace = _ramp(t // 2, 0.0, 0.8, 2) * trace + g
    w = w - 0.1 * trace
    updates, state = ramp.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params, w, rtol=1e-5, atol=1e-6)
  constant = optim.make_optimizer({"name": "sgd", "momentum": 0.9}, schedule)
  assert jax.tree.structure(constant.init(params)) == jax.tree.structure(
      optax.chain(optax.identity(), optax.sgd(schedule, momentum=0.9)).init(params))


def test_max_norm_projection_of_a_known_matrix():
  # Columns (units) with incoming norms 5 and 0.5: the first is rescaled onto the limit 1, the second kept.
  kernel = jnp.array([[3.0, 0.3], [4.0, 0.4]])
  tx = optim.make_optimizer({"name": "sgd", "learning_rate": 1.0, "momentum": 0.0, "max_norm": 1.0},
                            optax.constant_schedule(1.0))
  params = {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
  updates, _ = tx.update({"dense": {"kernel": -kernel, "bias": jnp.array([-7.0, 0.0])}}, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["dense"]["kernel"], [[0.6, 0.3], [0.8, 0.4]], rtol=1e-6)
  np.testing.assert_allclose(new["dense"]["bias"], [7.0, 0.0])  # biases are not constrained


def test_max_norm_projection_equals_the_engine_cap_on_peer_stacked_params():
  """The chain element gives the engine's post-update `max_norm(..., stacked=True)`, peers capped separately,
  and leaves the params outside `under` alone."""
  rng = np.random.default_rng(2)
  student = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(2, 5, 4)) * 3), "bias": jnp.ones((2, 4))}}
  terms = {"regressor": {"kernel": jnp.asarray(rng.normal(size=(5, 4)) * 3)}}
  params = {"student": jax.tree.map(jnp.zeros_like, student), "terms": jax.tree.map(jnp.zeros_like, terms)}
  grads = {"student": jax.tree.map(lambda x: -x, student), "terms": jax.tree.map(lambda x: -x, terms)}
  tx = optim.make_optimizer({"name": "sgd", "learning_rate": 1.0, "momentum": 0.0, "max_norm": 2.0},
                            optax.constant_schedule(1.0), batch_dims=1, max_norm_under=("student",))
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  expected = optim.max_norm(student, 2.0, stacked=True)
  np.testing.assert_allclose(new["student"]["Dense_0"]["kernel"], expected["Dense_0"]["kernel"], rtol=1e-6)
  norms = np.linalg.norm(np.asarray(new["student"]["Dense_0"]["kernel"]), axis=1)
  np.testing.assert_allclose(np.minimum(norms, 2.0), norms, rtol=1e-6)  # every unit of each peer within 2
  np.testing.assert_allclose(new["terms"]["regressor"]["kernel"], terms["regressor"]["kernel"])


def test_schedule_options():
  kw = dict(base_lr=1.0, steps_per_epoch=10, total_steps=100)
  # exponential's own default factor is Hinton et al. 2012's 0.998 per epoch.
  np.testing.assert_allclose(optim.make_schedule({"name": "exponential"}, **kw)(25), 0.998 ** 2, rtol=1e-6)
  # cosine's final_fraction is optax's alpha: the rate ends at that fraction.
  np.testing.assert_allclose(optim.make_schedule({"name": "cosine", "final_fraction": 0.1}, **kw)(100), 0.1,
                             rtol=1e-6)
  np.testing.assert_allclose(optim.make_schedule({"name": "step", "boundaries": [3], "factor": 0.2}, **kw)(30),
                             0.2, rtol=1e-6)
  np.testing.assert_allclose(optim.make_optimizer({"name": "adam", "b1": 0.5, "learning_rate": 1.0},
                                                  optax.constant_schedule(1.0)).update(
      jnp.ones(2), optim.make_optimizer({"name": "adam", "b1": 0.5}, optax.constant_schedule(1.0)).init(
          jnp.zeros(2)))[0], -jnp.ones(2), rtol=1e-5)


@pytest.mark.parametrize("optimizer, schedule, match", [
    ({"name": "sgd", "b1": 0.5}, {}, r"optimizer.b1=0.5: optimizer 'sgd' takes no option 'b1'.*'momentum'"),
    ({"name": "adam", "momentum": 0.5}, {}, r"optimizer 'adam' takes no option 'momentum'.*'b1'"),
    ({"name": "adam", "nesterov": True}, {}, r"optimizer 'adam' takes no option 'nesterov'"),
    ({"name": "adamw", "max_norm": -1.0}, {}, r"optimizer.max_norm must be >= 0"),
    ({"name": "sgdd"}, {}, r"unknown optimizer 'sgdd'; known: \['adam', 'adamw', 'dropout_sgd', 'sgd'\]"),
    ({"name": "dropout_sgd", "nesterov": True}, {}, r"optimizer 'dropout_sgd' takes no option 'nesterov'"),
    ({"name": "sgd", "momentum": {"start": 0.5, "end": 0.99}}, {}, r"momentum ramp has exactly the keys"),
    ({"name": "sgd", "momentum": {"start": 0.5, "end": 0.9, "epochs": 0}}, {}, r"momentum.epochs must be > 0"),
    ({}, {"name": "step", "boundaries": [1], "final_fraction": 0.1},
     r"schedule.final_fraction=0.1: schedule 'step' takes no option 'final_fraction'.*'factor'"),
    ({}, {"name": "cosine", "factor": 0.5}, r"schedule 'cosine' takes no option 'factor'"),
    ({}, {"name": "cosine", "boundaries": [5]}, r"schedule 'cosine' takes no option 'boundaries'"),
    ({}, {"name": "exp"}, r"unknown schedule 'exp'; known: \['constant', 'cosine', 'exponential', 'step'\]"),
    ({}, {"name": "step"}, r"schedule 'step' needs option\(s\) \['boundaries'\]"),
])
def test_bad_options_are_config_errors_naming_the_key(optimizer, schedule, match):
  with pytest.raises(ConfigError, match=match):
    optim.check(optimizer, schedule)
  with pytest.raises(ConfigError, match=match):  # the builders raise the same error
    s = optim.make_schedule(schedule, base_lr=0.1, steps_per_epoch=10, total_steps=100)
    optim.make_optimizer(optimizer, s)


def test_a_momentum_ramp_needs_the_epoch_length():
  with pytest.raises(ConfigError, match="steps_per_epoch"):
    optim.make_optimizer({"name": "dropout_sgd"}, optax.constant_schedule(0.1))


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
@pytest.mark.parametrize("schedule", sorted(optim.SCHEDULES))
def test_row_defaults_are_accepted_for_every_optimizer_and_schedule(name, schedule):
  r = row(model="mlp", terms={"ce": {}}, optimizer={"name": name}, schedule={"name": schedule})
  optim.check(r.optimizer, r.schedule)


def test_every_table_row_passes_check():
  rows = 0
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if name.startswith("_"):
      continue
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    for r in config.rows.values():
      optim.check(r.optimizer, r.schedule)
      rows += 1
  assert rows > 100


def test_hinton_dropout_recipes_follow_the_2012_schedule():
  """recipe=dropout: batch 100, eps_t = eps_0 * 0.998^epoch, momentum 0.5 -> 0.99 over 500 epochs, 3000 epochs;
  dropout_x10 ends at the same fraction of eps_0 after 300 epochs; the default recipe is unchanged (Adam)."""
  from experiments.configs import hinton_mnist
  from kd_jax.train import config as config_lib

  for recipe, scale in (("dropout", 1), ("dropout_x10", 10)):
    config = config_lib.validate(hinton_mnist.get_config(f"recipe={recipe}"))
    teacher = config.rows.teacher
    assert config.data.batch_size == 100 and teacher.epochs * scale == 3000 and teacher.data.augment == "jitter"
    steps_per_epoch = 60_000 // 100
    schedule = optim.make_schedule(teacher.schedule, base_lr=teacher.optimizer.learning_rate,
                                   steps_per_epoch=steps_per_epoch, total_steps=teacher.epochs * steps_per_epoch)
    momentum = optim.momentum_schedule(teacher.optimizer.momentum.to_dict(), steps_per_epoch)
    for epoch in (0, 250 // scale, 500 // scale, 600 // scale):
      np.testing.assert_allclose(schedule(epoch * steps_per_epoch), 0.998 ** (epoch * scale), rtol=1e-4)
      np.testing.assert_allclose(momentum(epoch * steps_per_epoch), _ramp(epoch * scale), rtol=1e-6)
  default = hinton_mnist.get_config()
  assert default.data.batch_size == 128 and default.rows.teacher.optimizer.name == "adam"
  assert default.rows.teacher.optimizer.max_norm == 3.5 and default.rows.teacher.epochs == 60
  with pytest.raises(ValueError, match="unknown recipe 'sgd'"):
    hinton_mnist.get_config("recipe=sgd")
