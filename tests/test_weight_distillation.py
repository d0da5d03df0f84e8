"""Weight distillation: plan, generator formula and deterministic start (the two phases in the engine: test_methods)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.distill import weight_distillation as wd


def tree(widths, layers):
  rng = np.random.default_rng(sum(widths) + layers)
  params = {"embed": {"embedding": rng.normal(size=(5, widths[0])).astype(np.float32)}}
  for i in range(layers):
    params[f"layers_{i}"] = {"dense": {"kernel": rng.normal(size=(widths[0], widths[1])).astype(np.float32),
                                       "bias": rng.normal(size=(widths[1],)).astype(np.float32)}}
  return params


def test_plan_groups_layers_into_consecutive_subsets():
  plan = {g.key: g for g in wd.make_plan(tree((4, 6), 2), tree((8, 12), 4))}
  kernel = plan["layers_N.dense.kernel"]
  assert kernel.student_paths == (("layers_0", "dense", "kernel"), ("layers_1", "dense", "kernel"))
  assert kernel.teacher_paths[1] == (("layers_2", "dense", "kernel"), ("layers_3", "dense", "kernel"))
  assert kernel.teacher_shape == (8, 12) and kernel.student_shape == (4, 6)
  assert plan["embed.embedding"].teacher_paths == ((("embed", "embedding"),),)


def test_generated_weights_follow_the_formula():
  student, teacher = tree((4, 6), 2), tree((8, 12), 4)
  plan = wd.make_plan(student, teacher)
  rng = np.random.default_rng(0)
  gen = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), wd.init_generator(plan))
  out = wd.generate(gen, teacher, plan)
  shared, inst = gen["classes"]["layers_N.dense.kernel"], gen["instances"]["layers_N.dense.kernel.1"]
  stacked = np.stack([teacher["layers_2"]["dense"]["kernel"], teacher["layers_3"]["dense"]["kernel"]], -1)
  mapped = sum(float(shared["w_layers"][l]) * np.asarray(shared["w_in"]).T @ stacked[..., l] @ np.asarray(shared["w_out"])
               for l in range(2))
  expected = np.tanh(np.asarray(inst["gate"])) * mapped + np.asarray(inst["bias"])
  np.testing.assert_allclose(out["layers_1"]["dense"]["kernel"], expected, rtol=1e-5, atol=1e-5)
  bias_shared, bias_inst = gen["classes"]["layers_N.dense.bias"], gen["instances"]["layers_N.dense.bias.0"]
  b = np.stack([teacher["layers_0"]["dense"]["bias"], teacher["layers_1"]["dense"]["bias"]], -1)
  mapped_b = sum(float(bias_shared["w_layers"][l]) * b[:, l] @ np.asarray(bias_shared["w_out"]) for l in range(2))
  np.testing.assert_allclose(out["layers_0"]["dense"]["bias"],
                             np.tanh(np.asarray(bias_inst["gate"])) * mapped_b + np.asarray(bias_inst["bias"]),
                             rtol=1e-5, atol=1e-5)


def test_phase_one_starts_from_a_deterministic_function_of_the_teacher():
  student, teacher = tree((4, 6), 2), tree((8, 12), 4)
  plan = wd.make_plan(student, teacher)
  first = wd.generate(wd.init_generator(plan), teacher, plan)
  again = wd.generate(wd.init_generator(plan), teacher, plan)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  # The teacher cut to the student's widths (mean of each subset), times tanh(2).
  cut = (teacher["layers_0"]["dense"]["kernel"] + teacher["layers_1"]["dense"]["kernel"])[:4, :6] / 2
  np.testing.assert_allclose(first["layers_0"]["dense"]["kernel"], np.tanh(2.0) * cut, rtol=1e-5)
  other = jax.tree.map(lambda x: x + 1.0, teacher)
  assert not np.allclose(wd.generate(wd.init_generator(plan), other, plan)["layers_0"]["dense"]["kernel"],
                         first["layers_0"]["dense"]["kernel"])


def test_mismatched_structures_are_refused():
  with pytest.raises(ValueError, match=r"3 teacher layers cannot be split into 2 student layers"):
    wd.make_plan(tree((4, 6), 2), tree((8, 12), 3))
  student = tree((4, 6), 1)
  student["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError, match=r"only in the student: \['extra.kernel'\]"):
    wd.make_plan(student, tree((8, 12), 1))
