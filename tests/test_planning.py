"""The row plan: every config mistake is refused before any row trains, with the key named; the resume
fingerprint covers every setting that can change results."""
from __future__ import annotations

import contextlib
import os
import signal

import pytest

from kd_jax import data, train
from kd_jax.train import config as config_lib
from kd_jax.train import loop, planning, sources

DIGITS = data.load("digits")


def table():
  """Two rows: a teacher that would train first, and a distilled student (where the mistakes go)."""
  c = train.base_config()
  c.epochs = 1
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.progress = False
  c.rows.teacher = train.row(model="mlp", model_kwargs={"widths": [16]}, terms={"ce": {}})
  c.rows.student = train.row(model="mlp", model_kwargs={"widths": [8]}, teacher="teacher",
                             terms={"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}})
  return c


def _set(path, value):
  def apply(c):
    *parents, last = path.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[last] = value
  return apply


BAD = {  # mistake -> a text the error must contain (the key it names)
    "top-level key": (_set("epochz", 1), "epochz"),
    "data key": (_set("data.batch_sizee", 32), "data.batch_sizee"),
    "dataset": (_set("data.name", "mnistt"), "mnistt"),
    "mesh key": (_set("mesh.replicas", 2), "mesh.replicas"),
    "compute dtype": (_set("compute_dtype", "float16"), "compute_dtype"),
    "row key": (_set("rows.student.optimizr", {}), "rows.student.optimizr"),
    "stray optimizer option": (_set("rows.student.optimizer.b1", 0.9), "rows.student.optimizer.b1"),
    "optimizer name": (_set("rows.student.optimizer.name", "sgdd"), "rows.student.optimizer"),
    "schedule name": (_set("rows.student.schedule.name", "cosin"), "rows.student.schedule"),
    "schedule key": (_set("rows.student.schedule.final_fractio", 0.1), "rows.student.schedule.final_fractio"),
    "augment": (_set("rows.student.data.augment", "flip"), "rows.student.data.augment"),
    "model": (_set("rows.student.model", "mlpp"), "mlpp"),
    "term": (_set("rows.student.terms.kdd", {}), "rows.student.terms"),
    "term option": (_set("rows.student.terms.kd.temprature", 2.0), "temprature"),
    "exchange mode": (_set("rows.student.peers.exchange", "stail"), "rows.student.peers.exchange"),
    "teacher input": (_set("rows.student.teacher.input", "noisy"), "rows.student.teacher.input"),
    "peers": (_set("rows.student.peers.count", 0), "rows.student.peers.count"),
    "missing teacher": (_set("rows.student.teacher.row", ""), "rows.student.teacher.row"),
    "cache with augmentation": (lambda c: (_set("rows.student.teacher.cache", True)(c),
                                           _set("rows.student.data.augment", "jitter")(c)), "rows.student.teacher.cache"),
    "freeze path": (_set("rows.student.optimizer.freeze", ["students"]), "rows.student.optimizer.freeze"),
    "frozen module": (_set("rows.student.optimizer.freeze", ["student/dense9"]), "dense9"),
    "batch divisor": (_set("data.batch_size", 60), "data.batch_size"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_mistake_in_the_last_row_is_refused_before_any_row_trains(case, tmp_path):
  mistake, named = BAD[case]
  config = table()
  mistake(config)
  with pytest.raises(train.ConfigError) as error:
    train.run(config, str(tmp_path))
  assert named in str(error.value), str(error.value)
  assert "\n" not in str(error.value)
  assert not os.path.exists(tmp_path / "teacher" / "checkpoints")  # the first row never started


def test_every_row_plans_with_the_source_its_config_asks_for():
  config = table()
  config.rows.cached = train.row(model="mlp", teacher={"row": "teacher", "cache": True}, terms={"kd": {}})
  config.rows.clean = train.row(model="mlp", teacher={"row": "teacher", "input": "clean"}, data={"augment": "jitter"},
                                terms={"kd": {}})
  config.rows.dml = train.row(model="mlp", peers={"count": 2, "exchange": "predictions"}, terms={"ce": {}, "dml": {}})
  config.rows.stale = train.row(model="mlp", peers={"count": 3, "exchange": "stale", "every_steps": 7},
                                terms={"ce": {}, "codistill": {}})
  plans = train.check(config, DIGITS, workdir="/w")
  assert list(plans) == ["teacher", "student", "cached", "clean", "dml", "stale"]
  assert plans["teacher"].source is None
  assert plans["student"].source == sources.Teacher(input="augmented") and plans["student"].teacher == "/w/teacher/final"
  assert plans["cached"].source == sources.TeacherCache()
  assert plans["clean"].source == sources.Teacher(input="clean")
  assert plans["dml"].source == sources.Peers(peers=2)
  assert plans["stale"].source == sources.StalePeers(peers=3, every_steps=7)
  assert plans["stale"].source.streams(3) == 3 and plans["dml"].source.streams(2) == 1
  assert plans["student"].steps_per_epoch == DIGITS.num_train // 64  # the last partial batch is dropped


def test_a_new_setting_enters_the_fingerprint_unless_declared_harmless():
  config = table()
  before = config_lib.fingerprint(config, "student")
  assert "compute_dtype" in before and "rows.student.optimizer.learning_rate" in before
  assert not any(k.startswith(("mesh", "rows.teacher", "log_every")) for k in before)
  config.new_setting = 3
  config.rows.student.new_row_setting = "x"
  after = config_lib.fingerprint(config, "student")
  assert after["new_setting"] == 3 and after["rows.student.new_row_setting"] == "x"
  config.log_every_steps = 7
  config.mesh.data = 2
  config.rows.student.paper = "70.1"
  config.rows.teacher.epochs = 9  # another row
  assert config_lib.fingerprint(config, "student") == after


def test_resuming_in_another_compute_dtype_is_refused(tmp_path, monkeypatch):
  config = table()
  del config.rows["student"]

  class StopAtSecondStep(dict):
    calls = 0

    def __getitem__(self, key):
      StopAtSecondStep.calls += 1
      return signal.SIGTERM if StopAtSecondStep.calls >= 2 else None

  monkeypatch.setattr(loop, "_stop_signals", contextlib.contextmanager(lambda: (yield StopAtSecondStep())))
  with pytest.raises(loop.Preempted):
    train.run(config, str(tmp_path))
  monkeypatch.undo()
  config.compute_dtype = "bfloat16"
  with pytest.raises(train.ConfigError, match=r"compute_dtype: 'float32' -> 'bfloat16'"):
    train.run(config, str(tmp_path))


def test_sources_are_registered_by_name():
  assert {"teacher", "teacher_cache", "peers", "stale_peers"} <= set(sources.source_names())
  assert sources.create("stale_peers", peers=2, every_steps=3) == sources.StalePeers(peers=2, every_steps=3)
  with pytest.raises(train.ConfigError, match="unknown source 'techer'"):
    sources.create("techer")
  assert planning.EXCHANGES == ("none", "predictions", "stale")
