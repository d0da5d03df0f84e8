"""The training engine end to end on digits: runs, device-count invariance, resume, errors."""
import contextlib
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import data, models, train
from kd_jax.train import checkpoint, loop
from kd_jax.train import mesh as mesh_lib
from experiments.configs import select_rows


def tiny_config(epochs=2, **data):
  c = train.base_config()
  c.epochs = epochs
  c.data.name = "digits"
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.data.update(data)
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  c.progress = False
  adam = {"name": "adam", "learning_rate": 1e-2}
  c.rows.teacher = train.row(model="mlp", model_kwargs={"widths": [64], "dropout": 0.1}, terms={"ce": {}},
                             optimizer=adam)
  c.rows.student_kd = train.row(model="mlp", model_kwargs={"widths": [16]}, teacher="teacher", optimizer=adam,
                                terms={"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}})
  return c


def read_metrics(workdir, row, split="train"):
  with open(os.path.join(workdir, row, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def final_variables(workdir, row):
  return checkpoint.load_model(os.path.join(workdir, row, "final"))[0]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """The uninterrupted run on all 8 devices, shared by the tests below."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, train.run(tiny_config(), workdir)


def test_metrics_reach_tensorboard_as_they_reach_metrics_jsonl(reference_run):
  from kd_jax.train import summaries

  workdir, results = reference_run
  scalars = summaries.read_scalars(os.path.join(workdir, "student_kd"))
  train_records, test_records = read_metrics(workdir, "student_kd"), read_metrics(workdir, "student_kd", "test")
  assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in train_records]
  np.testing.assert_allclose([v for _, v in scalars["train/loss/kd"]], [r["loss/kd"] for r in train_records],
                             rtol=1e-6)
  assert [v for _, v in scalars["eval/test_accuracy"]] == pytest.approx([r["test_accuracy"] for r in test_records])
  assert scalars["eval/test_accuracy"][-1][1] == pytest.approx(results["student_kd"]["test_accuracy"])
  assert {"train/learning_rate", "train/images_per_s"} <= set(scalars)
  assert all(v > 0 for _, v in scalars["train/images_per_s"])


def test_a_teacher_row_can_stand_for_a_trained_model_and_is_then_not_trained(reference_run, tmp_path):
  workdir, results = reference_run
  config = tiny_config()
  config.rows.teacher.checkpoint = os.path.join(workdir, "teacher")  # a row directory of another run
  published = train.run(config, str(tmp_path))
  assert published["teacher"]["published"] == os.path.join(workdir, "teacher", "final")
  assert published["teacher"]["test_errors"] == results["teacher"]["test_errors"]  # evaluated, as trained
  np.testing.assert_allclose(published["teacher"]["test_loss"], results["teacher"]["test_loss"], rtol=1e-6)
  assert not os.path.exists(tmp_path / "teacher" / "checkpoints")  # never trained
  for key in ("test_accuracy", "test_loss", "history"):  # the student learns from the same teacher
    assert published["student_kd"][key] == results["student_kd"][key]
  jax.tree.map(np.testing.assert_array_equal, final_variables(str(tmp_path), "student_kd"),
               final_variables(workdir, "student_kd"))
  config.rows.teacher.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(train.ConfigError, match=r"rows.teacher.checkpoint=.*nowhere' holds no trained model"):
    train.run(config, str(tmp_path / "other"))


def test_run_trains_teacher_and_distils_a_student_that_learns(reference_run):
  workdir, results = reference_run
  assert list(results) == ["teacher", "student_kd"]
  for row in results.values():
    assert row["test_accuracy"] > 0.7  # 44 steps of digits; chance is 0.1
    assert row["test_errors"] == round((1 - row["test_accuracy"]) * 360)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["student_kd"]["test_accuracy"] == results["student_kd"]["test_accuracy"]
  train_metrics = read_metrics(workdir, "student_kd")
  assert {"loss", "loss/ce", "loss/kd", "accuracy", "grad_norm", "learning_rate"} <= set(train_metrics[0])
  assert train_metrics[-1]["loss"] < train_metrics[0]["loss"]
  assert [m["epoch"] for m in read_metrics(workdir, "student_kd", "test")] == [1, 2]


def test_training_batches_are_placed_on_the_devices_ahead_in_a_background_thread(tmp_path, monkeypatch):
  import threading
  from kd_jax.train import mesh as mesh_lib
  placed, received = [], []
  put_local = mesh_lib.put_local

  def recording_put(local, sharding, leading_shape):
    placed.append((threading.current_thread() is threading.main_thread(), len(leading_shape)))
    return put_local(local, sharding, leading_shape)

  make_train_step = loop.engine.make_train_step

  def recording_make(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def call(state, teacher_variables, batch):
      received.append({k: (isinstance(v, jax.Array), v.sharding.spec) for k, v in batch.items()})
      return step(state, teacher_variables, batch)

    return call

  monkeypatch.setattr(loop.mesh_lib, "put_local", recording_put)
  monkeypatch.setattr(loop.engine, "make_train_step", recording_make)
  config = tiny_config(epochs=1)
  select_rows(config, "teacher")
  config.max_steps = 4
  train.run(config, str(tmp_path))
  train_puts = [on_main for on_main, rank in placed if rank == 2]  # [S, B] leading axes: train batches
  assert len(train_puts) == 4 and not any(train_puts)  # off the main thread (the test batches: on it)
  assert len(received) == 4 and all(v == (True, jax.sharding.PartitionSpec(None, "data")) for r in received
                                    for v in r.values())


def test_finished_rows_are_not_trained_again(reference_run):
  workdir, results = reference_run
  before = os.path.getmtime(os.path.join(workdir, "teacher", "result.json"))
  again = train.run(tiny_config(), workdir)
  assert again["student_kd"]["test_accuracy"] == results["student_kd"]["test_accuracy"]
  assert os.path.getmtime(os.path.join(workdir, "teacher", "result.json")) == before


def test_one_device_gives_the_same_numbers_as_eight(reference_run, tmp_path):
  workdir, _ = reference_run
  config = tiny_config()
  config.mesh.data = 1
  train.run(config, str(tmp_path))
  for row in ("teacher", "student_kd"):
    eight, one = read_metrics(workdir, row), read_metrics(str(tmp_path), row)
    assert [m["step"] for m in one] == [m["step"] for m in eight]
    np.testing.assert_allclose([m["loss"] for m in one], [m["loss"] for m in eight], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               final_variables(str(tmp_path), "student_kd"), final_variables(workdir, "student_kd"))


@contextlib.contextmanager
def _stop_at(step_count):
  """Stands in for SIGTERM arriving after `step_count` steps of the first row that runs."""
  calls = {"n": 0}

  class Flag(dict):
    def __getitem__(self, key):
      calls["n"] += 1
      return signal.SIGTERM if calls["n"] >= step_count else None

  yield Flag()


def test_interrupted_run_resumes_to_the_same_params(reference_run, tmp_path, monkeypatch):
  workdir, _ = reference_run
  resumed_dir = str(tmp_path)
  config = tiny_config()
  select_rows(config, "teacher")
  monkeypatch.setattr(loop, "_stop_signals", lambda: _stop_at(17))
  with pytest.raises(loop.Preempted) as preempted:
    train.run(config, resumed_dir)
  assert preempted.value.step == 17 and preempted.value.code == 143
  assert 17 in checkpoint.Checkpointer(os.path.join(resumed_dir, "teacher", "checkpoints")).steps()
  monkeypatch.undo()
  train.run(config, resumed_dir)
  # Bit for bit: same batches, same dropout/augmentation keys, same optimizer state.
  jax.tree.map(np.testing.assert_array_equal, final_variables(resumed_dir, "teacher"),
               final_variables(workdir, "teacher"))
  steps = [m["step"] for m in read_metrics(resumed_dir, "teacher")]
  # Every logged step once: none duplicated after the resume, and step 15's (logged, not yet written
  # when the SIGTERM came at 17) not lost.
  # ...and the last step, logged whatever the interval.
  assert steps == [m["step"] for m in read_metrics(workdir, "teacher")] == list(range(5, 45, 5)) + [44]


def test_resume_with_a_changed_config_is_refused(reference_run, tmp_path, monkeypatch):
  config = tiny_config()
  select_rows(config, "teacher")
  monkeypatch.setattr(loop, "_stop_signals", lambda: _stop_at(3))
  with pytest.raises(loop.Preempted):
    train.run(config, str(tmp_path))
  monkeypatch.undo()
  config.rows.teacher.optimizer.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"rows.teacher.optimizer.learning_rate: 0.01 -> 0.5"):
    train.run(config, str(tmp_path))


def test_finished_row_with_a_changed_config_is_not_silently_reused(reference_run, tmp_path):
  workdir, results = reference_run
  os.makedirs(tmp_path / "teacher")
  with open(os.path.join(workdir, "teacher", "result.json")) as f:
    saved = json.load(f)
  (tmp_path / "teacher" / "result.json").write_text(json.dumps(saved))
  config = tiny_config(epochs=3)  # the finished teacher trained 2 epochs
  select_rows(config, "teacher")
  with pytest.raises(ValueError, match=r"row 'teacher': the finished .*result.json was made with a different "
                                       r"config \(epochs: 2 -> 3\)"):
    train.run(config, str(tmp_path))
  config.allow_config_change = True  # the user vouches for it: the finished result is reused as is
  assert train.run(config, str(tmp_path))["teacher"]["test_accuracy"] == results["teacher"]["test_accuracy"]


def test_unknown_model_lists_the_known_ones(tmp_path):
  config = tiny_config()
  config.rows.teacher.model = "mlp_12000"
  with pytest.raises(ValueError, match=r"unknown model 'mlp_12000'. Did you mean .*'mlp_1200'.*Known models: "):
    train.run(config, str(tmp_path))


def test_unknown_config_key_is_named(tmp_path):
  config = tiny_config()
  with config.unlocked():
    config.rows.teacher.learning_rate = 0.1
  with pytest.raises(ValueError, match=r"unknown config key 'rows.teacher.learning_rate'"):
    train.run(config, str(tmp_path))


def test_unknown_loss_term_is_named(tmp_path):
  config = tiny_config()
  config.rows.student_kd.terms = {"kdd": {"weight": 1.0}}
  with pytest.raises(ValueError, match=r"unknown loss term 'kdd'. Did you mean 'kd'"):
    train.run(config, str(tmp_path))


def test_batch_not_divisible_by_devices(tmp_path):
  with pytest.raises(ValueError, match="data.batch_size 60 is not divisible by the 8 devices of mesh axis 'data'"):
    train.run(tiny_config(batch_size=60), str(tmp_path))


def test_missing_data_directory(tmp_path):
  config = tiny_config(name="mnist", dir=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="MNIST files missing from"):
    train.run(config, str(tmp_path))


def test_teacher_with_another_class_count_is_refused(tmp_path):
  teacher_dir = str(tmp_path / "teacher5")
  module = models.create("mlp", num_classes=5, widths=[8])
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))
  checkpoint.save_model(teacher_dir, variables, {"model": "mlp", "model_kwargs": {"widths": [8]},
                                                 "num_classes": 5, "input_shape": [8, 8, 1]})
  config = tiny_config()
  select_rows(config, "student_kd")
  config.rows.student_kd.teacher.row = teacher_dir
  with pytest.raises(ValueError, match=r"the teacher in .*teacher5 has 5 classes, but dataset 'digits' has 10"):
    train.run(config, str(tmp_path / "run"))


def test_teacher_term_without_a_teacher(tmp_path):
  config = tiny_config()
  select_rows(config, "student_kd")
  config.rows.student_kd.teacher.row = ""
  with pytest.raises(ValueError, match=r"rows.student_kd uses a teacher .* rows.student_kd.teacher.row is empty"):
    train.run(config, str(tmp_path))


def test_teacher_cache_gives_the_same_run_as_the_teacher_forward(reference_run, tmp_path):
  workdir, _ = reference_run
  config = tiny_config()
  config.rows.student_kd.teacher.cache = True
  os.symlink(os.path.join(workdir, "teacher"), str(tmp_path / "teacher"))
  train.run(config, str(tmp_path))
  cached, direct = read_metrics(str(tmp_path), "student_kd"), read_metrics(workdir, "student_kd")
  np.testing.assert_allclose([m["loss/kd"] for m in cached], [m["loss/kd"] for m in direct], rtol=1e-5)


def test_teacher_cache_with_random_augmentation_is_refused(tmp_path):
  config = tiny_config()
  config.rows.student_kd.teacher.cache = True
  config.rows.student_kd.data.augment = "jitter"
  with pytest.raises(ValueError, match="teacher.cache needs un-augmented teacher inputs, but data.augment='jitter'"):
    train.run(config, str(tmp_path))


def test_clean_teacher_input_sees_the_unaugmented_batch(reference_run, tmp_path):
  """teacher.input='clean' (Noisy Student): the student trains on jittered images while the teacher reads the
  un-augmented ones. The cache holds the teacher's logits on the un-augmented train set, so the run with the
  teacher's forward pass matches it only if that forward pass reads the clean batch."""
  workdir, _ = reference_run
  kd_losses = {}
  for name, cache in [("direct", False), ("cached", True)]:
    config = tiny_config()
    config.max_steps = 10
    config.rows.student_kd.data.augment = "jitter"
    config.rows.student_kd.teacher.update(input="clean", cache=cache)
    os.makedirs(tmp_path / name)
    os.symlink(os.path.join(workdir, "teacher"), str(tmp_path / name / "teacher"))
    train.run(config, str(tmp_path / name))
    kd_losses[name] = [m["loss/kd"] for m in read_metrics(str(tmp_path / name), "student_kd")]
  assert len(kd_losses["direct"]) == 2
  np.testing.assert_allclose(kd_losses["cached"], kd_losses["direct"], rtol=1e-5)


def test_unknown_teacher_input_is_named(tmp_path):
  config = tiny_config()
  config.rows.student_kd.teacher.input = "noisy"
  with pytest.raises(ValueError, match=r"rows.student_kd.teacher.input must be one of \['augmented', 'clean'\], got 'noisy'"):
    train.run(config, str(tmp_path))


def test_bfloat16_compute_keeps_float32_params_and_learns(reference_run, tmp_path):
  workdir, _ = reference_run
  config = tiny_config()
  select_rows(config, "student_kd")
  config.rows.student_kd.teacher.row = os.path.join(workdir, "teacher", "final")
  config.compute_dtype = "bfloat16"
  config.mesh.data = 1
  result = train.run(config, str(tmp_path))["student_kd"]
  assert result["test_accuracy"] > 0.7
  params = final_variables(str(tmp_path), "student_kd")["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}  # master params
  bf16, f32 = read_metrics(str(tmp_path), "student_kd"), read_metrics(workdir, "student_kd")
  # Same data and init: the first loss agrees to bf16 precision, but is not bit-identical.
  np.testing.assert_allclose(bf16[0]["loss"], f32[0]["loss"], rtol=2e-2)
  assert bf16[0]["loss"] != f32[0]["loss"]


def test_bfloat16_apply_runs_convolutions_in_bf16_with_float32_statistics():
  from kd_jax.train import engine
  model = models.create("resnet8", num_classes=10)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  run = lambda v: engine.apply_model(model, v, x, train=True, mutable=["batch_stats"], compute_dtype="bfloat16")
  jaxpr = str(jax.make_jaxpr(run)(variables))
  assert "conv_general_dilated" in jaxpr and "bf16[4,32,32,16]" in jaxpr
  logits, updates = run(variables)
  assert logits.dtype == np.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {np.dtype(np.float32)}
  f32_logits, _ = engine.apply_model(model, variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(logits, f32_logits, rtol=0.1, atol=0.1)
  config = tiny_config()
  config.compute_dtype = "float16"
  with pytest.raises(train.ConfigError, match="compute_dtype"):
    train.plan(config, "teacher", data.load("digits"))


def test_max_norm_caps_each_units_incoming_weights_through_the_optimizer(tmp_path):
  """optimizer.max_norm (Hinton et al. 2012's constraint) ends the optimizer chain: after training, every unit's
  incoming weight vector of the model has norm <= the limit, and without it some exceed it."""
  norms = {}
  for limit in (0.0, 0.6):
    config = tiny_config(epochs=1)
    config.max_steps = 5
    config.rows.teacher.optimizer.max_norm = limit
    train.run(config.copy_and_resolve_references(), str(tmp_path / str(limit)))
    params = final_variables(str(tmp_path / str(limit)), "teacher")["params"]
    norms[limit] = [np.linalg.norm(np.asarray(leaf), axis=0).max() for path, leaf in
                    jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "kernel"]
  assert max(norms[0.0]) > 0.6
  assert max(norms[0.6]) <= 0.6 + 1e-5


def test_a_bfloat16_run_casts_the_teachers_params_once_at_load(reference_run, tmp_path):
  """compute_dtype=bfloat16: the teacher's params reach the step already in bf16 (its BatchNorm statistics and
  the student's master params stay float32), and the row trains."""
  from kd_jax.train import stages

  workdir, _ = reference_run
  config = tiny_config()
  config.compute_dtype = "bfloat16"
  config.max_steps = 3
  config.rows.student_kd.teacher.row = os.path.join(workdir, "teacher", "final")
  digits = data.load("digits")
  plan = train.plan(config, "student_kd", digits)
  mesh = mesh_lib.make_mesh(replica=1, data=8)
  _, _, constants = stages.load_source(plan, digits, mesh)
  assert {leaf.dtype for leaf in jax.tree.leaves(constants["params"])} == {jnp.dtype(jnp.bfloat16)}
  select_rows(config, "student_kd")
  result = train.run(config, str(tmp_path))["student_kd"]
  assert np.isfinite(result["test_loss"]) and result["steps"] == 3
