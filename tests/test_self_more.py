"""Self-distillation (issue #11): snapshot distillation, multi-exit distillation and SLA.

Default: the losses against numpy formulas written here, stop-gradient properties, SLA's rotation and
aggregation indices against a numpy loop, the per-exit metrics and costs of the evaluation, and snapshot
distillation's chain (the teacher of cycle k is exactly the weights at the end of cycle k-1) on digits.
Slow: each method learns on MNIST in a few epochs (rows of experiments/configs/mnist_self.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import mnist_self, select_rows
from kd_jax import data, losses, models, train
from kd_jax.distill import Objective, Outputs
from kd_jax.train import checkpoint, engine, loop
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import planning as plan_lib
from kd_jax.train import stages

RNG = np.random.default_rng(0)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z, labels):
  return -np_log_softmax(z)[np.arange(len(labels)), labels]


def np_kl(teacher, student, temperature):
  """T² Σ p_t (log p_t − log p_s) at temperature T."""
  log_t, log_s = np_log_softmax(teacher / temperature), np_log_softmax(student / temperature)
  return temperature ** 2 * np.sum(np.exp(log_t) * (log_t - log_s), -1)


# --- multi-exit distillation ---------------------------------------------------------------------------------

EXITS = [jnp.asarray(RNG.normal(size=(6, 5)) * 2, jnp.float32) for _ in range(3)]  # shallow, middle, final
EXIT_LABELS = jnp.asarray(RNG.integers(0, 5, 6), jnp.int32)


def np_multi_exit(exits, labels, temperature, alpha, teachers):
  exits = [np.asarray(z, np.float64) for z in exits]
  total = np.zeros(len(labels))
  for m in range(len(exits) - 1):
    sources = [exits[-1]] if teachers == "final" else exits[m + 1:]
    kd = np.mean([np_kl(t, exits[m], temperature) for t in sources], axis=0)
    total += (1 - alpha) * np_ce(exits[m], labels) + alpha * kd
  return total


@pytest.mark.parametrize("teachers,temperature,alpha", [("final", 4.0, 0.5), ("deeper", 2.0, 0.7),
                                                        ("final", 1.0, 0.0)])
def test_multi_exit_loss_and_term_match_the_numpy_formula(teachers, temperature, alpha):
  expected = np_multi_exit(EXITS, np.asarray(EXIT_LABELS), temperature, alpha, teachers)
  got = losses.multi_exit_kd_loss(EXITS, EXIT_LABELS, temperature=temperature, alpha=alpha, teachers=teachers)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  objective = Objective({"multi_exit": {"stages": ["s1", "s2"], "temperature": temperature, "alpha": alpha,
                                        "teachers": teachers}})
  student = Outputs(EXITS[2], {"exit_s1_logits": EXITS[0], "exit_s2_logits": EXITS[1]})
  loss, _, _ = objective({}, {}, student, None, {"label": EXIT_LABELS}, step=jnp.asarray(0))
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)


@pytest.mark.parametrize("teachers", ["final", "deeper"])
def test_multi_exit_teachers_get_no_gradient_from_the_shallower_exits(teachers):
  def loss(exits):
    return jnp.sum(losses.multi_exit_kd_loss(exits, EXIT_LABELS, temperature=3.0, alpha=0.5, teachers=teachers))

  grads = jax.grad(loss)(EXITS)
  assert float(jnp.abs(grads[2]).max()) == 0.0  # the final exit is only a teacher here (its CE is the `ce` term)
  own = lambda z: jnp.sum(0.5 * losses.cross_entropy(z, EXIT_LABELS) + 0.5 * losses.kd_loss(z, EXITS[2], temperature=3.0))
  # The middle exit's gradient is its own term's: the shallow exit does not pull it.
  np.testing.assert_allclose(grads[1], jax.grad(own)(EXITS[1]), rtol=1e-5, atol=1e-7)


def test_docstring_examples_run():
  import doctest

  from kd_jax.losses import self_distillation

  result = doctest.testmod(self_distillation, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_multi_exit_bad_options_are_refused():
  with pytest.raises(ValueError, match="teachers"):
    Objective({"multi_exit": {"teachers": "all"}})
  with pytest.raises(ValueError, match="alpha"):
    Objective({"multi_exit": {"alpha": 1.5}})
  with pytest.raises(ValueError, match="at least 2 exits"):
    losses.multi_exit_kd_loss(EXITS[:1], EXIT_LABELS)
  with pytest.raises(KeyError, match="exit_stage3_logits"):
    Objective({"multi_exit": {"stages": ["stage3"]}}).terms["multi_exit"](
        Outputs(EXITS[2], {"exit_s1_logits": EXITS[0]}), None, {"label": EXIT_LABELS}, {}, {}, step=0)


@pytest.fixture(scope="module")
def exits_model():
  model = models.create("with_exits", num_classes=10, base="mlp", stages=["stage1", "stage2"],
                        base_kwargs={"widths": [48, 32, 24]})
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)))
  return model, variables


def test_every_exit_gets_a_test_accuracy_and_a_cost_that_grows_with_depth(exits_model):
  model, variables = exits_model
  dataset = data.load("digits")
  mesh = mesh_lib.make_mesh(replica=1, data=1)
  normalize = plan_lib.normalizer(dataset)
  eval_step = engine.make_eval_step(model, normalize, mesh)
  stacked = jax.tree.map(lambda x: x[None], variables)
  result = loop.evaluate(eval_step, stacked, dataset, 360, mesh)
  assert {"test_accuracy/exit_stage1", "test_accuracy/exit_stage2"} <= set(result)
  images = normalize(dataset.test_images.astype(np.float32))
  logits, features = model.apply(variables, images, return_features=True)
  for name in ("stage1", "stage2"):  # each exit's accuracy is its own logits'
    expected = float(np.mean(np.argmax(features[f"exit_{name}_logits"], -1) == dataset.test_labels))
    assert result[f"test_accuracy/exit_{name}"] == pytest.approx(expected, abs=1e-6)
  assert result["test_accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == dataset.test_labels)), abs=1e-6)

  costs = stages.head_costs(model, variables, images[:2])
  order = ["exit_stage1", "exit_stage2", "model"]
  flops, params = [costs[n]["flops"] for n in order], [costs[n]["params"] for n in order]
  # An exit after the last-but-one layer (a bottleneck as wide as the last layer, and a classifier) costs
  # what the final exit does.
  assert flops[0] < flops[1] <= flops[2], costs
  assert params[0] < params[1] <= params[2], costs
  # The params up to exit 1: hidden layer 1 (64 -> 48), its bottleneck (48 -> 24) and classifier (24 -> 10).
  assert params[0] == (64 * 48 + 48) + (48 * 24 + 24) + (24 * 10 + 10)
  # Dense layers' multiply-adds dominate the FLOPs: at least 2 per weight for one example.
  assert flops[0] >= 2 * (64 * 48 + 48 * 24 + 24 * 10)


def test_a_model_without_exits_is_evaluated_as_before():
  model = models.create("mlp", num_classes=10, widths=[16])
  assert engine.eval_heads(model) == ()
  mesh = mesh_lib.make_mesh(replica=1, data=1)
  eval_step = engine.make_eval_step(model, lambda x: x, mesh)
  variables = jax.tree.map(lambda x: x[None], model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
  batch = {"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.zeros(4, np.int32), "mask": np.ones(4, np.float32)}
  sums = eval_step(variables, batch)
  assert set(sums) == {"correct", "loss", "ensemble_correct", "count"}


# --- SLA ------------------------------------------------------------------------------------------------------

JOINT = jnp.asarray(RNG.normal(size=(5, 4, 3 * 4)) * 2, jnp.float32)  # [B, M, K·M], K = 3 classes
SLA_LABELS = jnp.asarray(RNG.integers(0, 3, 5), jnp.int32)


def np_sla(joint, labels):
  """Independent numpy loops: joint CE, aggregated and single logits."""
  joint = np.asarray(joint, np.float64)
  b, m, km = joint.shape
  k = km // m
  ce = np.zeros(b)
  aggregated = np.zeros((b, k))
  for i in range(b):
    for j in range(m):
      log_p = np_log_softmax(joint[i, j])
      ce[i] += -log_p[labels[i] * m + j] / m
      for c in range(k):
        aggregated[i, c] += joint[i, j, c * m + j] / m
  single = np.array([[joint[i, 0, c * m] for c in range(k)] for i in range(b)])
  return ce, aggregated, single


def test_sla_losses_and_aggregation_match_a_numpy_loop():
  ce, aggregated, single = np_sla(JOINT, np.asarray(SLA_LABELS))
  np.testing.assert_allclose(losses.sla_loss(JOINT, SLA_LABELS), ce, rtol=1e-5)
  np.testing.assert_allclose(losses.sla_aggregated_logits(JOINT), aggregated, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.sla_single_logits(JOINT, 4), single, rtol=1e-6)
  np.testing.assert_array_equal(losses.sla_joint_labels(jnp.asarray([0, 2]), 4), [[0, 1, 2, 3], [8, 9, 10, 11]])


def test_sla_term_matches_the_numpy_formula_and_its_target_is_a_constant():
  sd = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)
  student = lambda joint, sd: Outputs(sd, {"joint_logits": joint, "sd_logits": sd,
                                           "aggregated_logits": losses.sla_aggregated_logits(joint)})
  ce, aggregated, _ = np_sla(JOINT, np.asarray(SLA_LABELS))
  expected = ce + np_kl(aggregated, np.asarray(sd, np.float64), 1.0) + np_ce(np.asarray(sd, np.float64),
                                                                              np.asarray(SLA_LABELS))
  term = Objective({"sla": {}}).terms["sla"]
  value, _ = term(student(JOINT, sd), None, {"label": SLA_LABELS}, {}, {}, step=0)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # The aggregate is a stop-gradient target: the joint logits' gradient is SLA's joint CE's alone.
  grad = jax.grad(lambda j: jnp.sum(term(student(j, sd), None, {"label": SLA_LABELS}, {}, {}, step=0)[0]))(JOINT)
  np.testing.assert_allclose(grad, jax.grad(lambda j: jnp.sum(losses.sla_loss(j, SLA_LABELS)))(JOINT),
                             rtol=1e-5, atol=1e-7)
  plain, _ = Objective({"sla": {"self_distillation": False}}).terms["sla"](
      student(JOINT, sd), None, {"label": SLA_LABELS}, {}, {}, step=0)
  np.testing.assert_allclose(plain, ce, rtol=1e-5)


@pytest.fixture(scope="module")
def sla_model():
  model = models.create("sla", num_classes=10, base="mlp", base_kwargs={"widths": [32]})
  images = jnp.asarray(RNG.normal(size=(3, 8, 8, 1)), jnp.float32)
  return model, model.init(jax.random.PRNGKey(1), images), images


def test_sla_model_rotates_each_input_as_a_numpy_loop_does(sla_model):
  model, variables, images = sla_model
  _, features = model.apply(variables, images, return_features=True)
  (_, train_features), _ = model.apply(variables, images, train=True, return_features=True, mutable=["batch_stats"])
  base = models.create("mlp", num_classes=40, widths=[32])
  base_variables = {"params": variables["params"]["base"]}
  for j in range(4):
    rotated = np.stack([np.rot90(np.asarray(image), j, axes=(0, 1)) for image in images])  # counter-clockwise
    expected = base.apply(base_variables, rotated)
    np.testing.assert_allclose(features["joint_logits"][:, j], expected, rtol=1e-5, atol=1e-6)
    # Training stacks the rotations into one batch: the same joint logits.
    np.testing.assert_allclose(train_features["joint_logits"][:, j], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(features["aggregated_logits"], np_sla(features["joint_logits"], np.zeros(3, int))[1],
                             rtol=1e-5, atol=1e-5)
  # The SD head alone needs one forward pass; its logits are the model's by default.
  np.testing.assert_allclose(model.apply(variables, images), features["sd_logits"], rtol=1e-6)
  costs = stages.head_costs(model, variables, images)
  assert costs["sd"]["flops"] == costs["model"]["flops"] < costs["aggregated"]["flops"]
  assert costs["aggregated"]["flops"] > 3 * costs["single"]["flops"]


def test_sla_refuses_inputs_that_a_rotation_would_reshape(sla_model):
  model, variables, _ = sla_model
  with pytest.raises(ValueError, match="square images"):
    model.apply(variables, jnp.zeros((2, 8, 6, 1)))
  with pytest.raises(ValueError, match="output"):
    models.create("sla", num_classes=10, base="mlp", output="joint")


def test_sla_without_sd_head_has_no_sd_params_or_head(sla_model):
  model, variables, images = sla_model
  plain = models.create("sla", num_classes=10, base="mlp", base_kwargs={"widths": [32]}, output="aggregated",
                        sd_head=False)
  plain_variables = plain.init(jax.random.PRNGKey(1), images)
  assert set(variables["params"]) - set(plain_variables["params"]) == {"sd_head"}
  assert plain.eval_heads == ("aggregated_logits", "single_logits")
  logits, features = plain.apply(plain_variables, images, return_features=True)
  assert "sd_logits" not in features
  np.testing.assert_allclose(logits, features["aggregated_logits"], rtol=1e-6)
  with pytest.raises(ValueError, match='output="sd" needs the SD head'):
    models.create("sla", num_classes=10, base="mlp", sd_head=False)


# --- snapshot distillation ------------------------------------------------------------------------------------

def test_snapshot_rows_chain_the_cycles():
  config = train.base_config()
  names = mnist_self.snapshot_rows(config, prefix="s", cycles=3, epochs_per_cycle=2, model="mlp",
                                   kd_terms={"ce": {}, "kd": {}}, schedule={"name": "cosine"})
  assert names == ["s_c1", "s_c2", "s_c3"]
  assert not config.rows.s_c1.teacher.row and not config.rows.s_c1.init["from"] and list(config.rows.s_c1.terms) == ["ce"]
  for previous, name in zip(names, names[1:]):
    assert config.rows[name].teacher.row == previous and config.rows[name].init["from"] == previous
    assert config.rows[name].schedule.name == "cosine" and config.rows[name].epochs == 2
  assert [config.rows[n].data.start_epoch for n in names] == [0, 2, 4]  # one run's data order
  with pytest.raises(ValueError, match="at least 2 cycles"):
    mnist_self.snapshot_rows(config, cycles=1, epochs_per_cycle=1, model="mlp", kd_terms={})


def test_the_teacher_of_each_cycle_is_the_last_weights_of_the_previous_one(tmp_path, monkeypatch):
  config = train.base_config()
  config.progress = False
  config.data.eval_batch_size = 360
  config.max_steps = 4  # each cycle stops early, on its full (restarting) cosine schedule
  config.mesh.data = 1
  mnist_self.snapshot_rows(config, prefix="s", cycles=3, epochs_per_cycle=1, model="mlp", cache_teacher=True,
                           model_kwargs={"widths": [16]}, kd_terms={"ce": {"weight": 0.5}, "kd": {"weight": 0.5}},
                           optimizer={"name": "adam", "learning_rate": 1e-2}, schedule={"name": "cosine"})
  saved, loaded_teachers, loaded_inits, states = {}, {}, {}, {}
  save_model, load_teacher, model_start = checkpoint.save_model, stages.load_teacher, stages._model_start
  make_train_step = engine.make_train_step
  train_batch, batch_steps = loop._train_batch, []

  def spy_batch(*args, step, **kwargs):
    batch_steps.append(step)
    return train_batch(*args, step=step, **kwargs)

  def spy_save(directory, variables, *args, **kwargs):
    saved[directory] = jax.device_get(variables)
    return save_model(directory, variables, *args, **kwargs)

  def spy_teacher(directory, *args, **kwargs):
    module, variables = load_teacher(directory, *args, **kwargs)
    loaded_teachers[kwargs["row_name"]] = (directory, jax.device_get(variables))
    return module, variables

  def spy_init(plan, current):
    start = model_start(plan, current)
    loaded_inits[plan.name] = (plan.init_from, jax.tree.map(lambda x: np.asarray(x)[0], start))
    return start

  def spy_step(spec, *args):
    step = make_train_step(spec, *args)

    def run(state, *rest):
      new_state, metrics = step(state, *rest)
      states.setdefault(id(spec), []).append(jax.device_get(new_state.params["student"]))
      return new_state, metrics
    return run

  monkeypatch.setattr(checkpoint, "save_model", spy_save)
  monkeypatch.setattr(stages, "load_teacher", spy_teacher)
  monkeypatch.setattr(stages, "_model_start", spy_init)
  monkeypatch.setattr(engine, "make_train_step", spy_step)
  monkeypatch.setattr(loop, "_train_batch", spy_batch)
  train.run(config, str(tmp_path))
  per_epoch = data.load("digits").num_train // config.data.batch_size
  # Cycle k reads the batches of epoch k-1 of one run's order, not cycle 1's again.
  assert batch_steps == [k * per_epoch + s for k in range(3) for s in range(4)], batch_steps
  runs = list(states.values())  # each cycle's params after every step, in the order the cycles ran
  assert len(runs) == 3 and all(len(r) == 4 for r in runs)
  for k, (previous, name) in enumerate([("s_c1", "s_c2"), ("s_c2", "s_c3")]):
    final_dir = str(tmp_path / previous / "final")
    last_step = jax.tree.map(lambda x: x[0], runs[k][-1])  # cycle k-1's weights after its last step
    teacher_dir, teacher = loaded_teachers[name]
    init_dir, init = loaded_inits[name]
    assert teacher_dir == init_dir == final_dir
    for got in (saved[final_dir]["params"], teacher["params"], init["params"]):
      jax.tree.map(np.testing.assert_array_equal, got, last_step)
    # ...and not an earlier snapshot: the weights moved during the cycle's last step.
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(runs[k][-2]), jax.tree.leaves(runs[k][-1])))


def test_every_row_of_the_table_fits_its_model():
  """mnist_self validates, and each row's terms trace (no compile) on its model's features at MNIST's shape."""
  from kd_jax.train import config as config_lib

  config = config_lib.validate(mnist_self.get_config())
  for name, row in config.rows.items():
    model = models.create(row.model, num_classes=10, **row.model_kwargs.to_dict())
    objective = Objective(row.terms.to_dict(), steps_per_epoch=10, num_train=64)
    images = jnp.zeros((2, 28, 28, 1), jnp.float32)

    def loss(images):
      (logits, features), _ = model.init_with_output({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                                                     images, train=True, return_features=True)
      student = Outputs(logits, features)
      teacher = Outputs(logits) if objective.needs_teacher else None
      params, state = objective.init(jax.random.PRNGKey(0), student, teacher)
      return objective(params, state, student, teacher, {"label": jnp.zeros(2, jnp.int32)}, step=jnp.asarray(0))[0]

    assert jax.eval_shape(loss, images).shape == (), name


# --- slow: each method learns on MNIST --------------------------------------------------------------------------

SHORT = {"snapshot_c3": 1, "multi_exit": 2, "sla_sd": 2}  # epochs (per cycle for snapshot_c3: 3 cycles)
THRESHOLDS = {"snapshot_c3": 0.97, "multi_exit": 0.97, "sla_sd": 0.97}


def short_run(row, workdir):
  """Row `row` of mnist_self (and the rows it depends on), each SHORT[row] epochs."""
  config = mnist_self.get_config()
  select_rows(config, row)
  for name in config.rows:
    config.rows[name].epochs = SHORT[row]
  config.mesh.data = 1
  config.progress = False
  return train.run(config, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("row", list(SHORT))
def test_each_method_learns_on_mnist(tmp_path, row):
  results = short_run(row, str(tmp_path))
  result = results[row]
  print(row, {k: v for k, v in result.items() if k.startswith("test_accuracy") or k == "cost"},
        result["wall_time_s"], "s")
  assert result["test_accuracy"] > THRESHOLDS[row], result["test_accuracy"]
  if row == "multi_exit":
    assert result["test_accuracy/exit_stage1"] > 0.96 and result["test_accuracy/exit_stage2"] > 0.97
    assert result["cost"]["exit_stage1"]["flops"] < result["cost"]["exit_stage2"]["flops"] \
        < result["cost"]["model"]["flops"]
  if row == "sla_sd":
    assert result["test_accuracy/aggregated"] > THRESHOLDS[row] and result["test_accuracy/sd"] > THRESHOLDS[row]
  if row == "snapshot_c3":  # distillation from the previous cycle's snapshot beyond its own first cycle
    assert result["test_accuracy"] > results["snapshot_c1"]["test_accuracy"] - 0.002
