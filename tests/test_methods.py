"""Every method term through the one engine: digits MLP tables and CIFAR-shaped ResNets."""
import json
import os

import jax
import numpy as np
import pytest

from kd_jax import data, train
from kd_jax.train import checkpoint
from experiments.configs import mnist_methods


def _synthetic_cifar(directory):
  del directory
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 80).astype(np.int32)
  # Class-dependent colour so a few steps can learn something.
  images = (rng.integers(0, 60, (80, 32, 32, 3)) + labels[:, None, None, None] * 19).astype(np.uint8)
  return data.Dataset("synthetic_cifar", images[:64], labels[:64], images[64:], labels[64:], num_classes=10)


if "synthetic_cifar" not in data.names():
  data.register("synthetic_cifar", _synthetic_cifar)


def digits_table():
  """The MNIST method table on digits, one epoch per row (same rows, same terms)."""
  config = mnist_methods.get_config()
  config.data.name = "digits"
  config.data.batch_size = 64
  config.data.eval_batch_size = 360
  config.epochs = 1
  config.progress = False
  config.rows.teacher.data.augment = "none"  # a 2-pixel jitter wrecks 8x8 digits
  config.mesh.data = 1  # 19 rows' compiles: 8-device sharding is covered by the 20-step tests below
  return config


@pytest.fixture(scope="module")
def digits_results(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits_table"))
  return workdir, train.run(digits_table(), workdir)


def test_every_row_of_the_mnist_method_table_trains(digits_results):
  _, results = digits_results
  assert set(results) == set(digits_table().rows)
  table = digits_table()
  for name, result in results.items():
    assert np.isfinite(result["test_loss"]), name
    if set(table.rows[name].terms) == {"hint"}:
      continue  # FitNets' hint stage trains the lower layers only: its classifier is still untrained
    assert result["test_accuracy"] > 0.3, (name, result["test_accuracy"])  # 22 steps; chance is 0.1


def test_ban_reports_the_ensemble_of_generations(digits_results):
  workdir, results = digits_results
  gen2 = results["ban_gen2"]
  assert 0.3 < gen2["ensemble_test_accuracy"] <= 1.0
  assert len(results["dml"]["peer_test_accuracy"]) == 2 and len(results["codistill"]["peer_test_accuracy"]) == 2


def test_weight_distillation_exports_a_plain_student(digits_results):
  """Phase 1's exported model is the generated student: an mlp_800 param tree usable without the generator."""
  workdir, results = digits_results
  assert results["wd_generate"]["num_params"] == results["student"]["num_params"]
  variables, description = checkpoint.load_model(os.path.join(workdir, "wd_generate", "final"))
  assert (description["model"], description["model_kwargs"]) == ("mlp_800", {})
  from kd_jax import models
  student = models.create("mlp_800", num_classes=10)
  shapes = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32)))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda x: x.shape, variables)
  digits = data.load("digits")
  logits = student.apply(variables, digits.test_images.astype(np.float32) / 16.0)
  accuracy = float(np.mean(np.argmax(logits, -1) == digits.test_labels))
  np.testing.assert_allclose(accuracy, results["wd_generate"]["test_accuracy"], atol=1e-6)


def test_fitnets_stage_two_starts_from_stage_one(digits_results, tmp_path):
  workdir, _ = digits_results
  config = digits_table()
  hint = checkpoint.load_model(os.path.join(workdir, "fitnets_hint", "final"))[0]
  # A second stage with a zero learning rate must end exactly where the first stage ended.
  config.rows.fitnets.optimizer.learning_rate = 0.0
  from experiments.configs import select_rows
  select_rows(config, "fitnets")
  for name in ("teacher", "fitnets_hint"):
    os.symlink(os.path.join(workdir, name), str(tmp_path / name))
  train.run(config, str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_model(str(tmp_path / "fitnets" / "final"))[0], hint)


def test_init_from_another_model_is_refused(digits_results, tmp_path):
  workdir, _ = digits_results
  config = digits_table()
  from experiments.configs import select_rows
  select_rows(config, "student")
  config.rows.student.init["from"] = os.path.join(workdir, "teacher", "final")
  with pytest.raises(ValueError, match=r"init_from .* holds a mlp_1200 .* but the row trains a mlp_800"):
    train.run(config, str(tmp_path))


def test_missing_feature_lists_the_available_ones(tmp_path):
  config = digits_table()
  from experiments.configs import select_rows
  select_rows(config, "fitnets_hint")
  config.rows.fitnets_hint.terms.hint.student_feature = "stage7"
  with pytest.raises(KeyError, match=r"the student has no feature 'stage7'; available features: \['pre_logits', "):
    train.run(config, str(tmp_path))


def cifar_table():
  config = train.base_config()
  config.data.name = "synthetic_cifar"
  config.data.batch_size = 32
  config.data.eval_batch_size = 16
  config.epochs = 1
  config.progress = False
  sgd = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
  config.rows.teacher = train.row(model="resnet32x4", terms={"ce": {}}, optimizer=sgd)
  stages = ["stage1", "stage2", "stage3"]
  methods = {
      "kd": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}},
      "at": {"ce": {}, "at": {"weight": 1000.0, "student_features": stages, "teacher_features": stages}},
      "hint": {"ce": {}, "hint": {"weight": 100.0, "student_feature": "stage2", "teacher_feature": "stage2"}},
      "sp": {"ce": {}, "sp": {"weight": 3000.0}},
      "rkd": {"ce": {}, "rkd": {}},
      "pkt": {"ce": {}, "pkt": {"weight": 30000.0}},
      "dkd": {"ce": {}, "dkd": {"warmup_epochs": 1}},
      "dist": {"ce": {}, "dist": {}},
      "nst": {"ce": {}, "nst": {"weight": 50.0}},
      "cc": {"ce": {}, "cc": {"weight": 0.02}},
      "vid": {"ce": {}, "vid": {}},
      "ab": {"ab": {}},
      "crd": {"ce": {}, "crd": {"weight": 0.8, "num_negatives": 32}},
      "crd_kd": {"ce": {}, "kd": {}, "crd": {"weight": 0.8, "num_negatives": 32}},
  }
  for name, terms in methods.items():
    config.rows[name] = train.row(model="resnet8x4", teacher="teacher", terms=terms, optimizer=sgd)
  return config


@pytest.mark.slow
def test_cifar_resnets_train_under_every_method(tmp_path):
  results = train.run(cifar_table(), str(tmp_path))
  for name, result in results.items():
    assert np.isfinite(result["test_loss"]), name


@pytest.mark.slow  # ~60 s of compiles; the pair's rows are traced by test_configs_smoke, 8-device steps below
def test_resnet32x4_to_resnet8x4_kd_step_on_eight_devices(tmp_path):
  config = cifar_table()
  from experiments.configs import select_rows
  select_rows(config, "kd")
  results = train.run(config, str(tmp_path))
  assert set(results) == {"teacher", "kd"}
  assert all(np.isfinite(r["test_loss"]) for r in results.values())
  assert results["kd"]["num_params"] == 1_233_540 - (256 * 90 + 90)  # 10 classes here, 100 in the paper table


def test_byot_trains_the_exits_from_the_deepest_classifier(tmp_path):
  config = train.base_config()
  config.epochs = 3
  config.data.batch_size = 64
  config.data.eval_batch_size = 360
  config.progress = False
  config.rows.byot = train.row(
      model="with_exits", model_kwargs={"base": "mlp", "stages": ["stage1"], "base_kwargs": {"widths": [64, 64]}},
      terms={"ce": {}, "byot": {"stages": ["stage1"]}}, optimizer={"name": "adam", "learning_rate": 3e-3})
  result = train.run(config, str(tmp_path))["byot"]
  assert result["test_accuracy"] > 0.8
  variables = checkpoint.load_model(str(tmp_path / "byot" / "final"))[0]
  from kd_jax import models
  exits = models.create("with_exits", num_classes=10, base="mlp", stages=["stage1"], base_kwargs={"widths": [64, 64]})
  images = data.load("digits").test_images.astype(np.float32) / 16.0
  _, features = exits.apply(variables, images, return_features=True)
  exit_accuracy = np.mean(np.argmax(features["exit_stage1_logits"], -1) == data.load("digits").test_labels)
  assert exit_accuracy > 0.7  # the early exit learned to classify too


def _twenty_step_config(terms, model, teacher_model, data_name, batch_size, learning_rate=0.05):
  config = train.base_config()
  config.data.name = data_name
  config.data.batch_size = batch_size
  config.data.eval_batch_size = 360 if data_name == "digits" else 16
  config.log_every_steps = 1
  config.progress = False
  sgd = {"name": "sgd", "learning_rate": learning_rate, "momentum": 0.9}
  steps_per_epoch = data.load(data_name).num_train // batch_size
  config.epochs = -(-20 // steps_per_epoch)
  config.rows.teacher = train.row(model=teacher_model[0], model_kwargs=teacher_model[1], terms={"ce": {}},
                                  optimizer=sgd, epochs=1)
  config.rows.student = train.row(model=model[0], model_kwargs=model[1], teacher="teacher", terms=terms,
                                  optimizer=sgd)
  return config


DEVICE_CASES = {
    "kd": ({"ce": {"weight": 0.1}, "kd": {"weight": 0.9}}, ("mlp", {"widths": [32]}), ("mlp", {"widths": [64]}),
           "digits", 64),
    "fitnets": ({"ce": {}, "hint": {"weight": 10.0, "student_feature": "stage1", "teacher_feature": "stage1"}},
                ("mlp", {"widths": [32]}), ("mlp", {"widths": [64]}), "digits", 64),
    "crd": ({"ce": {}, "crd": {"weight": 0.8, "num_negatives": 256, "dim": 32}}, ("mlp", {"widths": [32]}),
            ("mlp", {"widths": [64]}), "digits", 64),
    "at": ({"ce": {}, "at": {"weight": 1000.0}}, ("resnet8", {}), ("resnet8", {}), "synthetic_cifar", 32, 0.005),
}


class _ReversedBatches(data.Dataset):
  """The same training batches with their rows in reverse order: same math, another float32 summation order."""

  def train_batch(self, seed, step, batch_size, rows=slice(None), *, stream=0):
    batch = super().train_batch(seed, step, batch_size, stream=stream)
    return {key: value[::-1][rows] for key, value in batch.items()}


if "synthetic_cifar_reversed" not in data.names():
  data.register("synthetic_cifar_reversed", lambda directory: _ReversedBatches(
      **{**vars(_synthetic_cifar(directory)), "name": "synthetic_cifar_reversed"}))


def _twenty_step_losses(method, devices, workdir, teacher_dir=None, data_name=None):
  terms, model, teacher_model, default_data, batch_size, *learning_rate = DEVICE_CASES[method]
  data_name = data_name or default_data
  config = _twenty_step_config(terms, model, teacher_model, data_name, batch_size, *learning_rate)
  config.epochs = 0
  config.rows.student.epochs = -(-20 // (data.load(data_name).num_train // batch_size))
  config.mesh.data = devices
  if teacher_dir:  # the same teacher for every run
    os.makedirs(workdir)
    os.symlink(teacher_dir, workdir / "teacher")
    # The reversed-batches dataset is the teacher's data under another name: reusing the teacher is safe.
    config.allow_config_change = data_name != default_data
  train.run(config, str(workdir))
  with open(workdir / "student" / "metrics.jsonl") as f:
    runs = [json.loads(line) for line in f if '"train"' in line]
  assert len(runs) >= 20
  return {key: np.array([m[key] for m in runs[:20]]) for key in runs[0] if key.startswith("loss")}


# AT's case (a BatchNorm resnet8 pair, and a third run for its float32 noise floor) is the costliest, ~50 s:
# `slow`, to keep the default suite under 10 minutes; the BatchNorm resnets' 8-device steps are also covered
# by tests/test_models.py's sharded train steps.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "at" else m
                                    for m in DEVICE_CASES])
def test_twenty_steps_on_one_device_equal_eight(method, tmp_path):
  eight = _twenty_step_losses(method, 8, tmp_path / "8")
  one = _twenty_step_losses(method, 1, tmp_path / "1", teacher_dir=tmp_path / "8" / "teacher")
  for key in one:
    # The first steps agree to float32 rounding whatever the method.
    np.testing.assert_allclose(one[key][:2], eight[key][:2], rtol=1e-5, atol=1e-7, err_msg=key)
  if method != "at":
    for key in one:
      np.testing.assert_allclose(one[key], eight[key], rtol=1e-5, atol=1e-6, err_msg=key)
    return
  # A BatchNorm ResNet's gradients carry float32 noise of ~1e-5 (relative) whatever the device count:
  # the same batch with its rows in another order changes resnet8's gradient by 1.1e-5 on one device,
  # and SGD amplifies that over 20 steps. So AT on 8 devices is held to that floor, measured by the
  # same 20 steps on one device with every batch's rows reversed: sharding may add no error of its own.
  reordered = _twenty_step_losses(method, 1, tmp_path / "1r", teacher_dir=tmp_path / "8" / "teacher",
                                  data_name="synthetic_cifar_reversed")
  for key in one:
    floor = np.max(np.abs(reordered[key] - one[key]))
    assert floor < 1e-3 * np.max(np.abs(one[key])), (key, floor)  # reordering is noise, not another run
    assert np.max(np.abs(eight[key] - one[key])) <= 4 * floor + 1e-6, (key, np.abs(eight[key] - one[key]), floor)


def test_imagenet_size_crd_bank_is_split_over_the_devices():
  """1.28M x 128 entries per side: each of the 8 devices holds 1/8 of the rows (shapes only, no memory)."""
  import optax
  from kd_jax import models
  from kd_jax.data import augment
  from kd_jax.distill import Objective
  from kd_jax.train import engine
  from kd_jax.train import mesh as mesh_lib
  from kd_jax.train import sources

  student = models.create("mlp", num_classes=1000, widths=[16])
  objective = Objective({"ce": {}, "crd": {"dim": 128, "num_negatives": 16}}, num_train=1_281_167 + 1)
  spec = engine.StepSpec(student=student, objective=objective, optimizer=optax.sgd(0.1), schedule=lambda s: 0.1,
                         normalize=lambda x: augment.normalize(x, scale=1 / 255, mean=(0.0,), std=(1.0,)),
                         source=sources.Teacher(module=models.create("mlp", num_classes=1000, widths=[32])))
  teacher_vars = jax.eval_shape(lambda: spec.source.module.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 3), np.float32)))
  abstract = jax.eval_shape(lambda tv: engine.init_state(spec, jax.random.PRNGKey(0), tv,
                                                        np.zeros((8, 4, 4, 3), np.uint8)), teacher_vars)
  shardings = engine.state_shardings(mesh_lib.make_mesh(), abstract, spec)
  bank, bank_sharding = abstract.method_state["crd"], shardings.method_state["crd"]
  for side in ("student", "teacher"):
    shape = getattr(bank, side).shape
    assert shape == (1, 1_281_168, 128)
    assert getattr(bank_sharding, side).shard_shape(shape) == (1, 160_146, 128)  # 1/8 of the rows each
