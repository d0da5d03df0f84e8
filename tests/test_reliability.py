"""Preemption safety: SIGKILL/SIGTERM at random steps, corrupt checkpoints, non-finite losses (multi-process: test_multiprocess)."""
import glob
import os
import random
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import distill, train
from kd_jax.train import checkpoint, loop
from tests.configs import tiny_digits
from tests.processes import launch


def checkpoint_steps(workdir, row):
  names = (os.path.basename(p) for p in glob.glob(os.path.join(workdir, row, "checkpoints", "*")))
  return sorted(int(n) for n in names if n.isdigit())  # orbax's in-progress saves end in -tmp-...


def wait_for_progress(workdir, row, proc, beyond, timeout=120):
  """Waits until `row` has a checkpoint past step `beyond` (or the process ends)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    steps = checkpoint_steps(workdir, row)
    if steps and steps[-1] > beyond:
      return steps[-1]
    time.sleep(0.05)
  return None


def final_variables(workdir, row):
  return checkpoint.load_model(os.path.join(workdir, row, "final"))[0]


def assert_same_variables(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run, in this process (8 devices, as the subprocesses)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train.run(tiny_digits.get_config(), workdir)
  return workdir


def test_sigkill_at_random_steps_then_resume_is_bit_exact(reference, tmp_path):
  workdir = str(tmp_path)
  rng = random.Random(0)
  last = 0
  for _ in range(3):
    proc = launch(workdir)
    reached = wait_for_progress(workdir, "teacher", proc, beyond=last)
    time.sleep(rng.uniform(0.0, 0.3))  # land anywhere: mid-step, mid-save, between rows
    proc.proc.kill()
    proc.wait()
    assert reached is not None, proc.output()[-3000:]
    last = reached
  proc = launch(workdir)
  assert proc.wait() == 0, proc.output()[-3000:]
  for row in ("teacher", "student_kd"):
    assert_same_variables(final_variables(workdir, row), final_variables(reference, row))


@pytest.mark.parametrize("signum, status, said", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C (SIGINT)")])
def test_sigterm_and_ctrl_c_checkpoint_the_current_step_and_exit(reference, tmp_path, signum, status, said):
  workdir = str(tmp_path)
  proc = launch(workdir)
  assert wait_for_progress(workdir, "teacher", proc, beyond=8) is not None
  proc.proc.send_signal(signum)
  assert proc.wait() == status, proc.output()[-3000:]
  assert "Traceback" not in proc.output(), proc.output()[-3000:]
  stopped_at = int(proc.output().split(f"{said} received; checkpointed step ")[1].split(",")[0])
  assert stopped_at in checkpoint_steps(workdir, "teacher")
  assert not os.path.exists(os.path.join(workdir, "teacher", "result.json"))
  proc = launch(workdir)
  assert proc.wait() == 0, proc.output()[-3000:]
  assert_same_variables(final_variables(workdir, "student_kd"), final_variables(reference, "student_kd"))


class _StopAfter:
  """Context manager standing in for a SIGTERM that arrives after `n` steps."""

  def __init__(self, n):
    self.n = n

  def __enter__(self):
    calls = {"n": 0}
    n = self.n

    class Flag(dict):
      def __getitem__(self, key):
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] >= n else None

    return Flag()

  def __exit__(self, *exc):
    return False


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path, monkeypatch, caplog):
  workdir = str(tmp_path)
  config = tiny_digits.get_config("teacher")
  monkeypatch.setattr(loop, "_stop_signals", lambda: _StopAfter(19))
  with pytest.raises(loop.Preempted):
    train.run(config, workdir)
  monkeypatch.undo()
  assert checkpoint_steps(workdir, "teacher")[-2:] == [16, 19]
  for path in glob.glob(os.path.join(workdir, "teacher", "checkpoints", "19", "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  train.run(config, workdir)
  assert "checkpoint at step 19" in caplog.text and "unreadable" in caplog.text
  assert_same_variables(final_variables(workdir, "teacher"), final_variables(reference, "teacher"))


def test_all_checkpoints_unreadable_is_a_clear_error(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = tiny_digits.get_config("teacher")
  monkeypatch.setattr(loop, "_stop_signals", lambda: _StopAfter(3))
  with pytest.raises(loop.Preempted):
    train.run(config, workdir)
  monkeypatch.undo()
  for path in glob.glob(os.path.join(workdir, "teacher", "checkpoints", "*", "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      os.remove(path)
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint in .*checkpoints: step 3: "):
    train.run(config, workdir)


@distill.register_term("test_nan_at_step_7")
class _NanAtStep7(distill.Term):
  def __call__(self, student, teacher, batch, params, state, *, step):
    bad = jnp.where(step == 7, jnp.nan, 0.0)
    return jnp.mean(student.logits, axis=-1) * 0.0 + bad, state


def _nan_config():
  config = tiny_digits.get_config("teacher")
  config.epochs = 1
  config.rows.teacher.terms = {"ce": {}, "test_nan_at_step_7": {}}
  return config


def test_wall_time_checkpoints_between_step_intervals(tmp_path):
  config = tiny_digits.get_config("teacher")
  config.epochs = 1
  config.checkpoint_every_steps = 1000  # never by steps in this run
  config.checkpoint_every_seconds = 0.0  # every step by wall time
  config.keep_checkpoints = 100
  train.run(config, str(tmp_path))
  steps = checkpoint_steps(str(tmp_path), "teacher")
  assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > 1, steps


def test_non_finite_loss_stops_naming_the_step_and_term(tmp_path):
  with pytest.raises(loop.NonFiniteLoss, match=r"non-finite loss, loss/test_nan_at_step_7 at step 7 \(loss=nan, grad_norm=[0-9.]+, loss/ce="):
    train.run(_nan_config(), str(tmp_path))
  assert checkpoint_steps(str(tmp_path), "teacher") == []  # nothing saved after the bad step (first save: 8)


def test_non_finite_steps_can_be_skipped(tmp_path):
  config = _nan_config()
  config.skip_nonfinite = True
  result = train.run(config, str(tmp_path))["teacher"]
  assert np.isfinite(result["test_loss"]) and result["test_accuracy"] > 0.5
  variables = final_variables(str(tmp_path), "teacher")
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))
