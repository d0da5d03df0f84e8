"""Every row of the paper-table configs runs through the real engine, on TFDS mock data, with the real models.

Two levels:
  * every row of crd_cifar100, dkd_cifar100, dkd_imagenet and at_cifar10 has its
    terms traced (not compiled) on the real architectures' features: missing
    features, mismatched shapes or channel counts fail here, cheaply;
  * one row per method (the cheapest pair: vgg13 -> vgg8, and resnet32x4 ->
    resnet8x4 for ReviewKD) trains one step (`config.max_steps = 1`) end to end
    by default; every other row is `slow`. The default rows run in one child
    process with XLA's cheap-compile flags (conftest's; compiling dominates) and a
    persistent compilation cache (rows of one student share the init and eval
    executables), rows that share a teacher in one workdir.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("crd_cifar100", "dkd_cifar100", "dkd_imagenet", "at_cifar10")
# One row per method by default (teachers come along as dependencies).
DEFAULT_ROWS = {
    "crd_cifar100": [f"vgg13__vgg8__{m}" for m in ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab_init",
                                                   "ft_init", "ft", "fsp_init", "nst", "crd")]
                    + ["resnet32x4__resnet8x4__reviewkd"],
    "dkd_cifar100": ["vgg13__vgg8__dkd"],
}
MOCK_EXAMPLES = 8


def _module(name):
  import importlib

  return importlib.import_module(f"experiments.configs.{name}")


def smoke_config(config_name: str, row_name: str):
  """The table's config reduced to `row_name` (and its dependencies), one step per row on 8 mock examples."""
  from experiments.configs import select_rows

  config = _module(config_name).get_config()
  select_rows(config, row_name)
  config.max_steps = 1
  config.data.batch_size = 4
  config.data.eval_batch_size = 4
  config.mesh.data = 1
  config.log_every_steps = 1
  config.progress = False
  return config


def smoke_run(config_name: str, row_name: str, workdir: str) -> dict:
  """One step of `row_name` (its teacher and earlier stages first) on TFDS mock data."""
  import tensorflow_datasets as tfds
  from kd_jax import train

  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return train.run(smoke_config(config_name, row_name), workdir)[row_name]


def check_row(config_name: str, row_name: str, workdir: str, result: dict) -> None:
  row = _module(config_name).get_config().rows[row_name]
  assert result["steps"] == 1 and result["model"] == row.model
  assert math.isfinite(result["test_loss"]), result
  with open(os.path.join(workdir, row_name, "metrics.jsonl")) as f:
    (train_metrics,) = [json.loads(line) for line in f if '"train"' in line]
  for term in row.terms:  # each of the row's terms was computed, and is finite
    assert math.isfinite(train_metrics[f"loss/{term}"]), (term, train_metrics)
  assert math.isfinite(train_metrics["loss"])


def all_rows():
  return [(c, r) for c in CONFIGS for r in _module(c).get_config().rows]


# --- every row, traced -------------------------------------------------------------------------------------------

def _data_shape(config) -> tuple[tuple[int, ...], int]:
  return {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
          "imagenet2012": ((224, 224, 3), 1000)}[config.data.name]


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_row_fits_the_real_architectures(config_name):
  """Each row's terms, initialised and applied on the shapes of its real student's and teacher's features."""
  import jax
  import jax.numpy as jnp
  from kd_jax import models
  from kd_jax.distill import Objective, Outputs
  from kd_jax.train import config as config_lib

  config = config_lib.validate(_module(config_name).get_config())
  shape, classes = _data_shape(config)
  outputs = {}

  def features(arch):
    if arch not in outputs:
      model = models.create(arch, num_classes=classes)
      images = jnp.zeros((2,) + shape, jnp.float32)
      outputs[arch] = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), images,
                                                                    return_features=True)[0])
    logits, feats = outputs[arch]
    return Outputs(logits, feats)

  for name, row in config.rows.items():
    objective = Objective(row.terms.to_dict(), steps_per_epoch=10, num_train=64)
    student = features(row.model)
    teacher = features(config.rows[row.teacher.row].model) if objective.needs_teacher else None
    batch = {"label": jax.ShapeDtypeStruct((2,), jnp.int32), "index": jax.ShapeDtypeStruct((2,), jnp.int32),
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}

    def loss(student, teacher, batch):
      params, state = objective.init(jax.random.PRNGKey(0), student, teacher)
      return objective(params, state, student, teacher, batch, step=jnp.zeros((), jnp.int32))[0]

    try:
      assert jax.eval_shape(loss, student, teacher, batch).shape == (), name
    except Exception as e:
      raise AssertionError(f"{config_name}:{name} ({row.model} from {row.teacher.row or 'no teacher'}): {e}") from e


# --- one row per method by default, trained ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
  """Runs every default row in one child process (fast-compile flags, a compilation cache); {(config, row): ...}."""
  workdir = str(tmp_path_factory.mktemp("smoke"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}  # XLA_FLAGS: conftest's cheap-compile flags
  rows = [[c, r] for c, names in DEFAULT_ROWS.items() for r in names]
  out = subprocess.run([sys.executable, os.path.abspath(__file__), workdir, json.dumps(rows)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
  report = os.path.join(workdir, "smoke.json")
  if not os.path.exists(report):
    raise AssertionError(f"the smoke runner died (rc {out.returncode}):\n{out.stderr[-4000:]}")
  with open(report) as f:
    return workdir, {tuple(k.split(":")): v for k, v in json.load(f).items()}


@pytest.mark.parametrize("config_name,row_name", [(c, r) for c, names in DEFAULT_ROWS.items() for r in names])
def test_one_row_per_method_trains_a_step(default_runs, config_name, row_name):
  workdir, runs = default_runs
  outcome = runs[(config_name, row_name)]
  if "error" in outcome:
    raise AssertionError(f"{config_name}:{row_name} failed:\n{outcome['error']}")
  check_row(config_name, row_name, os.path.join(workdir, config_name.split("_")[1]), outcome["result"])


def test_the_default_rows_cover_every_method():
  methods = lambda names: {n.split("__")[-1].removesuffix("_init") for n in names if n.count("__") == 2}
  crd = _module("crd_cifar100")
  covered = methods(DEFAULT_ROWS["crd_cifar100"]) | methods(DEFAULT_ROWS["dkd_cifar100"])
  # AB, FSP: their `_init` stages; kd_ls is the kd term with standardize=True (traced above, every row).
  assert set(crd.PAPER) - {"crd_kd", "kd_ls"} <= covered | {"ab", "fsp"}
  assert {"ab", "fsp", "ft", "dkd", "reviewkd"} <= covered


def test_ft_hands_its_trained_paraphraser_to_the_transfer_row_and_keeps_it_frozen(default_runs):
  import jax
  import numpy as np
  from kd_jax.train import checkpoint

  workdir, _ = default_runs
  stage = checkpoint.load_terms(os.path.join(workdir, "cifar100", "vgg13__vgg8__ft_init", "final"))
  transfer = checkpoint.load_terms(os.path.join(workdir, "cifar100", "vgg13__vgg8__ft", "final"))
  assert set(stage["params"]["ft"]) == {"paraphraser"}
  assert set(transfer["params"]["ft"]) == {"paraphraser", "translator"}
  # Restored by name and shape, then untouched by a step of SGD with momentum and weight decay.
  jax.tree.map(np.testing.assert_array_equal, transfer["params"]["ft"]["paraphraser"],
               stage["params"]["ft"]["paraphraser"])


def test_frozen_params_get_no_update_and_no_weight_decay():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from kd_jax.train import optim
  from kd_jax.train import planning as plan_lib

  params = {"student": {"w": jnp.ones(3)},
            "terms": {"ft": {"paraphraser": {"k": jnp.ones(2)}, "translator": {"k": jnp.ones(2)}}}}
  sgd = optim.make_optimizer({"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4}, optax.constant_schedule(0.1))
  optimizer = plan_lib.with_frozen(sgd, [("student",), ("terms", "ft", "paraphraser")])
  state, updated = optimizer.init(params), params
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, updated)
    updates, state = optimizer.update(grads, state, updated)
    updated = optax.apply_updates(updated, updates)
  np.testing.assert_array_equal(updated["student"]["w"], params["student"]["w"])
  np.testing.assert_array_equal(updated["terms"]["ft"]["paraphraser"]["k"], params["terms"]["ft"]["paraphraser"]["k"])
  # The trained leaf moves as plain SGD would move it: lr 0.1, momentum 0.9, (1 + 5e-4 w) gradients.
  reference, ref_state, k = jnp.ones(2), sgd.init(jnp.ones(2)), jnp.ones(2)
  for _ in range(3):
    step, ref_state = sgd.update(jnp.ones(2), ref_state, reference)
    reference = optax.apply_updates(reference, step)
  np.testing.assert_allclose(updated["terms"]["ft"]["translator"]["k"], reference, rtol=1e-6)
  assert float(reference[0]) < 0.5


_SLOW = [(c, r) for c, r in all_rows() if r not in DEFAULT_ROWS.get(c, ())]


@pytest.mark.slow
@pytest.mark.parametrize("config_name,row_name", _SLOW)
def test_every_other_row_trains_a_step(config_name, row_name, tmp_path_factory):
  # One workdir per dataset, so rows share their teachers (and earlier stages) across tests.
  workdir = os.path.join(str(tmp_path_factory.getbasetemp()), f"smoke_{config_name.split('_')[1]}")
  result = smoke_run(config_name, row_name, workdir)
  check_row(config_name, row_name, workdir, result)


def _child(workdir: str, rows: list[list[str]]) -> None:
  """The default rows in this process: {"config:row": {"result": ...} or {"error": traceback}} to smoke.json."""
  import traceback

  import jax

  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  report = {}
  for config_name, row_name in rows:
    try:
      # One workdir per dataset: the CRD and DKD tables share their CIFAR-100 teachers.
      result = smoke_run(config_name, row_name, os.path.join(workdir, config_name.split("_")[1]))
      report[f"{config_name}:{row_name}"] = {"result": {k: v for k, v in result.items() if k != "history"}}
    except Exception:  # reported per row by the parametrised test
      report[f"{config_name}:{row_name}"] = {"error": traceback.format_exc()[-6000:]}
  with open(os.path.join(workdir, "smoke.json"), "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  _child(sys.argv[1], json.loads(sys.argv[2]))
