"""The real train loop does not retrace: XLA compilations counted through jax.monitoring during `train.run`.

A recompilation after the first step (a Python scalar changing type, a new
sharding or weak type on the state after a checkpoint, a metric fetched with a
fresh jit) would cost a compile per step or per epoch; here every compilation
of a 2-epoch digits run (teacher, then KD student), with metrics logged, test
evaluation every epoch and checkpoints, is attributed to the step or function
that triggered it.
"""
import jax
import jax.monitoring
import pytest

from kd_jax import train
from kd_jax.train import loop

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # as experiments/benchmark.py counts


def _config():
  c = train.base_config()
  c.data.name = "digits"  # 1437 training images: 22 steps of 64 per epoch
  c.data.batch_size = 64
  c.data.eval_batch_size = 360
  c.log_every_steps = 1  # every step's metrics fetched and written
  c.checkpoint_every_steps = 5
  c.progress = False
  adam = {"name": "adam", "learning_rate": 1e-2}
  c.rows.teacher = train.row(model="mlp", model_kwargs={"widths": [32]}, terms={"ce": {}}, optimizer=adam,
                             epochs=1)
  c.rows.student = train.row(model="mlp", model_kwargs={"widths": [16], "dropout": 0.1}, teacher="teacher",
                             optimizer=adam, epochs=2,
                             terms={"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}})
  return c


class _Recorder:
  """Every backend compilation as (row, where, train steps done so far, function name)."""

  def __init__(self):
    self.events = []
    self.row, self.where, self.steps = None, "loop", 0

  def listen(self, event, duration, **kwargs):
    del duration
    if event == BACKEND_COMPILE_EVENT:
      self.events.append((self.row, self.where, self.steps, kwargs.get("fun_name")))

  def wrap(self, make, where):
    """`make` (engine.make_train_step / make_eval_step) whose jitted function is tagged while it runs."""

    def made(*args, **kwargs):
      fn = make(*args, **kwargs)

      def call(*a):
        self.where = where
        try:
          return fn(*a)
        finally:
          self.where = "loop"
          self.steps += where == "train"

      return call

    return made


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
  recorder = _Recorder()
  patch = pytest.MonkeyPatch()
  patch.setattr(loop.engine, "make_train_step", recorder.wrap(loop.engine.make_train_step, "train"))
  patch.setattr(loop.engine, "make_eval_step", recorder.wrap(loop.engine.make_eval_step, "eval"))
  train_row = loop.train_row

  def tagged_row(plan, *args, **kwargs):
    recorder.row, recorder.steps = plan.name, 0
    return train_row(plan, *args, **kwargs)

  patch.setattr(loop, "train_row", tagged_row)
  jax.monitoring.register_event_duration_secs_listener(recorder.listen)
  try:
    workdir = str(tmp_path_factory.mktemp("compiles"))
    results = train.run(_config(), workdir)
  finally:
    jax.monitoring.unregister_event_duration_listener(recorder.listen)
    patch.undo()
  return recorder.events, results


def test_the_listener_sees_compilations(recorded_run):
  events, results = recorded_run
  assert set(results) == {"teacher", "student"}
  assert any(where == "train" for _, where, _, _ in events)  # else every count below would pass vacuously


@pytest.mark.parametrize("row", ["teacher", "student"])
def test_train_and_eval_steps_compile_once(recorded_run, row):
  events, results = recorded_run
  assert results[row]["steps"] == (22 if row == "teacher" else 44)
  # The train step compiles at its first call and never again (22 or 44 calls);
  train = [(steps, name) for r, where, steps, name in events if r == row and where == "train"]
  assert [steps for steps, _ in train] == [0], train
  # the eval step once, at the end of the first epoch, though it runs after every epoch.
  evals = [steps for r, where, steps, _ in events if r == row and where == "eval"]
  assert evals == [22], evals


def test_nothing_compiles_once_the_first_epoch_is_done(recorded_run):
  # Steps 23..43 of the student: metrics fetched every step, checkpoints at 25, 30, 35, 40, no evaluation.
  # Everything the loop does there (drains, finiteness checks, orbax saves) was compiled by then.
  events, _ = recorded_run
  late = [e for e in events if e[0] == "student" and 22 < e[2] < 44]
  assert late == []
  # The first checkpoint compiles its slicing helpers once (orbax), later ones reuse them.
  first = [e for e in events if e[0] == "student" and e[1] == "loop" and 0 < e[2] < 22]
  assert all(steps == 5 for _, _, steps, _ in first), first
