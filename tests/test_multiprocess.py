"""Multi-process runs: 2 CPU processes of 4 devices each (jax.distributed over localhost, gloo
collectives) give the same numbers as 1 process of 8 devices.

Its own file so that pytest-xdist's per-file scheduling runs it beside test_reliability.py.
"""
import json
import os

import numpy as np
import pytest

from kd_jax import train
from tests.configs import tiny_crd, tiny_digits, tiny_online
from tests.processes import REPO, launch, read_jsonl


# CRD's bank split over 2 processes is `slow` (~40 s): the default run keeps KD and DML, and CRD's bank rows
# over "data" on one process of 8 devices are in test_methods.
@pytest.mark.parametrize("config_name", ["tiny_digits", "tiny_online",
                                         pytest.param("tiny_crd", marks=pytest.mark.slow)])
def test_two_processes_of_four_devices_match_one_of_eight(config_name, tmp_path):
  """KD, DML (2 peers on the replica axis) and CRD (bank rows over "data"): 2 x 4 devices == 1 x 8."""
  workdir = str(tmp_path)
  port = 20000 + (os.getpid() + len(config_name)) % 20000
  # conftest's cheap-compile flags, as the single process below, with 4 devices per process.
  flags = [f for f in os.environ["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" not in f]
  env = {"XLA_FLAGS": " ".join(flags + ["--xla_force_host_platform_device_count=4"])}
  path = os.path.join(REPO, "tests", "configs", f"{config_name}.py")
  # An eval batch (100) that neither the 8 devices nor the 360 test examples divide: padded and masked.
  flags = [f"--config={path}", "--config.epochs=1", "--config.data.eval_batch_size=100",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [launch(workdir, *flags, f"--process_id={i}", env=env) for i in range(2)]
  for proc in procs:
    assert proc.wait() == 0, proc.output()[-3000:]
  single = str(tmp_path / "single")
  module = {"tiny_digits": tiny_digits, "tiny_online": tiny_online, "tiny_crd": tiny_crd}[config_name]
  config = module.get_config()
  config.epochs = 1
  config.data.eval_batch_size = 360  # one unpadded batch on one process: the reference count
  results = train.run(config, single)
  for row in results:
    multi = read_jsonl(os.path.join(workdir, row, "metrics.jsonl"))
    one = read_jsonl(os.path.join(single, row, "metrics.jsonl"))
    assert [m["step"] for m in multi] == [m["step"] for m in one] and len(one) > 5
    assert sum(m["split"] == "train" for m in one) >= 5  # 20+ steps logged
    np.testing.assert_allclose([m.get("loss", m.get("test_loss")) for m in multi],
                               [m.get("loss", m.get("test_loss")) for m in one], rtol=1e-5)


# Without a bound on the dispatched steps, 2 CPU processes deadlock once ~64 steps are queued (issue 28):
# hinton_mnist's rows read no result for 100 steps. The run is killed after a timeout rather than left hanging.
def test_hinton_row_on_two_processes_finishes_as_on_one(tmp_path):
  """hinton_mnist.py:student, 100 steps (no result read in between), on 2 x 4 devices == 1 x 8."""
  workdir = str(tmp_path / "multi")
  port = 20000 + (os.getpid() + 7) % 20000
  flags = [f for f in os.environ["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" not in f]
  env = {"XLA_FLAGS": " ".join(flags + ["--xla_force_host_platform_device_count=4"])}
  config_path = os.path.join(REPO, "experiments", "configs", "hinton_mnist.py")
  args = [f"--config={config_path}:student", "--config.epochs=1", "--config.max_steps=100",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [launch(workdir, *args, f"--process_id={i}", env=env) for i in range(2)]
  try:
    for proc in procs:
      assert proc.wait(timeout=240) == 0, proc.output()[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.proc.kill()
  # The one-process reference in its own process too (8 devices), apart from this worker's state.
  single = launch(str(tmp_path / "single"), *args[:3])
  assert single.wait(timeout=240) == 0, single.output()[-3000:]
  with open(os.path.join(tmp_path, "single", "student", "result.json")) as f:
    one = json.load(f)
  with open(os.path.join(workdir, "student", "result.json")) as f:
    multi = json.load(f)
  assert multi["steps"] == one["steps"] == 100 and multi["test_errors"] == one["test_errors"]
  np.testing.assert_allclose(multi["test_loss"], one["test_loss"], rtol=1e-5)
  train_loss = lambda d: [m["loss"] for m in read_jsonl(os.path.join(d, "student", "metrics.jsonl"))]
  np.testing.assert_allclose(train_loss(workdir), train_loss(str(tmp_path / "single")), rtol=1e-5)


def _two_processes(workdir, port, *flags):
  env_flags = [f for f in os.environ["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" not in f]
  env = {"XLA_FLAGS": " ".join(env_flags + ["--xla_force_host_platform_device_count=4"])}
  args = [*flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  return [launch(workdir, *args, f"--process_id={i}", env=env) for i in range(2)]


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "teacher", "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [[0], [0, 1]], ids=["one_process", "both"])
def test_sigterm_on_some_processes_stops_all_at_one_agreed_step(signalled, tmp_path):
  """Preemption on a pod slice: SIGTERM to one process (or to both, a second apart) of a 2 x 4 device run;
  both processes checkpoint the same step and exit with 143 within 60 s; the rerun ends as an uninterrupted
  run."""
  import signal
  import time

  workdir = str(tmp_path / "run")
  port = 20000 + (os.getpid() + 3 * len(signalled)) % 20000
  flags = [f"--config={os.path.join(REPO, 'tests', 'configs', 'tiny_digits.py')}:teacher",
           "--config.checkpoint_every_steps=1000"]
  procs = _two_processes(workdir, port, *flags)
  deadline = time.time() + 120
  while time.time() < deadline and not os.path.exists(os.path.join(workdir, "teacher", "metrics.jsonl")):
    time.sleep(0.1)
  for i in signalled:
    procs[i].proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
  start = time.time()
  codes = [proc.wait(timeout=120) for proc in procs]
  assert time.time() - start < 60 and codes == [143, 143], [p.output()[-2000:] for p in procs]
  steps = _checkpoint_steps(workdir)
  assert len(steps) == 1, steps  # one agreed step (checkpoint_every_steps is never reached)
  leftovers = [d for d in os.listdir(os.path.join(workdir, "teacher", "checkpoints")) if not d.isdigit()]
  assert not any("tmp" in d for d in leftovers), leftovers
  procs = _two_processes(workdir, port + 1, *flags)
  assert [proc.wait(timeout=300) for proc in procs] == [0, 0], [p.output()[-2000:] for p in procs]
  config = tiny_digits.get_config("teacher")
  config.checkpoint_every_steps = 1000
  one = train.run(config, str(tmp_path / "single"))["teacher"]
  with open(os.path.join(workdir, "teacher", "result.json")) as f:
    resumed = json.load(f)
  assert resumed["test_errors"] == one["test_errors"]
  np.testing.assert_allclose(resumed["test_loss"], one["test_loss"], rtol=1e-5)
