"""Issue #11's teacher–student architecture methods: quantized distillation, residual-error KD,
progressive blockwise KD and Noisy Student (experiments/configs/mnist_students.py).

Default tests check each mechanism against an independent numpy formula or a
gradient property on tiny arrays; the `slow` tests train the table's rows on
MNIST for a few epochs and check that each method learns.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import mnist_students
from kd_jax import data, losses, models, train
from kd_jax.distill import Objective, Outputs
from kd_jax.models import quantized as quantized_lib
from kd_jax.train import checkpoint, loop
from kd_jax.train import config as config_lib
from kd_jax.train import planning as plan_lib
from kd_jax.train import stages

RNG = np.random.default_rng(0)


def np_quantize(w, bits, axes):
  """Polino et al. 2018's uniform quantiser, written out: scale to [0, 1] by min-max, round to 2^bits levels."""
  low, high = w.min(axis=axes, keepdims=True), w.max(axis=axes, keepdims=True)
  s = 2 ** bits - 1
  return np.round((w - low) / (high - low) * s) / s * (high - low) + low


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# --- quantized distillation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_quantizer_levels_match_the_numpy_formula(bits, scaling):
  w = RNG.normal(size=(30, 7)).astype(np.float32)
  axes = (0, 1) if scaling == "tensor" else (0,)
  q = np.asarray(quantized_lib.quantize(jnp.asarray(w), bits, scaling=scaling))
  np.testing.assert_allclose(q, np_quantize(w, bits, axes), rtol=1e-5, atol=1e-6)
  groups = [q] if scaling == "tensor" else [q[:, j] for j in range(q.shape[1])]
  for group, original in zip(groups, [w] if scaling == "tensor" else [w[:, j] for j in range(w.shape[1])]):
    assert len(np.unique(group)) <= 2 ** bits
    np.testing.assert_allclose([group.min(), group.max()], [original.min(), original.max()], rtol=1e-6)
  # The rounding error is at most half a level.
  step = (w.max(axis=axes) - w.min(axis=axes)) / (2 ** bits - 1)
  assert np.all(np.abs(q - w) <= step / 2 + 1e-5)


def test_quantizer_leaves_a_constant_tensor_and_rejects_bad_options():
  np.testing.assert_array_equal(quantized_lib.quantize(jnp.full((3, 2), 0.5), 2), np.full((3, 2), 0.5))
  with pytest.raises(ValueError, match="scaling"):
    quantized_lib.quantize(jnp.ones((2, 2)), 2, scaling="bucket")
  with pytest.raises(ValueError, match="bits"):
    models.create("quantized", num_classes=10, base="mlp", bits=0)
  with pytest.raises(ValueError, match="scaling"):
    models.create("quantized", num_classes=10, base="mlp", bits=4, scaling="row")


def test_straight_through_gradient_is_the_identity_and_the_value_is_exactly_quantized():
  w = jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32)
  cotangent = jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32)
  value, grad = jax.value_and_grad(lambda w: jnp.sum(cotangent * quantized_lib.straight_through(w, 2)))(w)
  np.testing.assert_array_equal(grad, cotangent)
  q = quantized_lib.straight_through(w, 2)
  np.testing.assert_array_equal(q, quantized_lib.quantize(w, 2))  # bit-exact, not w + (q − w)
  assert len(np.unique(np.asarray(q))) <= 4


def test_quantized_model_runs_its_base_on_quantized_kernels_with_float_biases():
  model = models.create("quantized", num_classes=3, base="mlp", bits=2, base_kwargs={"widths": [6]})
  base = models.create("mlp", num_classes=3, widths=[6])
  x = jnp.asarray(RNG.normal(size=(4, 5)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  assert set(params) == {"base"}
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(RNG.normal(size=p.shape), jnp.float32), params)

  @jax.jit
  def run(params):
    effective = quantized_lib.quantize_params(params["base"], 2)
    # STE: the master weights get the gradient of the base network at the quantized weights.
    grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)["base"]
    expected = jax.grad(lambda p: jnp.sum(base.apply({"params": p}, x) ** 2))(effective)
    return effective, model.apply({"params": params}, x), base.apply({"params": effective}, x), grad, expected

  effective, logits, base_logits, grad, expected = run(params)
  for layer in ("dense1", "head"):
    assert len(np.unique(np.asarray(effective[layer]["kernel"]))) <= 4
    np.testing.assert_array_equal(effective[layer]["bias"], params["base"][layer]["bias"])  # biases: float
  np.testing.assert_allclose(logits, base_logits, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, expected)


def test_quantized_resnet_keeps_its_batch_norm_statistics_in_float_and_mutable():
  model = models.create("quantized", num_classes=10, base="resnet8", bits=4)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  logits, updates = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
  assert logits.shape == (2, 10)
  assert jax.tree.map(jnp.shape, updates["batch_stats"]) == jax.tree.map(jnp.shape, variables["batch_stats"])


# --- residual-error KD --------------------------------------------------------------------------------------------

def test_residual_error_loss_matches_numpy_and_stops_the_gradient_at_the_target():
  a, t, s = (jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32) for _ in range(3))
  expected = np.mean((np.asarray(a) - (np.asarray(t) - np.asarray(s))) ** 2, axis=-1)
  np.testing.assert_allclose(losses.residual_error_loss(a, t, s), expected, rtol=1e-5)
  grads = jax.grad(lambda a, t, s: jnp.sum(losses.residual_error_loss(a, t, s)), argnums=(0, 1, 2))(a, t, s)
  np.testing.assert_allclose(grads[0], 2 * (a - (t - s)) / 6, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads[1], np.zeros((4, 6)))  # the target t − s is a constant
  np.testing.assert_array_equal(grads[2], np.zeros((4, 6)))
  with pytest.raises(ValueError, match="residual_error_loss"):
    losses.residual_error_loss(a, t, s[:, :5])


def test_residual_model_sums_student_and_assistant_and_builds_the_assistant_only_when_used():
  kwargs = dict(num_classes=3, student="mlp", assistant="mlp", student_kwargs={"widths": [8]},
                assistant_kwargs={"widths": [4]})
  x = jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)
  alone = models.create("residual", output="student", **kwargs)
  pair = models.create("residual", output="sum", **kwargs)
  alone_params = jax.eval_shape(alone.init, jax.random.PRNGKey(0), x)["params"]
  params = jax.jit(pair.init)(jax.random.PRNGKey(0), x)["params"]
  assert set(alone_params) == {"student"} and set(params) == {"student", "assistant"}
  logits, features = jax.jit(lambda p: pair.apply({"params": p}, x, return_features=True))(params)
  np.testing.assert_allclose(logits, features["student_logits"] + features["assistant_logits"], rtol=1e-6)
  assert {"stage1", "pre_logits", "assistant/stage1"} <= set(features)
  np.testing.assert_allclose(jax.jit(alone.apply)({"params": {"student": params["student"]}}, x),
                             features["student_logits"], rtol=1e-6)
  # The residual term trains the assistant only, and names what it misses on a student alone.
  objective = Objective({"residual": {}})
  teacher = Outputs(jnp.asarray(RNG.normal(size=(2, 3)), jnp.float32))
  student_grad = jax.jit(jax.grad(lambda p: objective(
      {}, {}, Outputs(*pair.apply({"params": p}, x, return_features=True)), teacher, {},
      step=jnp.zeros((), jnp.int32))[0]))(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(student_grad["student"]))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(student_grad["assistant"]))
  with pytest.raises(KeyError, match="assistant_logits"):
    jax.eval_shape(lambda p: objective({}, {}, Outputs(*alone.apply({"params": p}, x, return_features=True)),
                                       teacher, {}, step=jnp.zeros((), jnp.int32)), alone_params)
  with pytest.raises(ValueError, match="output"):
    models.create("residual", output="assistant", **kwargs)


# --- progressive blockwise KD ---------------------------------------------------------------------------------------

def _blockwise(k):
  return models.create("blockwise_mlp", num_classes=10, widths=[12, 12], rank=3, student_blocks=k)


def test_stage_k_hybrid_has_k_student_blocks_and_the_teachers_names_elsewhere():
  x = jnp.zeros((2, 8, 8, 1))
  teacher = jax.eval_shape(models.create("mlp", num_classes=10, widths=[12, 12]).init, jax.random.PRNGKey(0),
                           x)["params"]
  for k in range(3):
    params = jax.eval_shape(_blockwise(k).init, jax.random.PRNGKey(0), x)["params"]
    assert sorted(n for n in params if n.startswith("student_block")) == [f"student_block{i}" for i in range(1, k + 1)]
    assert sorted(n for n in params if n.startswith("dense")) == [f"dense{i}" for i in range(k + 1, 3)]
    assert params["head"]["kernel"].shape == teacher["head"]["kernel"].shape
  assert jax.tree.map(jnp.shape, jax.eval_shape(_blockwise(0).init, jax.random.PRNGKey(0), x)["params"]) == \
      jax.tree.map(jnp.shape, teacher)  # stage 0 is the teacher MLP, name for name
  block = jax.eval_shape(_blockwise(2).init, jax.random.PRNGKey(0), x)["params"]["student_block2"]
  assert block["down"]["kernel"].shape == (12, 3) and "bias" not in block["down"]
  assert block["up"]["kernel"].shape == (3, 12)
  with pytest.raises(ValueError, match="student_blocks"):
    models.create("blockwise_mlp", num_classes=10, widths=[12, 12], student_blocks=3)


def test_partial_init_and_frozen_teacher_blocks_leave_the_teacher_weights_unchanged(tmp_path):
  """Stage 1's row: the teacher's dense2 and head come from its checkpoint (init_partial) and stay frozen."""
  x = jnp.asarray(RNG.normal(size=(4, 8, 8, 1)), jnp.float32)
  teacher_model = models.create("mlp", num_classes=10, widths=[12, 12])
  teacher = jax.jit(teacher_model.init)(jax.random.PRNGKey(1), x)
  checkpoint.save_model(str(tmp_path / "teacher"), jax.device_get(teacher),
                        {"model": "mlp", "model_kwargs": {"widths": [12, 12]}, "num_classes": 10,
                         "input_shape": [8, 8, 1], "dataset": "digits"})
  hybrid = _blockwise(1)
  fresh = jax.tree.map(lambda p: p[None], jax.jit(hybrid.init)(jax.random.PRNGKey(0), x)["params"])  # [K=1, ...]
  start = stages.partial_init(str(tmp_path / "teacher"), {"params": fresh, "batch_stats": {}}, peers=1,
                               row_name="pbkd_stage1")
  params = jax.tree.map(lambda p: jnp.asarray(p[0]), start["params"])
  for layer in ("dense2", "head"):
    jax.tree.map(np.testing.assert_array_equal, params[layer], teacher["params"][layer])
  jax.tree.map(np.testing.assert_array_equal, params["student_block1"], jax.tree.map(lambda p: p[0],
                                                                                      fresh["student_block1"]))
  # The table's stage-1 row freezes the teacher's blocks: a few Adam steps on the real loss move only block 1.
  config = mnist_students.get_config()
  row = config.rows.pbkd_stage1
  objective = Objective(row.terms.to_dict())
  optimizer = plan_lib.with_frozen(optax.adam(0.1), train.plan(config, "pbkd_stage1", data.load("digits")).frozen)
  teacher_out = Outputs(*jax.jit(lambda v: teacher_model.apply(v, x, return_features=True))(teacher))
  row_params = {"student": params, "terms": {}}

  def loss(p):
    logits, feats = hybrid.apply({"params": p["student"]}, x, return_features=True)
    return objective({}, {}, Outputs(logits, feats), teacher_out, {"label": jnp.zeros(4, jnp.int32)},
                     step=jnp.zeros((), jnp.int32))[0]

  @jax.jit
  def three_steps(updated):
    state = optimizer.init(updated)
    for _ in range(3):
      updates, state = optimizer.update(jax.grad(loss)(updated), state, updated)
      updated = optax.apply_updates(updated, updates)
    return updated

  updated = three_steps(row_params)
  for layer in ("dense2", "head"):
    jax.tree.map(np.testing.assert_array_equal, updated["student"][layer], teacher["params"][layer])
  assert float(jnp.abs(updated["student"]["student_block1"]["up"]["kernel"]
                       - params["student_block1"]["up"]["kernel"]).max()) > 0
  config.rows.pbkd_stage1.optimizer.freeze = ["student/student_block7"]
  with pytest.raises(train.ConfigError, match="student_block7"):
    train.plan(config, "pbkd_stage1", data.load("digits"))
  with pytest.raises(train.ConfigError, match="init_partial found no param"):
    stages.partial_init(str(tmp_path / "teacher"), {"params": {"other": {"w": jnp.zeros((1, 2))}},
                                                    "batch_stats": {}}, peers=1, row_name="x")


# --- Noisy Student ----------------------------------------------------------------------------------------------

def test_cross_entropy_on_the_labelled_examples_matches_numpy():
  logits = jnp.asarray(RNG.normal(size=(6, 5)) * 2, jnp.float32)
  labels = jnp.asarray(RNG.integers(0, 5, 6), jnp.int32)
  labelled = jnp.asarray([1, 0, 0, 1, 1, 0], jnp.float32)
  objective = Objective({"ce": {}})
  step = jnp.zeros((), jnp.int32)
  value = objective({}, {}, Outputs(logits), None, {"label": labels, "labelled": labelled}, step=step)[0]
  ce = -np_log_softmax(np.asarray(logits))[np.arange(6), np.asarray(labels)]
  np.testing.assert_allclose(value, ce[[0, 3, 4]].mean(), rtol=1e-5)
  # Unlabelled examples' labels are never used: changing them changes nothing.
  other = labels.at[jnp.array([1, 2, 5])].set((labels[jnp.array([1, 2, 5])] + 1) % 5)
  np.testing.assert_allclose(objective({}, {}, Outputs(logits), None, {"label": other, "labelled": labelled},
                                       step=step)[0], value, rtol=1e-6)
  none = objective({}, {}, Outputs(logits), None, {"label": labels, "labelled": jnp.zeros(6)}, step=step)[0]
  assert float(none) == 0.0


@pytest.mark.parametrize("hard,temperature", [(False, 1.0), (False, 2.0), (True, 1.0)])
def test_pseudo_label_loss_matches_numpy(hard, temperature):
  s, t = (RNG.normal(size=(5, 4)).astype(np.float32) * 2 for _ in range(2))
  log_p = np_log_softmax(s)
  if hard:
    expected = -log_p[np.arange(5), t.argmax(-1)]
  else:
    expected = -np.sum(np.exp(np_log_softmax(t / temperature)) * log_p, -1)
  got = losses.pseudo_label_loss(jnp.asarray(s), jnp.asarray(t), hard=hard, temperature=temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  grad_t = jax.grad(lambda t: jnp.sum(losses.pseudo_label_loss(jnp.asarray(s), t, hard=hard,
                                                               temperature=temperature)))(jnp.asarray(t))
  np.testing.assert_array_equal(grad_t, np.zeros_like(t))
  with pytest.raises(ValueError, match="unknown option"):
    Objective({"pseudo_label": {"sharpen": True}})


def test_labelled_subset_is_fixed_by_the_seed_and_batches_carry_its_mask():
  subset = data.labelled_subset(100, 10, seed=0)
  assert subset.shape == (10,) and len(set(subset.tolist())) == 10 and np.all(np.diff(subset) > 0)
  np.testing.assert_array_equal(subset, data.labelled_subset(100, 10, seed=0))
  assert not np.array_equal(subset, data.labelled_subset(100, 10, seed=1))
  with pytest.raises(ValueError, match="labelled_examples"):
    data.labelled_subset(100, 101, seed=0)
  digits = data.load("digits")
  config = mnist_students.get_config()
  teacher_row, student_row = config.rows.ns_teacher, config.rows.ns_student1
  teacher_row.data.labelled_examples = student_row.data.labelled_examples = 200
  view = lambda row: plan_lib.DataView(batch_size=64, eval_batch_size=64, seed=3, labelled=row.data.labelled_examples,
                                       unlabelled=row.data.unlabelled)
  labelled_only, mask = loop._labelled_split(view(teacher_row), digits)
  assert mask is None and labelled_only.num_train == 200
  assert labelled_only.test_images.shape == digits.test_images.shape  # the test set is untouched
  np.testing.assert_array_equal(labelled_only.train_labels,
                                digits.train_labels[data.labelled_subset(digits.num_train, 200, seed=3)])
  everything, mask = loop._labelled_split(view(student_row), digits)
  assert everything.num_train == digits.num_train and mask.sum() == 200
  batch = loop._train_batch(everything, 64, seed=3, step=5, labelled=mask)
  np.testing.assert_array_equal(batch["labelled"][0],
                                np.isin(batch["index"][0], data.labelled_subset(digits.num_train, 200, seed=3)))


def test_bad_row_options_are_named():
  config = mnist_students.get_config("ns_student1")
  config.rows.ns_student1.data.unlabelled = "ignore"
  with pytest.raises(ValueError, match="unlabelled"):
    config_lib.validate(config)
  config = mnist_students.get_config("rekd")
  config.rows.rekd.init["from"] = ""
  with pytest.raises(ValueError, match="init.partial"):
    config_lib.validate(config)


# --- slow: each method learns on MNIST ---------------------------------------------------------------------------

SHORT_EPOCHS = 1  # every student row; the shared teacher trains for TEACHER_EPOCHS
TEACHER_EPOCHS = 3
NS_TEACHER_EPOCHS = 100  # 1000 labelled examples: 7 steps an epoch
NS_STUDENT_EPOCHS = 3  # the noised students (dropout, jitter) learn slower: 1 epoch gave 90.6% < the teacher's 95.1%


@pytest.fixture(scope="module")
def mnist_table(tmp_path_factory):
  """`run(rows) -> results`: rows of mnist_students.py, shortened, trained in one workdir (the teacher once)."""
  workdir = str(tmp_path_factory.mktemp("mnist_students"))

  def run(rows):
    config = mnist_students.get_config(rows)
    for name in config.rows:
      config.rows[name].epochs = {"teacher": TEACHER_EPOCHS, "ns_teacher": NS_TEACHER_EPOCHS,
                                  "ns_student1": NS_STUDENT_EPOCHS, "ns_student2": NS_STUDENT_EPOCHS}.get(
                                      name, SHORT_EPOCHS)
    config.mesh.data = 1  # one device: 8 fake CPU devices only slow a long run down on a small machine
    config.progress = False
    return workdir, train.run(config, workdir)

  return run


def _report(results, rows):
  for row in rows:
    r = results[row]
    print(f"{row}: test accuracy {r['test_accuracy']:.4f} ({r['test_errors']} errors), {r['num_params']} params, "
          f"{r['steps']} steps, {r['wall_time_s']} s")


def _params(workdir, row):
  return checkpoint.load_model(f"{workdir}/{row}/final")[0]["params"]


@pytest.mark.slow
def test_quantized_distillation_learns_at_2_4_and_8_bits(mnist_table):
  rows = ["kd", "kd_q2", "kd_q4", "kd_q8", "ce_q2", "ce_q4", "ce_q8"]
  workdir, results = mnist_table(",".join(rows))
  _report(results, ["teacher"] + rows)
  floors = {2: 0.85, 4: 0.94, 8: 0.95}
  for bits, floor in floors.items():
    assert results[f"kd_q{bits}"]["test_accuracy"] > floor, (bits, results[f"kd_q{bits}"]["test_accuracy"])
    assert results[f"ce_q{bits}"]["test_accuracy"] > floor - 0.05
    # The evaluated network's weight matrices take at most 2^k values each (biases stay float).
    effective = quantized_lib.quantize_params(jax.tree.map(jnp.asarray, _params(workdir, f"kd_q{bits}")["base"]),
                                              bits)
    for layer in ("dense1", "dense2", "head"):
      assert len(np.unique(np.asarray(effective[layer]["kernel"]))) <= 2 ** bits, (bits, layer)
  assert results["kd"]["test_accuracy"] > 0.95


@pytest.mark.slow
def test_residual_error_kd_student_plus_assistant(mnist_table):
  workdir, results = mnist_table("rekd")
  _report(results, ["rekd_student", "rekd"])
  student, pair = results["rekd_student"], results["rekd"]
  print(f"student alone {student['num_params']} params, assistant {pair['num_params'] - student['num_params']}")
  assert student["test_accuracy"] > 0.95 and pair["test_accuracy"] > 0.95
  # Stage 2 left the student as stage 1 trained it (frozen): only the assistant moved.
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, "rekd")["student"],
               _params(workdir, "rekd_student")["student"])


@pytest.mark.slow
def test_progressive_blockwise_kd_replaces_the_teacher_blocks(mnist_table):
  workdir, results = mnist_table("pbkd_stage2")
  _report(results, ["teacher", "pbkd_stage1", "pbkd_stage2"])
  teacher, stage1, stage2 = (_params(workdir, r) for r in ("teacher", "pbkd_stage1", "pbkd_stage2"))
  # Frozen blocks did not change: the teacher's dense2/head in stage 1, block 1 and the head in stage 2.
  for layer in ("dense2", "head"):
    jax.tree.map(np.testing.assert_array_equal, stage1[layer], teacher[layer])
  jax.tree.map(np.testing.assert_array_equal, stage2["student_block1"], stage1["student_block1"])
  jax.tree.map(np.testing.assert_array_equal, stage2["head"], teacher["head"])
  assert {"student_block1", "student_block2", "head"} == set(stage2)  # all student blocks
  assert results["pbkd_stage2"]["num_params"] < results["teacher"]["num_params"] / 4
  assert results["pbkd_stage1"]["test_accuracy"] > 0.95 and results["pbkd_stage2"]["test_accuracy"] > 0.95


@pytest.mark.slow
def test_noisy_students_learn_from_1000_labels(mnist_table):
  workdir, results = mnist_table("ns_student2")
  _report(results, ["ns_teacher", "ns_student1", "ns_student2"])
  assert results["ns_teacher"]["test_accuracy"] > 0.93  # measured 0.9505 (1000 labels, 100 epochs)
  # Measured after 3 epochs: 0.9355 and 0.9293 (chance is 0.1; CE alone sees 1000 labels).
  assert results["ns_student1"]["test_accuracy"] > 0.92
  assert results["ns_student2"]["test_accuracy"] > 0.92


@pytest.mark.slow
@pytest.mark.xfail(reason="not reproduced in short runs: after 3 epochs the noised students (dropout 50%/20%, "
                          "jitter; the teacher labels clean images) reach 0.9355 / 0.9293 against their "
                          "teacher's 0.9505; the table's 60 epochs have not been run", strict=True)
def test_noisy_students_beat_their_labelled_only_teacher(mnist_table):
  _, results = mnist_table("ns_student2")
  teacher = results["ns_teacher"]["test_accuracy"]
  assert results["ns_student1"]["test_accuracy"] > teacher
  assert results["ns_student2"]["test_accuracy"] > teacher
