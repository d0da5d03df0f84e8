"""ONE (on-the-fly native ensemble): the multi-branch model, the term against numpy, and training runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import data, models, train
from kd_jax.distill import Objective, Outputs
from kd_jax.train import checkpoint
from experiments.configs import mnist_methods, select_rows


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_one_loss(branches, gate, labels, temperature, kd_weight):
  """Σ_m CE(z_m) + CE(z_e) + w Σ_m T² KL(p_e^T ‖ p_m^T), z_e = Σ_m softmax(gate)_m z_m; branches [M, B, K]."""
  weights = np.exp(np_log_softmax(gate))  # [B, M]
  ensemble = np.einsum("bm,mbk->bk", weights, branches)
  ce = lambda z: -np_log_softmax(z)[np.arange(len(labels)), labels]
  log_e = np_log_softmax(ensemble / temperature)
  kl = lambda z: temperature ** 2 * np.sum(np.exp(log_e) * (log_e - np_log_softmax(z / temperature)), -1)
  return sum(ce(z) for z in branches) + ce(ensemble) + kd_weight * sum(kl(z) for z in branches)


def outputs(branches, gate):
  features = {f"branch_{m}_logits": z for m, z in enumerate(branches)}
  return Outputs(branches[0], {**features, "gate_logits": gate})


RNG = np.random.default_rng(0)
BRANCHES = jnp.asarray(RNG.normal(size=(3, 6, 5)) * 2, jnp.float32)
GATE = jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)
LABELS = jnp.asarray(RNG.integers(0, 5, 6), jnp.int32)


@pytest.mark.parametrize("temperature,kd_weight", [(3.0, 1.0), (1.0, 0.5)])
def test_one_term_matches_the_numpy_formula(temperature, kd_weight):
  objective = Objective({"one": {"temperature": temperature, "kd_weight": kd_weight}})
  loss, metrics, _ = objective({}, {}, outputs(BRANCHES, GATE), None, {"label": LABELS}, step=jnp.asarray(0))
  expected = np_one_loss(np.asarray(BRANCHES, np.float64), np.asarray(GATE, np.float64), np.asarray(LABELS),
                         temperature, kd_weight)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/one"], expected.mean(), rtol=1e-5)


def test_the_ensemble_is_a_constant_in_the_kl_terms_so_only_its_cross_entropy_trains_the_gate():
  term = Objective({"one": {}}).terms["one"]
  gate_grad = jax.grad(lambda g: jnp.mean(term(outputs(BRANCHES, g), None, {"label": LABELS}, {}, {},
                                               step=jnp.asarray(0))[0]))(GATE)

  def ensemble_ce(g):  # CE of Σ_m softmax(g)_m z_m, written out independently
    ensemble = jnp.einsum("bm,mbk->bk", jax.nn.softmax(g, -1), BRANCHES)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(ensemble), LABELS[:, None], 1))

  np.testing.assert_allclose(gate_grad, jax.grad(ensemble_ce)(GATE), rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(gate_grad).max()) > 1e-4


def test_rampup_follows_the_authors_sigmoid_schedule():
  objective = Objective({"one": {"kd_weight": 2.0, "rampup_epochs": 4}}, steps_per_epoch=10)
  term = objective.terms["one"]
  for step in (0, 10, 20, 40, 100):
    t = min(step / 40, 1.0)
    np.testing.assert_allclose(term.kd_weight_at(jnp.asarray(step)), 2.0 * np.exp(-5 * (1 - t) ** 2), rtol=1e-6)


@pytest.fixture(scope="module")
def mlp_one():
  model = models.create("one", num_classes=10, base="mlp", base_kwargs={"widths": [16, 12]}, branches=3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4, 4, 1)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  return model, variables, x


def test_branches_share_the_trunk_and_the_gate_weights_their_logits(mlp_one):
  model, variables, x = mlp_one
  params = variables["params"]
  assert set(params) == {"trunk", "gate_fc", "gate_bn", "branch_0", "branch_1", "branch_2"}
  assert params["trunk"]["dense1"]["kernel"].shape == (16, 16)  # one shared copy of the first layer
  assert all(params[f"branch_{m}"]["dense2"]["kernel"].shape == (16, 12) for m in range(3))
  logits, feats = model.apply(variables, x, return_features=True)
  branches = np.stack([feats[f"branch_{m}_logits"] for m in range(3)])
  weights = np.exp(np_log_softmax(np.asarray(feats["gate_logits"], np.float64)))
  np.testing.assert_allclose(feats["ensemble_logits"], np.einsum("bm,mbk->bk", weights, branches), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(logits, feats["branch_0_logits"])  # the default output: branch 0
  # The gate is Dense -> BN -> ReLU (as in the authors' code): its scores are >= 0.
  assert float(np.min(feats["gate_logits"])) >= 0.0
  # Changing branch 1 moves its logits and the ensemble, not branch 0.
  other = jax.tree.map(lambda p: p * 1.7, params["branch_1"])
  _, moved = model.apply({**variables, "params": {**params, "branch_1": other}}, x, return_features=True)
  np.testing.assert_array_equal(moved["branch_0_logits"], feats["branch_0_logits"])
  assert not np.allclose(moved["branch_1_logits"], feats["branch_1_logits"])


def test_the_ensemble_output_uses_the_same_parameters(mlp_one):
  model, variables, x = mlp_one
  ensemble_model = models.create("one", num_classes=10, base="mlp", base_kwargs={"widths": [16, 12]}, branches=3,
                                 output="ensemble")
  logits, feats = ensemble_model.apply(variables, x, return_features=True)
  np.testing.assert_array_equal(logits, feats["ensemble_logits"])


def test_a_cifar_resnet_branches_at_its_last_stage():
  model = models.create("one", num_classes=10, base="resnet8", branches=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))))
  params = shapes["params"]
  assert set(params["trunk"]) == {"conv1", "bn1", "layer1_0", "layer2_0"}
  assert set(params["branch_0"]) == set(params["branch_1"]) == {"layer3_0", "fc"}
  assert params["gate_fc"]["kernel"].shape == (32, 2)  # pooled stage-2 output -> one score per branch
  base = jax.eval_shape(lambda: models.create("resnet8", num_classes=10).init(
      jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))))["params"]
  # A branch with the trunk is the base network, parameter for parameter.
  assert jax.tree.map(lambda s: s.shape, {**params["trunk"], **params["branch_0"]}) == \
      jax.tree.map(lambda s: s.shape, base)
  (_, feats), _ = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), return_features=True))
  assert feats["stage2"].shape == (2, 16, 16, 32) and feats["stage3"].shape == (2, 8, 8, 64)
  assert feats["ensemble_logits"].shape == (2, 10) and feats["gate_logits"].shape == (2, 2)


@pytest.mark.parametrize("kwargs,match", [
    ({"base": "mlp", "branches": 1}, r"branches must be an int >= 2"),
    ({"base": "mlp", "output": "mean"}, r"output must be one of \('branch_0', 'ensemble'\), got 'mean'"),
    ({"base": "mlp", "shared_layers": 2}, r"shared_layers must lie in \[1, 1\] .* got 2"),
    ({"base": "vgg8"}, r"cannot split a VGG"),
])
def test_bad_options_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.create("one", num_classes=10, **kwargs)


def test_one_trains_on_digits_and_its_branch_and_ensemble_learn(tmp_path):
  config = train.base_config()
  config.epochs = 3
  config.data.batch_size = 64
  config.data.eval_batch_size = 360
  config.progress = False
  kwargs = {"base": "mlp", "branches": 3, "base_kwargs": {"widths": [64, 64]}}
  config.rows.one = train.row(model="one", model_kwargs=kwargs, terms={"one": {}},
                              optimizer={"name": "adam", "learning_rate": 3e-3})
  result = train.run(config, str(tmp_path))["one"]
  assert result["test_accuracy"] > 0.85
  variables = checkpoint.load_model(str(tmp_path / "one" / "final"))[0]
  digits = data.load("digits")
  model = models.create("one", num_classes=10, **kwargs)
  logits, feats = model.apply(variables, digits.test_images.astype(np.float32) / 16.0, return_features=True)
  accuracy = lambda z: float(np.mean(np.argmax(z, -1) == digits.test_labels))
  np.testing.assert_allclose(accuracy(logits), result["test_accuracy"], atol=1e-6)  # eval reports branch 0
  assert accuracy(feats["ensemble_logits"]) > 0.85 and accuracy(feats["branch_2_logits"]) > 0.85


@pytest.mark.slow
def test_one_on_mnist_learns(tmp_path):
  """The MNIST table's row, 3 epochs: branch 0 (a 784-800-800-10 net) above 97% test accuracy."""
  config = mnist_methods.get_config()
  select_rows(config, "one")
  config.epochs = 3
  config.progress = False
  config.mesh.data = 1  # one device: 8 fake CPU devices only slow a long run down on a small machine
  result = train.run(config, str(tmp_path))["one"]
  print("ONE on MNIST, 3 epochs:", {k: result[k] for k in ("test_accuracy", "test_errors", "wall_time_s")})
  assert result["test_accuracy"] > 0.97
