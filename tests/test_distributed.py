"""distributed: DispatchLimit (how many dispatched steps stay unfinished) and any_process (one answer on every process)."""
import os
import subprocess
import sys

import pytest

from kd_jax.train import distributed
from tests.processes import REPO


class _Step:
  """A stand-in for a step's output array that records being waited on."""

  def __init__(self, waited, index):
    self.waited, self.index = waited, index

  def block_until_ready(self):
    self.waited.append(self.index)
    return self


def test_dispatch_limit_waits_for_the_step_depth_back():
  waited = []
  limit = distributed.DispatchLimit(depth=2)
  for index in range(5):
    limit({"loss": _Step(waited, index)})
    assert waited == list(range(max(0, index - 1)))  # after step i: steps 0..i-2 finished, i-1 and i in flight


def test_dispatch_limit_depth_must_be_positive():
  with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
    distributed.DispatchLimit(depth=0)


def test_any_process_on_one_process():
  assert distributed.any_process(True) and not distributed.any_process(False)


_AGREE = """
import sys
import jax
from kd_jax.train import distributed
from tests.processes import REPO
distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
# A SIGTERM seen by process 1 only, at its 3rd check: both must stop at the same check.
flags = [False, False, jax.process_index() == 1, False]
print([distributed.any_process(f) for f in flags])
"""


def test_any_process_agrees_across_two_processes(tmp_path):
  port = 20000 + (os.getpid() + 3) % 20000
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen([sys.executable, "-c", _AGREE, f"127.0.0.1:{port}", str(i)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-2000:]
    assert out.strip().splitlines()[-1] == "[False, False, True, False]"
