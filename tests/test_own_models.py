"""A user's own models and data through `train.run`: linen and NNX models, a teacher trained elsewhere, numpy and
TFDS data, and the registries' rules for names registered again."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from kd_jax import data, models, train
from kd_jax.models import teachers
from kd_jax.train import checkpoint, engine, loop, planning, stages
from kd_jax.train import mesh as mesh_lib


class UserCNN(nn.Module):
  """A linen CNN as a user writes it: no `return_features`, a `train` flag for its BatchNorm."""

  num_classes: int
  width: int = 8

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(self.width, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8, name="bn1")(x))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2, name="conv2")(x))
    return nn.Dense(self.num_classes, name="head")(x.reshape((x.shape[0], -1)))


class NNXNet(nnx.Module):
  """The same network in NNX, with dropout and a list of layers (integer keys in its state)."""

  def __init__(self, num_classes, width=8, *, rngs):
    self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, momentum=0.8, rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
    self.mlp = nnx.List([nnx.Linear(32 * width, 32, rngs=rngs)])
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(32, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.conv2(x))
    x = x.reshape((x.shape[0], -1))
    return self.head(self.drop(nnx.relu(self.mlp[0](x))))


class PlainMLP(nn.Module):
  """A teacher trained outside kd_jax: no train flag, no features."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, name="out")(nn.relu(nn.Dense(64, name="hidden")(x)))


# A plain dict of feature paths, as the WithFeatures docstring shows.
models.register("own_cnn_teacher", input_shape=(8, 8, 1))(
    lambda num_classes: models.WithFeatures(UserCNN(num_classes, width=16), {"block1": "bn1", "block2": "conv2"}))
# A plain module: `create` wraps it, its features are its submodules by path ("conv2").
models.register("own_cnn", input_shape=(8, 8, 1))(lambda num_classes, width=4: UserCNN(num_classes, width=width))
models.register("own_nnx", input_shape=(8, 8, 1))(
    lambda num_classes, width=4: models.from_nnx(NNXNet, num_classes, width=width,
                                                 features={"block1": "bn1", "block2": "conv2"}))
models.register("own_plain_mlp", input_shape=(64,))(lambda num_classes: PlainMLP(num_classes))


def _digits_features():
  digits = sk_datasets.load_digits()
  x, y = digits.data.astype(np.float32), digits.target
  train_x, test_x, train_y, test_y = model_selection.train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
  return data.from_arrays("own_digits_features", (train_x, train_y), (test_x, test_y), mean=train_x.mean(0),
                          std=train_x.std(0) + 1.0)


data.register("own_digits_features", lambda directory: _digits_features())


def _config(dataset="digits", epochs=2):
  c = train.base_config()
  c.epochs = epochs
  c.data.name = dataset
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.log_every_steps = 1
  c.progress = False
  return c


ADAM = {"name": "adam", "learning_rate": 1e-2}


def _metrics(workdir, row):
  with open(os.path.join(workdir, row, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


def test_linen_and_nnx_teachers_and_students_with_feature_terms_by_path(tmp_path):
  c = _config(epochs=3)
  c.rows.linen_teacher = train.row(model="own_cnn_teacher", terms={"ce": {}}, optimizer=ADAM)
  c.rows.nnx_teacher = train.row(model="own_nnx", model_kwargs={"width": 16}, terms={"ce": {}}, optimizer=ADAM)
  # NNX student from a linen teacher; AT between the features the two WithFeatures/from_nnx maps name.
  c.rows.nnx_student = train.row(model="own_nnx", teacher="linen_teacher", optimizer=ADAM, terms={
      "ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0},
      "at": {"weight": 100.0, "student_features": ["block1", "block2"], "teacher_features": ["block1", "block2"]}})
  # Linen student (wrapped by create: features by module path) from an NNX teacher.
  c.rows.linen_student = train.row(model="own_cnn", teacher="nnx_teacher", optimizer=ADAM, terms={
      "kd": {"temperature": 4.0}, "hint": {"weight": 0.1, "student_feature": "conv2", "teacher_feature": "block2"}})
  workdir = str(tmp_path)
  results = train.run(c, workdir)
  for row in c.rows:
    assert results[row]["test_accuracy"] > 0.85, (row, results[row]["test_accuracy"])
  # The feature terms read real features and learned from them.
  for row, term in (("nnx_student", "loss/at"), ("linen_student", "loss/hint")):
    values = [r[term] for r in _metrics(workdir, row)]
    assert np.mean(values[-5:]) < 0.85 * np.mean(values[:3]), (row, term, values[:3], values[-5:])
  # The wrapped modules' variables sit under "module"; NNX BatchNorm statistics were trained.
  variables, description = checkpoint.load_model(os.path.join(workdir, "nnx_student", "final"))
  assert description["model"] == "own_nnx" and set(variables["params"]) == {"module"}
  assert float(np.abs(variables["batch_stats"]["module"]["bn1"]["mean"]).max()) > 1e-3
  assert set(checkpoint.load_model(os.path.join(workdir, "linen_student", "final"))[0]["params"]) == {"module"}
  # The AT term saw the NNX student's and the linen teacher's own activations: a student reloaded from final/
  # gives the accuracy the run reported.
  dataset = data.load("digits")
  module, teacher_variables = stages.load_teacher(os.path.join(workdir, "nnx_student", "final"), dataset, row_name="t")
  assert _kd_jax_accuracy(module, teacher_variables, dataset)[1] == results["nnx_student"]["test_errors"]


def _kd_jax_accuracy(module, variables, dataset):
  mesh = mesh_lib.make_mesh()
  eval_step = engine.make_eval_step(module, planning.normalizer(dataset), mesh)
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], variables)
  result = loop.evaluate(eval_step, stacked, dataset, 360, mesh)
  return result["test_accuracy"], result["test_errors"]


def test_teacher_trained_elsewhere_from_msgpack_distils_a_student(tmp_path):
  dataset = data.load("own_digits_features")
  assert dataset.input_dtype == np.float32 and dataset.input_shape == (64,)
  assert abs(float(dataset.train_images.mean())) < 1e-4  # normalised on the host with the given mean
  # The teacher's own training loop: plain flax + optax, full batch.
  teacher = PlainMLP(10)
  params = teacher.init(jax.random.key(0), dataset.train_images[:1])["params"]
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        teacher.apply({"params": p}, dataset.train_images), dataset.train_labels).mean()
    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for _ in range(150):
    params, opt_state = step(params, opt_state)
  outside_correct = int(np.sum(np.argmax(teacher.apply({"params": params}, dataset.test_images), -1)
                              == dataset.test_labels))
  assert outside_correct > 0.9 * 360
  path = tmp_path / "teacher.msgpack"
  path.write_bytes(serialization.to_bytes({"params": params}))
  # Imported by the command line; the plain module's params are nested under "module" (create wraps it).
  teacher_dir = teachers.main(["--model=own_plain_mlp", f"--variables={path}", "--num_classes=10",
                               "--input_shape=64", f"--out={tmp_path / 'teacher'}"])
  module, variables = stages.load_teacher(teacher_dir, dataset, row_name="check")
  assert set(variables["params"]) == {"module"}
  assert _kd_jax_accuracy(module, variables, dataset)[1] == 360 - outside_correct
  # A student on the float ArrayDataset learns from it with the KD term alone (no labels).
  c = _config("own_digits_features", epochs=4)
  c.rows.student = train.row(model="mlp", model_kwargs={"widths": [32]}, teacher=teacher_dir, optimizer=ADAM,
                             terms={"kd": {"temperature": 2.0}})
  result = train.run(c, str(tmp_path / "run"))["student"]
  assert result["test_accuracy"] > 0.85
  losses = [r["loss/kd"] for r in _metrics(str(tmp_path / "run"), "student")]
  assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3])


def test_import_teacher_checks_the_variables(tmp_path):
  params = PlainMLP(10).init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
  # Nested under "module" already, or not: the same directory content.
  a = teachers.import_teacher(str(tmp_path / "a"), "own_plain_mlp", params, num_classes=10, input_shape=(64,))
  b = teachers.import_teacher(str(tmp_path / "b"), "own_plain_mlp", {"params": {"module": params}}, num_classes=10,
                              input_shape=(64,))
  np.testing.assert_array_equal(checkpoint.load_model(a)[0]["params"]["module"]["out"]["kernel"],
                                checkpoint.load_model(b)[0]["params"]["module"]["out"]["kernel"])
  with pytest.raises(ValueError, match=r"do not fit.*module/hidden/kernel: \(64, 64\) vs \(32, 64\)"):
    teachers.import_teacher(str(tmp_path / "c"), "own_plain_mlp", params, num_classes=10, input_shape=(32,))
  with pytest.raises(ValueError, match=r"missing \['params/module/out/bias'\]"):
    teachers.import_teacher(str(tmp_path / "d"), "own_plain_mlp",
                            {"hidden": params["hidden"], "out": {"kernel": params["out"]["kernel"]}},
                            num_classes=10, input_shape=(64,))


def test_nnx_model_follows_the_protocol_with_batch_stats_and_dropout():
  model = models.create("own_nnx", num_classes=10)
  assert hash(model) == hash(models.create("own_nnx", num_classes=10))  # a static argument of the jitted steps
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  variables = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]["module"]) == {"conv1", "bn1", "conv2", "mlp", "head"}
  logits, feats = model.apply(variables, x, return_features=True)
  assert logits.shape == (4, 10) and {k: v.shape for k, v in feats.items()} == {
      "block1": (4, 8, 8, 4), "block2": (4, 4, 4, 8)}
  # The recorded feature is the submodule's output: BatchNorm (running statistics) of the first convolution.
  own = jax.tree.map(np.asarray, variables["params"]["module"])
  conv1 = np.asarray(nn.Conv(4, (3, 3)).apply({"params": own["conv1"]}, x))
  bn = jax.tree.map(np.asarray, variables["batch_stats"]["module"]["bn1"])
  expected = (conv1 - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * own["bn1"]["scale"] + own["bn1"]["bias"]
  np.testing.assert_allclose(feats["block1"], expected, rtol=1e-5, atol=1e-5)
  assert sorted(models.nnx_feature_paths(model, variables, x)) == ["bn1", "conv1", "conv2", "drop", "head", "mlp/0"]
  # Training: BatchNorm uses batch statistics and updates the running ones; dropout draws from the rng.
  train_logits = [model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(k)})
                  for k in (3, 4)]
  (first, updates), (second, _) = train_logits
  assert set(updates) == {"batch_stats"}
  assert not np.allclose(updates["batch_stats"]["module"]["bn1"]["mean"], bn["mean"])
  assert not np.allclose(first, second)  # different dropout masks
  np.testing.assert_allclose(model.apply(variables, x), logits)  # eval: deterministic


def test_with_features_takes_a_plain_dict_and_is_hashable():
  a = models.WithFeatures(UserCNN(10), {"stage1": "bn1", "stage2": "conv2"})
  b = models.WithFeatures(UserCNN(10), {"stage1": "bn1", "stage2": "conv2"})
  assert hash(a) == hash(b) and a == b and a.feature_map == {"stage1": "bn1", "stage2": "conv2"}
  x = jnp.ones((2, 8, 8, 1))
  variables = a.init(jax.random.key(0), x)
  _, feats = jax.jit(lambda m, v: m.apply(v, x, return_features=True), static_argnums=0)(a, variables)
  _, by_path = models.capture(UserCNN(10), {k: v["module"] for k, v in variables.items()}, x, ["bn1", "conv2"])
  np.testing.assert_array_equal(feats["stage2"], by_path["conv2"])
  # A list of paths names each feature by its path; None (what `create` gives a plain module) takes them all.
  listed = models.WithFeatures(UserCNN(10), ["conv2"]).apply(variables, x, return_features=True)[1]
  assert list(listed) == ["conv2"]
  every = models.create("own_cnn", num_classes=10, width=8)
  assert isinstance(every, models.WithFeatures)
  assert sorted(every.apply(variables, x, return_features=True)[1]) == ["bn1", "conv1", "conv2", "head"]
  with pytest.raises(ValueError, match="features must be a dict"):
    models.WithFeatures(UserCNN(10), "conv2")


def test_registering_a_name_again():
  source = "def build(num_classes):\n  return UserCNN(num_classes)\n"
  defined = [{}, {}]
  for namespace in defined:  # a config file imported twice: two function objects, one definition
    exec(compile(source, "my_config.py", "exec"), {"UserCNN": UserCNN}, namespace)
  assert defined[0]["build"] is not defined[1]["build"]
  models.register("own_twice", input_shape=(8, 8, 1))(defined[0]["build"])
  models.register("own_twice", input_shape=(8, 8, 1))(defined[1]["build"])
  assert models.spec("own_twice").constructor is defined[1]["build"]
  with pytest.raises(ValueError, match=r"model 'own_twice' is already registered .*my_config.py:1"):
    models.register("own_twice", input_shape=(8, 8, 1))(lambda num_classes: UserCNN(num_classes))
  with pytest.raises(ValueError, match="already registered"):  # same constructor, other input shape
    models.register("own_twice", input_shape=(16, 16, 1))(defined[0]["build"])
  with pytest.raises(ValueError, match="already registered"):
    models.register("resnet8", input_shape=(32, 32, 3))(defined[0]["build"])
  # Datasets: the same rule.
  loader = lambda directory: _digits_features()  # noqa: E731
  data.register("own_data_twice", loader)
  data.register("own_data_twice", loader)
  with pytest.raises(ValueError, match="dataset 'own_data_twice' is already registered"):
    data.register("own_data_twice", lambda directory: None)
  data.register_tfds("own_tfds_twice", tfds_name="mnist")
  data.register_tfds("own_tfds_twice", tfds_name="mnist")
  with pytest.raises(ValueError, match="already registered"):
    data.register_tfds("own_tfds_twice", tfds_name="kmnist")
  with pytest.raises(ValueError, match="already registered"):
    data.register_tfds("own_tfds_twice", tfds_name="mnist", mean=(0.5,))


def test_from_arrays_normalises_and_holds_out_a_test_split():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, (100, 5, 3)).astype(np.float64)
  y = rng.integers(0, 4, 100)
  ds = data.from_arrays("own_tabular", (x, y), mean=3.0, std=2.0, test_fraction=0.25)
  assert (ds.num_train, ds.test_images.shape[0], ds.num_classes) == (75, 25, 4)
  assert ds.input_dtype == np.float32 and ds.input_shape == (5, 3)
  joined = np.concatenate([ds.train_images, ds.test_images])
  np.testing.assert_allclose(np.sort(joined.ravel()), np.sort(((x - 3.0) / 2.0).ravel()), rtol=1e-5, atol=1e-6)
  batch = next(ds.test_batches(16, rows=slice(None)))
  assert batch["image"].shape == (16, 5, 3) and batch["mask"].sum() == 16
  last = list(ds.test_batches(16))[-1]
  assert last["mask"].sum() == 9 and not last["image"][9:].any()
  # uint8 images stay uint8, normalised on device with per-channel constants.
  images = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
  pixels = data.from_arrays("own_pixels", (images, np.arange(20) % 2), (images[:4], np.zeros(4, int)),
                            mean=(0.5, 0.4, 0.3), std=0.25)
  assert pixels.input_dtype == np.uint8 and pixels.std == (0.25, 0.25, 0.25) and pixels.scale == 1 / 255
  with pytest.raises(ValueError, match="do not broadcast"):
    data.from_arrays("own_bad", (x, y), mean=np.zeros(4))
  with pytest.raises(ValueError, match="labels must be integers"):
    data.from_arrays("own_bad", (x, y.astype(float)))


def test_unlisted_tfds_dataset_trains_through_register_tfds(tmp_path):
  import tensorflow_datasets as tfds

  data.register_tfds("own_fashion", tfds_name="fashion_mnist", mean=0.3, std=0.35)
  c = _config("own_fashion", epochs=1)
  c.data.batch_size, c.data.eval_batch_size = 16, 16
  c.rows.student = train.row(model="mlp", model_kwargs={"widths": [16]}, terms={"ce": {}}, optimizer=ADAM)
  with tfds.testing.mock_data(num_examples=48):
    dataset = data.load("own_fashion")
    result = train.run(c, str(tmp_path))["student"]
  assert (dataset.name, dataset.num_classes, dataset.input_shape) == ("own_fashion", 10, (28, 28, 1))
  assert dataset.mean == (0.3,) and dataset.std == (0.35,) and dataset.num_train == 48
  assert result["steps"] == 3 and 0.0 <= result["test_accuracy"] <= 1.0
  assert result["test_errors"] == round(48 * (1 - result["test_accuracy"]))


def test_model_kwargs_from_json_keep_the_models_hashable():
  class Widths(nn.Module):
    num_classes: int
    widths: object

    @nn.compact
    def __call__(self, x, return_features=False):
      return nn.Dense(self.num_classes)(x)

  models.register("own_unhashable", input_shape=None)(lambda num_classes, widths: Widths(num_classes, widths))
  with pytest.raises(ValueError, match=r"model 'own_unhashable': the module is not hashable .*\['widths'\]"):
    models.create("own_unhashable", num_classes=3, widths=[4, 4])
  assert hash(models.create("own_unhashable", num_classes=3, widths=(4, 4)))
  # from_nnx freezes its arguments itself (row.model_kwargs arrive as JSON lists and dicts).
  net = models.from_nnx(NNXNet, 10, width=4, extra=[1, {"a": [2]}])
  assert hash(net) and dict(net.kwargs)["extra"] == (1, {"a": (2,)})


def test_import_an_nnx_teacher_from_its_state(tmp_path):
  net = NNXNet(10, width=4, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
  net.train()
  net(x)  # BatchNorm statistics move away from their init
  net.eval()
  directory = teachers.import_teacher(str(tmp_path / "nnx"), "own_nnx", nnx.state(net), num_classes=10,
                                      input_shape=(8, 8, 1))
  dataset = data.load("digits")
  module, variables = stages.load_teacher(directory, dataset, row_name="check")
  assert set(variables) == {"params", "batch_stats"}
  np.testing.assert_allclose(module.apply(variables, x), net(x), rtol=1e-5, atol=1e-5)


def test_with_features_and_module_paths_see_inside_an_nnx_bridge():
  from flax.nnx import bridge

  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  ours = models.from_nnx(NNXNet, 10, width=4, features={"s": "conv2"})
  variables = ours.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
  to_linen = bridge.ToLinen(NNXNet, args=(10,), kwargs={"width": 4})  # as a user writes it
  wrapped = models.WithFeatures(to_linen, {"s": "conv2"})
  assert hash(wrapped)
  np.testing.assert_array_equal(wrapped.apply(variables, x, return_features=True)[1]["s"],
                                ours.apply(variables, x, return_features=True)[1]["s"])
  paths = models.module_paths(to_linen, {c: tree["module"] for c, tree in variables.items()}, x)
  assert paths == models.module_paths(ours, variables, x) == models.module_paths(wrapped, variables, x)
  assert paths["conv2"] == (3, 4, 4, 8) and paths["mlp/0"] == (3, 32)
  # Registered as it is, a ToLinen becomes the zoo-protocol FromNNX (every attribute path a feature).
  models.register("own_to_linen", input_shape=(8, 8, 1))(
      lambda num_classes: bridge.ToLinen(NNXNet, args=(num_classes,), kwargs={"width": 4}))
  created = models.create("own_to_linen", num_classes=10)
  assert isinstance(created, models.FromNNX) and hash(created)
  np.testing.assert_array_equal(created.apply(variables, x, return_features=True)[1]["conv2"],
                                ours.apply(variables, x, return_features=True)[1]["s"])
