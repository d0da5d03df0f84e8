"""Objectives and terms at the unit level: weights, temperatures (curriculum, CTKD)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.distill import Objective, Outputs
from kd_jax.distill.temperature import Temperature

STUDENT = Outputs(jax.random.normal(jax.random.PRNGKey(0), (8, 10)))
TEACHER = Outputs(3.0 * jax.random.normal(jax.random.PRNGKey(1), (8, 10)))
BATCH = {"label": jnp.arange(8) % 10}


def test_objective_is_the_weighted_sum_of_term_means():
  objective = Objective({"ce": {"weight": 0.25}, "kd": {"weight": 0.75, "temperature": 3.0}})
  total, metrics, _ = objective({}, {}, STUDENT, TEACHER, BATCH, step=jnp.int32(0))
  ce = jnp.mean(losses.cross_entropy(STUDENT.logits, BATCH["label"]))
  kd = jnp.mean(losses.kd_loss(STUDENT.logits, TEACHER.logits, temperature=3.0))
  np.testing.assert_allclose(total, 0.25 * ce + 0.75 * kd, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/kd"], kd, rtol=1e-6)


def test_curriculum_temperature_follows_its_schedule():
  linear = Temperature({"start": 1.0, "end": 9.0, "epochs": 4})
  values = [float(linear({}, jnp.int32(s), 10)) for s in (0, 10, 20, 40, 80)]
  np.testing.assert_allclose(values, [1.0, 3.0, 5.0, 9.0, 9.0], rtol=1e-6)
  cosine = Temperature({"start": 1.0, "end": 9.0, "epochs": 4, "shape": "cosine"})
  np.testing.assert_allclose(float(cosine({}, jnp.int32(20), 10)), 5.0, rtol=1e-6)
  objective = Objective({"kd": {"temperature": {"start": 1.0, "end": 9.0, "epochs": 4}}}, steps_per_epoch=10)
  total, _, _ = objective({}, {}, STUDENT, TEACHER, BATCH, step=jnp.int32(20))
  np.testing.assert_allclose(total, jnp.mean(losses.kd_loss(STUDENT.logits, TEACHER.logits, temperature=5.0)),
                             rtol=1e-6)


def test_ctkd_temperature_is_the_reference_parameterisation_and_ascends_the_loss():
  """CTKD's code: T = t_start + t_end·sigmoid(g), g = 1 at the start; λ per epoch (from 1) by the cosine."""
  option = {"learnable": True, "reversal_epochs": 10}
  objective = Objective({"kd": {"temperature": option}}, steps_per_epoch=10)
  params, _ = objective.init(jax.random.PRNGKey(0), STUDENT, TEACHER)
  assert float(params["kd"]["temperature"]) == 1.0
  t0 = 1.0 + 20.0 / (1.0 + np.exp(-1.0))  # ≈ 15.62, the code's first temperature
  _, metrics, _ = objective(params, {}, STUDENT, TEACHER, BATCH, step=jnp.int32(0))
  np.testing.assert_allclose(metrics["temperature/kd"], t0, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/kd"], jnp.mean(losses.kd_loss(STUDENT.logits, TEACHER.logits,
                                                                         temperature=t0)), rtol=1e-5)
  # The code's CosineDecay(max 0, min -1, loops 10) at epoch e, whose magnitude the GRL multiplies the gradient by.
  cosine_decay = lambda e: (np.cos(min(e, 10) * np.pi / 10) + 1.0) * 0.5 * (0 - (-1)) + (-1)
  d_loss_d_t = jax.grad(lambda t: jnp.mean(losses.kd_loss(STUDENT.logits, TEACHER.logits, temperature=t)))(t0)
  d_t_d_g = 20.0 * np.exp(-1.0) / (1.0 + np.exp(-1.0)) ** 2
  for step, epoch in ((0, 1), (9, 1), (10, 2), (45, 5), (300, 31)):
    grad = jax.grad(lambda p: objective(p, {}, STUDENT, TEACHER, BATCH, step=jnp.int32(step))[0])(params)
    np.testing.assert_allclose(grad["kd"]["temperature"], cosine_decay(epoch) * d_loss_d_t * d_t_d_g, rtol=1e-4)
  # Gradient descent on the reversed gradient raises the KD loss: the adversarial direction.
  grad = jax.grad(lambda p: objective(p, {}, STUDENT, TEACHER, BATCH, step=jnp.int32(50))[0])(params)
  kd = lambda g: float(objective({"kd": {"temperature": g}}, {}, STUDENT, TEACHER, BATCH, step=jnp.int32(50))[0])
  assert kd(1.0 - 0.5 * float(grad["kd"]["temperature"])) > kd(1.0)


def test_ctkd_temperature_moves_and_is_logged_over_a_short_run(tmp_path):
  """The README's {"learnable": True} with its defaults: metrics.jsonl's temperature/kd moves within 44 steps."""
  import json
  import os

  from kd_jax import train

  c = train.base_config()
  c.epochs = 2
  c.data.name = "digits"
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.log_every_steps = 4
  c.checkpoint_every_steps = 100
  c.progress = False
  adam = {"name": "adam", "learning_rate": 1e-2}
  c.rows.teacher = train.row(model="mlp", model_kwargs={"widths": [32]}, terms={"ce": {}}, optimizer=adam, epochs=1)
  c.rows.student_ctkd = train.row(model="mlp", model_kwargs={"widths": [16]}, teacher="teacher", optimizer=adam,
                                  terms={"ce": {"weight": 0.1}, "kd": {"weight": 0.9,
                                                                       "temperature": {"learnable": True}}})
  train.run(c, str(tmp_path))
  with open(os.path.join(tmp_path, "student_ctkd", "metrics.jsonl")) as f:
    logged = [r["temperature/kd"] for r in map(json.loads, f) if r["split"] == "train"]
  assert len(logged) >= 5
  assert abs(logged[0] - (1.0 + 20.0 / (1.0 + np.exp(-1.0)))) < 0.2  # CTKD's start, T ≈ 15.6
  assert max(logged) - min(logged) > 0.05  # it moves: no clip holds it at a bound


def test_bad_temperatures_are_refused():
  with pytest.raises(ValueError, match="temperature must be > 0, got -1"):
    Objective({"kd": {"temperature": -1.0}})
  with pytest.raises(ValueError, match=r"unknown temperature option\(s\) \['begin'\]"):
    Objective({"kd": {"temperature": {"begin": 1.0}}})


def test_cskd_pairs_examples_of_the_same_class():
  labels = jnp.array([0, 1, 0, 2, 1, 3])  # class 2 and 3 have no partner
  logits = jax.random.normal(jax.random.PRNGKey(3), (6, 4))
  objective = Objective({"cskd": {"temperature": 2.0, "mean_over": "batch"}})
  _, _, _ = objective({}, {}, Outputs(logits), None, {"label": labels, "rng": jax.random.PRNGKey(0)}, step=jnp.int32(0))
  term = objective.terms["cskd"]
  values, _ = term(Outputs(logits), None, {"label": labels, "rng": jax.random.PRNGKey(0)}, {}, {}, step=jnp.int32(0))
  kd = lambda i, j: float(losses.kd_loss(logits[i:i + 1], logits[j:j + 1], temperature=2.0)[0])
  np.testing.assert_allclose(values, [kd(0, 2), kd(1, 4), kd(2, 0), 0.0, kd(4, 1), 0.0], rtol=1e-5)
  # The partner's prediction is a constant: no gradient flows into it.
  grad = jax.grad(lambda l: term(Outputs(l), None, {"label": labels, "rng": jax.random.PRNGKey(0)}, {}, {}, step=jnp.int32(0))[0][0])(logits)
  assert np.all(np.asarray(grad[2]) == 0) and np.any(np.asarray(grad[0]) != 0)


def test_fsp_term_mean_reduction_averages_each_matrix_as_repdistiller():
  """RepDistiller's FSP loss is (G_s - G_t)².mean() per pair of maps."""
  keys = jax.random.split(jax.random.PRNGKey(3), 6)
  shapes = {"stem": (2, 8, 8, 3), "stage1": (2, 8, 8, 4), "stage2": (2, 4, 4, 5)}
  student = Outputs(jnp.zeros((2, 10)), {n: jax.random.normal(k, s) for (n, s), k in zip(shapes.items(), keys[:3])})
  teacher = Outputs(jnp.zeros((2, 10)), {n: jax.random.normal(k, s) for (n, s), k in zip(shapes.items(), keys[3:])})

  def gram(first, second):  # [B, C1, C2] over the smaller map's positions (the larger average-pooled)
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if first.shape[1] != second.shape[1]:
      b, h, w, c = first.shape
      f = h // second.shape[1]
      first = first.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))
    return np.einsum("bhwi,bhwj->bij", first, second) / (first.shape[1] * first.shape[2])

  names = list(shapes)
  expected = sum(np.mean((gram(student.features[a], student.features[b]) - gram(teacher.features[a],
                                                                                teacher.features[b])) ** 2)
                 for a, b in zip(names[:-1], names[1:]))
  options = {"student_features": names, "teacher_features": names}
  mean, _, _ = Objective({"fsp": {**options, "reduction": "mean"}})({}, {}, student, teacher, {}, step=jnp.int32(0))
  total, _, _ = Objective({"fsp": options})({}, {}, student, teacher, {}, step=jnp.int32(0))
  np.testing.assert_allclose(mean, expected, rtol=1e-5)
  assert float(total) > 10 * float(mean)  # the paper's sum over the C1·C2 entries
  with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
    Objective({"fsp": {"reduction": "max"}})
