"""TensorBoard summaries (kd_jax.train.summaries), read back from the event files."""
import glob
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.train import summaries as summaries_lib


def test_scalars_read_back_from_event_files(tmp_path):
  logdir = tmp_path / "row"
  with summaries_lib.Summaries(logdir, process_index=0) as summaries:
    for step in (0, 50, 100):
      summaries.scalars(step, {"train/loss": 2.0 / (step + 1), "train/lr": jnp.float32(0.1),
                               "train/temperature/kd": np.array([4.0 + step])})
    summaries.flush()
    summaries.scalars(100, {"eval/test_accuracy": 0.98125, "train/images_per_s": float("nan")})
  got = summaries_lib.read_scalars(logdir)
  assert sorted(got) == ["eval/test_accuracy", "train/images_per_s", "train/loss", "train/lr",
                         "train/temperature/kd"]
  assert [s for s, _ in got["train/loss"]] == [0, 50, 100]
  np.testing.assert_allclose([v for _, v in got["train/loss"]], [2.0, 2.0 / 51, 2.0 / 101], rtol=1e-7)
  assert got["train/lr"] == [(0, pytest.approx(0.1)), (50, pytest.approx(0.1)), (100, pytest.approx(0.1))]
  assert got["train/temperature/kd"] == [(0, 4.0), (50, 54.0), (100, 104.0)]
  assert got["eval/test_accuracy"] == [(100, pytest.approx(0.98125))]
  assert np.isnan(got["train/images_per_s"][0][1])  # a diverging figure stays visible
  # What TensorBoard reads: one events.out.tfevents.* file, TFRecord framed, first event the file version.
  (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    f.read(4)
    assert b"brain.Event:2" in f.read(length)


def test_only_process_zero_writes_and_bad_values_are_named(tmp_path):
  other = summaries_lib.Summaries(tmp_path / "p1", process_index=1)
  other.scalars(0, {"train/loss": 1.0})
  other.close()
  assert not other.active and not (tmp_path / "p1").exists()
  off = summaries_lib.Summaries("", process_index=0)  # no logdir: off
  off.scalars(0, {"train/loss": 1.0})
  summaries = summaries_lib.Summaries(tmp_path / "p0", process_index=0)
  with pytest.raises(ValueError, match=r"summary 'train/logits' must be a scalar, got shape \(2,\)"):
    summaries.scalars(0, {"train/logits": np.ones(2)})
  summaries.close()
  summaries.close()  # idempotent
  with pytest.raises(RuntimeError, match="closed"):
    summaries.scalars(1, {"train/loss": 1.0})
