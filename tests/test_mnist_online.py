"""Issue #7's short MNIST runs: DML, co-distillation, born-again (2 generations), TAKD and weight
distillation each learn (test accuracy above 97%) through the rows of experiments/configs/mnist_methods.py.

These are `slow` (minutes each on 2 CPU cores); run them with `make test-all` or
`pytest -m slow tests/test_mnist_online.py`. The full-length, 3-seed figures are in REPRODUCTION.md.
"""
import pytest

from experiments.configs import mnist_methods, select_rows
from kd_jax import train

pytestmark = pytest.mark.slow

SHORT_EPOCHS = 3


@pytest.fixture(scope="module")
def short_table(tmp_path_factory):
  """The rows the online/self/chain methods need, each trained for SHORT_EPOCHS, in one workdir."""
  config = mnist_methods.get_config()
  select_rows(config, "dml,codistill,ban_gen2,takd,wd")  # their teachers and earlier stages come along
  for name in config.rows:
    config.rows[name].epochs = SHORT_EPOCHS
  config.rows.wd_generate.epochs = 1  # phase 1 runs the generator every step: ~3x a KD step
  # The co-distillation burn-in (2 of 60 epochs in the table) shortened: distillation in the second epoch.
  config.rows.codistill.terms.codistill.start_epoch = 1
  config.mesh.data = 1  # one device: 8 fake CPU devices only slow a long run down on a small machine
  config.progress = False
  workdir = str(tmp_path_factory.mktemp("mnist_online"))
  return config, train.run(config, workdir)


@pytest.mark.parametrize("row", ["dml", "codistill", "ban_gen2", "takd", "wd"])
def test_short_run_learns(short_table, row):
  config, results = short_table
  result = results[row]
  print(f"{row}: {SHORT_EPOCHS} epochs, test accuracy {result['test_accuracy']:.4f}, "
        f"{result['test_errors']} errors, {result['wall_time_s']} s")
  assert result["test_accuracy"] > 0.97, (row, result["test_accuracy"])
  if config.rows[row].peers > 1:  # every peer learned, not only the exported one
    assert min(result["peer_test_accuracy"]) > 0.97, result["peer_test_accuracy"]
  if row == "ban_gen2":  # the ensemble of the generations is evaluated too
    assert result["ensemble_test_accuracy"] > 0.97
