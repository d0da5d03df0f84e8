"""A table of bad inputs across configs, models, data and the engine: each a clear error naming the culprit."""
import gzip
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from kd_jax import data, distill, losses, models, train
from kd_jax.data import augment, mnist
from kd_jax.train import checkpoint, engine, mesh as mesh_lib, optim
from experiments.configs import select_rows


def config(**changes):
  c = train.base_config()
  c.epochs = 1
  c.data.name = "digits"
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.progress = False
  c.rows.teacher = train.row(model="mlp", model_kwargs={"widths": [16]}, terms={"ce": {}})
  c.rows.student = train.row(model="mlp", model_kwargs={"widths": [8]}, teacher="teacher",
                             terms={"ce": {}, "kd": {"temperature": 4.0}})
  with c.unlocked():
    for dotted, value in changes.items():
      target = c
      *parents, last = dotted.split(".")
      for part in parents:
        target = target[part]
      target[last] = value
  return c


def run(c):
  return lambda tmp: train.run(c, str(tmp))


def trained_model(tmp, *, classes=10, shape=(8, 8, 1), model="mlp"):
  module = models.create(model, num_classes=classes, widths=[8])
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1,) + shape, np.float32))
  path = str(tmp / f"model_{classes}_{shape[0]}")
  checkpoint.save_model(path, variables, {"model": model, "model_kwargs": {"widths": [8]}, "num_classes": classes,
                                          "input_shape": list(shape)})
  return path


def corrupt_mnist(tmp):
  shared = os.path.join(os.environ.get("KD_JAX_DATA_DIR", ""), "mnist")
  if not os.path.isdir(shared):
    pytest.skip("no local MNIST")
  shutil.copytree(shared, tmp / "mnist")
  path = tmp / "mnist" / "train-labels-idx1-ubyte.gz"
  raw = bytearray(gzip.decompress(path.read_bytes()))
  raw[50] ^= 1
  path.write_bytes(gzip.compress(bytes(raw)))
  return lambda: data.load("mnist", directory=str(tmp))


S2 = np.array([[1.0, 2.0, 0.5], [0.5, -1.0, 3.0]], np.float32)
T2 = np.array([[2.0, 0.0, 1.0], [1.0, 0.5, 0.0]], np.float32)


def checkified(fn, *args):
  """Runs jit(fn) under checkify and throws its error: how a caller checks traced values."""
  error, _ = checkify.checkify(jax.jit(fn))(*args)
  error.throw()


def with_teacher_dir(make_dir, **changes):
  def case(tmp):
    c = config(**changes)
    select_rows(c, "student")
    c.rows.student.teacher.row = make_dir(tmp)
    train.run(c, str(tmp / "run"))
  return case


CASES = {
    # --- configs ---
    "top-level key typo": (run(config(epoch=3)), ValueError, r"unknown config key 'epoch' \(did you mean 'epochs'"),
    "row key typo": (run(config(**{"rows.teacher.modle": "mlp"})), ValueError, r"'rows.teacher.modle'.*'model'"),
    "optimizer key typo": (run(config(**{"rows.teacher.optimizer.lr": 0.1})), ValueError,
                           r"rows.teacher.optimizer.lr=0.1: optimizer 'sgd' takes no option 'lr'"),
    "schedule key typo": (run(config(**{"rows.teacher.schedule.boundary": [1]})), ValueError,
                          r"rows.teacher.schedule.boundary=\[1\]: schedule 'constant' takes no option 'boundary'"),
    "data key typo": (run(config(**{"data.batchsize": 32})), ValueError, r"'data.batchsize'.*'batch_size'"),
    "unknown model": (run(config(**{"rows.teacher.model": "resnet33"})), ValueError,
                      r"unknown model 'resnet33'. Did you mean .*Known models"),
    "unknown dataset": (run(config(**{"data.name": "cifar1000"})), ValueError,
                        r"unknown dataset 'cifar1000'.*'cifar100'"),
    "unknown loss term": (run(config(**{"rows.student.terms": {"fitnet": {}}})), ValueError,
                          r"unknown loss term 'fitnet'"),
    "unknown loss term at validation": (
        lambda tmp: train.config.validate(config(**{"rows.student.terms": {"kd": {}, "reviewdk": {}}})), ValueError,
        r"rows.student.terms: unknown loss term 'reviewdk'. Did you mean 'reviewkd'"),
    "freeze naming no params": (run(config(**{"rows.student.optimizer.freeze": ["terms/ft"]})), ValueError,
                                r"rows.student.optimizer.freeze: 'terms/ft' names no params of the row"),
    "negative max_steps": (run(config(max_steps=-1)), ValueError, r"max_steps must be a non-negative int, got -1"),
    "unknown FT stage": (run(config(**{"rows.student.terms": {"ft": {"stage": "pretrain"}}})), ValueError,
                         r"ft: unknown stage 'pretrain'; known: \('paraphraser', 'transfer'\)"),
    "unknown term option": (run(config(**{"rows.student.terms": {"kd": {"temp": 4.0}}})), ValueError,
                            r"loss term 'kd' got unknown option\(s\) \['temp'\]; "
                            r"it accepts \['temperature', 'standardize'\]"),
    "term weight not a number": (run(config(**{"rows.student.terms": {"kd": {"weight": "0.9"}}})), ValueError,
                                 r"loss term 'kd': weight must be a number, got '0.9'"),
    "negative epochs": (run(config(epochs=-2)), ValueError, r"epochs must be a non-negative int, got -2"),
    "row without epochs": (run(config(epochs=0)), ValueError, r"row 'teacher' has no epochs"),
    "batch not divisible by devices": (run(config(**{"data.batch_size": 20})), ValueError,
                                       r"data.batch_size 20 is not divisible by the 8 devices"),
    "batch larger than the data": (run(config(**{"data.batch_size": 4096})), ValueError,
                                   r"batch size 4096 is larger than the 1437 training examples"),
    "non-positive log interval": (run(config(log_every_steps=0)), ValueError, r"log_every_steps must be positive, got 0"),
    "teacher cycle": (run(config(**{"rows.teacher.teacher.row": "student"})), ValueError,
                      r"teacher cycle among rows: .*student.*teacher"),
    "row is its own teacher": (run(config(**{"rows.teacher.teacher.row": "teacher"})), ValueError,
                               r"row 'teacher' names itself as its teacher"),
    "ensemble with an unknown row": (run(config(**{"rows.student.ensemble_with": ["gen9"]})), ValueError,
                                     r"ensemble_with names 'gen9'"),
    "teacher term without teacher": (run(config(**{"rows.student.teacher.row": ""})), ValueError,
                                     r"rows.student uses a teacher .* rows.student.teacher.row is empty"),
    "teacher with other class count": (with_teacher_dir(lambda t: trained_model(t, classes=7)), ValueError,
                                       r"has 7 classes, but dataset 'digits' has 10"),
    "teacher with other input shape": (with_teacher_dir(lambda t: trained_model(t, shape=(28, 28, 1))), ValueError,
                                       r"inputs of shape \(28, 28, 1\), but dataset 'digits' has \(8, 8, 1\)"),
    "teacher directory without a model": (with_teacher_dir(lambda t: str(t)), FileNotFoundError,
                                          r"no trained model in .* \(missing model.json\)"),
    "model made for other inputs": (run(config(**{"rows.teacher.model": "resnet8", "rows.teacher.model_kwargs": {}})),
                                    ValueError, r"model 'resnet8' takes inputs \(32, 32, 3\), but dataset 'digits'"),
    "missing feature": (run(config(**{"rows.student.terms": {"hint": {"student_feature": "stage9",
                                                                      "teacher_feature": "stage1"}}})), KeyError,
                        r"the student has no feature 'stage9'; available features"),
    "peers not fitting the replica axis": (
        run(config(**{"mesh.replica": 2, "mesh.data": 4, "rows.teacher.peers.count": 3})), ValueError,
        r"3 peers cannot be spread over mesh.replica=2"),
    "mesh larger than the devices": (run(config(**{"mesh.replica": 4, "mesh.data": 4})), ValueError,
                                     r"mesh replica=4 x data=4 = 16 devices, but 8 are available"),
    "online term without peers": (run(config(**{"rows.teacher.terms": {"dml": {}}})), ValueError,
                                  r"an online term .* needs peers >= 2"),
    "unknown exchange mode": (run(config(**{"rows.teacher.peers.count": 2, "rows.teacher.peers.exchange": "gossip"})),
                              ValueError, r"rows.teacher.peers.exchange must be one of \['none', 'predictions', 'stale'\], got 'gossip'"),
    "unknown optimizer": (run(config(**{"rows.teacher.optimizer.name": "lamb"})), ValueError,
                          r"unknown optimizer 'lamb'"),
    "unknown schedule": (run(config(**{"rows.teacher.schedule.name": "linear"})), ValueError,
                         r"unknown schedule 'linear'"),
    "unknown augmentation": (run(config(**{"rows.teacher.data.augment": "mixup"})), ValueError,
                             r"rows.teacher.data.augment must be one of \['none', 'jitter', 'crop_flip'\], got 'mixup'"),
    "unknown table row": (lambda tmp: select_rows(config(), "studnet"), ValueError, r"unknown row\(s\) \['studnet'\]"),
    "unknown model name at the API": (lambda tmp: models.create("wrn_40_3", num_classes=10), ValueError,
                                      r"unknown model 'wrn_40_3'"),
    "non-positive class count": (lambda tmp: models.create("mlp", num_classes=0), ValueError,
                                 r"num_classes must be a positive int, got 0"),
    # --- data ---
    "missing data directory": (run(config(**{"data.name": "mnist", "data.dir": "/nonexistent/kd_jax"})),
                               FileNotFoundError, r"MNIST files missing from '/nonexistent/kd_jax/mnist'"),
    "corrupt IDX file": (lambda tmp: corrupt_mnist(tmp)(), ValueError,
                         r"train-labels-idx1-ubyte.gz is corrupt: md5 .*, expected c65e051d"),
    "dataset labels out of range": (
        lambda tmp: data.Dataset("x", np.zeros((2, 1, 1, 1), np.uint8), np.array([0, 12], np.int32),
                                 np.zeros((1, 1, 1, 1), np.uint8), np.zeros(1, np.int32), num_classes=10),
        ValueError, r"x: train labels outside \[0, 10\)"),
    "float images for a uint8 dataset": (
        lambda tmp: data.Dataset("x", np.zeros((2, 1, 1, 1), np.float32), np.zeros(2, np.int32),
                                 np.zeros((1, 1, 1, 1), np.uint8), np.zeros(1, np.int32), num_classes=10),
        ValueError, r"x: train images must be uint8 \[N, H, W, C\], got float32"),
    # --- losses (computed-correctly edge cases: test_loss_edge_cases_are_computed_correctly) ---
    "kd temperature [B, 1]": (lambda tmp: losses.kd_loss(S2, T2, temperature=np.ones((2, 1))), ValueError,
                              r"kd_loss: temperature must be a scalar or per-example \[B\] = \[2\], got shape "
                              r"\(2, 1\)"),
    "kd temperature of another batch": (lambda tmp: losses.kd_loss(S2, T2, temperature=np.ones(3)), ValueError,
                                        r"per-example \[B\] = \[2\], got shape \(3,\)"),
    "kd temperature 0": (lambda tmp: losses.kd_loss(S2, T2, temperature=0.0), ValueError,
                         r"kd_loss: temperature must be > 0, got 0.0"),
    "kd per-example temperature with a 0": (lambda tmp: losses.kd_loss(S2, T2, temperature=np.array([1.0, 0.0])),
                                            ValueError, r"kd_loss: temperature must be > 0, got 0.0"),
    "kd traced temperature 0, checked": (
        lambda tmp: checkified(lambda t: losses.kd_loss(S2, T2, temperature=t, check=True), 0.0),
        checkify.JaxRuntimeError, r"kd_loss: temperature must be > 0, got a minimum of 0.0"),
    "kd NaN student logit, checked eagerly": (
        lambda tmp: losses.kd_loss(S2.copy().clip(max=np.nan), T2, check=True), checkify.JaxRuntimeError,
        r"kd_loss: student_logits has 6 NaN or \+inf value\(s\)"),
    "kd NaN teacher logit under jit, checked": (
        lambda tmp: checkified(lambda t: losses.kd_loss(S2, t, check=True), T2 * np.array([1, np.nan, 1], np.float32)),
        checkify.JaxRuntimeError, r"kd_loss: teacher_logits has 2 NaN or \+inf value\(s\)"),
    "kd checked under jit without checkify": (
        lambda tmp: jax.jit(lambda t: losses.kd_loss(S2, T2, temperature=t, check=True))(1.0), ValueError,
        r"checkify.check which was not functionalized"),
    "cross-entropy labels out of range": (lambda tmp: losses.cross_entropy(S2, np.array([0, 3])), ValueError,
                                          r"cross_entropy: labels must lie in \[0, 3\), got values from 0 to 3"),
    "cross-entropy traced labels out of range, checked": (
        lambda tmp: checkified(lambda y: losses.cross_entropy(S2, y, check=True), np.array([-1, 2])),
        checkify.JaxRuntimeError, r"cross_entropy: labels must lie in \[0, 3\), got values from -1 to 2"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_error(name, tmp_path):
  make_error, error_type, message = CASES[name]
  with pytest.raises(error_type, match=message):
    make_error(tmp_path)


def _kd_reference(student, teacher, temperature):
  """T² KL(p_t ‖ p_s) per row in float64, a p_t = 0 class adding 0 (0 · log 0 = 0)."""
  student, teacher = np.asarray(student, np.float64) / temperature, np.asarray(teacher, np.float64) / temperature
  log_p = lambda z: z - np.max(z) - np.log(np.sum(np.exp(z - np.max(z))))
  out = []
  for s, t in zip(student, teacher):
    p_t, keep = np.exp(log_p(t)), np.isfinite(t)
    out.append(temperature ** 2 * np.sum(p_t[keep] * (log_p(t)[keep] - log_p(s)[keep])))
  return np.array(out)


def test_loss_edge_cases_are_computed_correctly():
  """The loss edge cases that are not errors: a per-example temperature, −inf logits as masked classes."""
  # Per-example temperature [B]: each row at its own T.
  per_row = losses.kd_loss(S2, T2, temperature=np.array([1.0, 4.0], np.float32))
  np.testing.assert_allclose(per_row, [_kd_reference(S2[:1], T2[:1], 1.0)[0], _kd_reference(S2[1:], T2[1:], 4.0)[0]],
                             rtol=1e-5)
  assert per_row.shape == (2,)
  # A class masked (−inf) in the teacher only, and in both: finite, as the KL over the classes the teacher keeps.
  masked_teacher = T2.copy()
  masked_teacher[:, 2] = -np.inf
  masked_both = S2.copy()
  masked_both[:, 2] = -np.inf
  for student in (S2, masked_both):
    loss = losses.kd_loss(student, masked_teacher, temperature=2.0)
    np.testing.assert_allclose(loss, _kd_reference(student, masked_teacher, 2.0), rtol=1e-5)
    grad = jax.grad(lambda s: jnp.sum(losses.kd_loss(s, masked_teacher, temperature=2.0)))(jnp.asarray(student))
    assert np.all(np.isfinite(grad)), grad
  # Masked in both: the same loss and gradient as the KD over the K − 1 other classes.
  sliced = jax.grad(lambda s: jnp.sum(losses.kd_loss(s, T2[:, :2], temperature=2.0)))(jnp.asarray(S2[:, :2]))
  grad = jax.grad(lambda s: jnp.sum(losses.kd_loss(s, masked_teacher, temperature=2.0)))(jnp.asarray(masked_both))
  np.testing.assert_allclose(grad[:, :2], sliced, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grad[:, 2], 0.0)
  np.testing.assert_allclose(losses.kd_loss(masked_both, masked_teacher, temperature=2.0),
                             losses.kd_loss(S2[:, :2], T2[:, :2], temperature=2.0), rtol=1e-6)
  # Masked by the student only: the teacher's mass on a class the student rules out is infinitely wrong.
  assert np.isinf(losses.kd_loss(masked_both, T2, temperature=2.0)).all()
  # A checked call with valid traced values returns the unchecked value and no error.
  error, value = checkify.checkify(jax.jit(lambda t: losses.kd_loss(S2, masked_teacher, temperature=t,
                                                                    check=True)))(2.0)
  assert error.get() is None
  np.testing.assert_allclose(value, _kd_reference(S2, masked_teacher, 2.0), rtol=1e-5)


def test_the_table_is_large_enough():
  assert len(CASES) >= 30


def test_an_unknown_term_stops_the_run_before_any_row_trains(tmp_path):
  c = config(**{"rows.student.terms": {"ce": {}, "fitnets": {}}})
  with pytest.raises(ValueError, match=r"rows.student.terms: unknown loss term 'fitnets'"):
    train.run(c, str(tmp_path))
  assert not (tmp_path / "teacher").exists()  # the teacher row, first in order, never started
