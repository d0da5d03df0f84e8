"""distributed.DispatchLimit: how many dispatched steps stay unfinished."""
import pytest

from kd_jax.train import distributed


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
