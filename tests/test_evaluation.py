"""Evaluation counts every test example exactly once, whatever the batch size and device count."""
import jax
import numpy as np
import pytest

from kd_jax import data, losses, models
from kd_jax.train import engine, evaluation, planning
from kd_jax.train import mesh as mesh_lib

DIGITS = data.load("digits")  # 360 test examples


@pytest.fixture(scope="module")
def model():
  net = models.create("mlp", num_classes=10, widths=[16])
  variables = net.init(jax.random.PRNGKey(3), np.zeros((1, 8, 8, 1), np.float32))
  return net, variables


def reference(net, variables, peers=1):
  """The numpy count over the whole test set at once."""
  logits = np.asarray(net.apply(variables, planning.normalizer(DIGITS)(DIGITS.test_images.astype(np.float32))))
  errors = int(np.sum(np.argmax(logits, -1) != DIGITS.test_labels))
  loss = float(np.mean(losses.cross_entropy(logits, DIGITS.test_labels)))
  return errors, loss


@pytest.mark.parametrize("devices, batch_size", [(1, 360), (1, 7), (8, 7), (8, 100), (8, 1000), (3, 50)])
def test_any_batch_size_on_any_device_count_counts_each_example_once(model, devices, batch_size):
  net, variables = model
  mesh = mesh_lib.make_mesh(replica=1, data=devices, devices=jax.devices()[:devices])
  eval_step = engine.make_eval_step(net, planning.normalizer(DIGITS), mesh)
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], variables)
  result = evaluation.evaluate(eval_step, stacked, DIGITS, batch_size, mesh)
  errors, loss = reference(net, variables)
  assert result["test_errors"] == errors
  assert result["test_accuracy"] == pytest.approx(1 - errors / 360, abs=1e-12)
  np.testing.assert_allclose(result["test_loss"], loss, rtol=1e-5)


def test_peers_are_counted_each_and_as_an_ensemble(model):
  net, variables = model
  other = net.init(jax.random.PRNGKey(4), np.zeros((1, 8, 8, 1), np.float32))
  mesh = mesh_lib.make_mesh(replica=1, data=8)
  eval_step = engine.make_eval_step(net, planning.normalizer(DIGITS), mesh)
  stacked = jax.tree.map(lambda a, b: np.stack([np.asarray(a), np.asarray(b)]), variables, other)
  result = evaluation.evaluate(eval_step, stacked, DIGITS, 52, mesh)  # 7 batches, the last with padding
  images = planning.normalizer(DIGITS)(DIGITS.test_images.astype(np.float32))
  probs = [np.asarray(jax.nn.softmax(net.apply(v, images))) for v in (variables, other)]
  hits = [np.sum(np.argmax(p, -1) == DIGITS.test_labels) / 360 for p in probs]
  assert result["peer_test_accuracy"] == pytest.approx(hits, abs=1e-12)
  ensemble = np.sum(np.argmax((probs[0] + probs[1]) / 2, -1) == DIGITS.test_labels) / 360
  assert result["ensemble_test_accuracy"] == pytest.approx(ensemble, abs=1e-12)


def test_sixteen_devices_count_each_example_once(model):
  """A 16-device slice (v4-32, v5e-16): batch 100 pads to 112; the same errors and loss as the numpy count."""
  import json
  import os
  import subprocess
  import sys

  net, variables = model
  errors, loss = reference(net, variables)
  flags = [f for f in os.environ["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" not in f]
  script = """
import jax, json, numpy as np
from kd_jax import data, models
from kd_jax.train import engine, evaluation, planning
from kd_jax.train import mesh as mesh_lib
digits = data.load("digits")
net = models.create("mlp", num_classes=10, widths=[16])
variables = net.init(jax.random.PRNGKey(3), np.zeros((1, 8, 8, 1), np.float32))
mesh = mesh_lib.make_mesh(replica=1, data=16)
step = engine.make_eval_step(net, planning.normalizer(digits), mesh)
result = evaluation.evaluate(step, jax.tree.map(lambda x: np.asarray(x)[None], variables), digits, 100, mesh)
print("RESULT" + json.dumps([jax.device_count(), result["test_errors"], result["test_loss"]]))
"""
  env = dict(os.environ, XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=16"]))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  devices, got_errors, got_loss = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert devices == 16 and got_errors == errors
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
