r"""Speed and memory of the kd_jax train step against the same step in PyTorch.

For each case, the kd_jax side is the real engine step (`engine.StepSpec`,
`engine.init_state`, `engine.make_train_step` on `mesh.make_mesh()`), fed a
fixed random uint8 batch placed on device once; the PyTorch side
(`third_party/torch_reference.py`) trains the same architectures on the same
batch with the same optimizer and loss (torchdistill's losses where it has
them). Each side runs in its own subprocess, so its peak-memory figure is its
own. Timing: `--warmup` steps (the first compiles), then `--repeats` timed
loops of `--steps` steps each, synchronised only at the end of a loop
(`jax.block_until_ready` / `torch.cuda.synchronize`); ms/step is the median
loop. `compiles` counts XLA compilations after the first step (warm-up and
timed loops), from `jax.monitoring`'s backend-compile events: it must be 0.

  python -m experiments.benchmark                               # every case, table + benchmark.json
  python -m experiments.benchmark --cases=hinton_mlp,resnet32x4_resnet8x4_kd --steps=20 --json=/tmp/b.json
  python -m experiments.benchmark --tiny --steps=2              # small models: checks the harness in seconds
  python -m experiments.benchmark --list

A case is one entry of `CASES`: a function `(tiny) -> Case` whose `jax` and
`torch` callables build the two sides (see `hinton_mlp` for a complete one).
A case whose kd_jax feature is missing (model, loss, term) reports
"skipped: ..." with what it needs. See BENCHMARKS.md for the columns.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

# Only the standard library at module level: the orchestrating process stays light and the
# jax / torch workers import just their own framework.

REPO = pathlib.Path(__file__).resolve().parents[1]
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
MIB = 1024 * 1024

MNIST = {"scale": 1.0 / 255.0, "mean": (0.0,), "std": (1.0,)}
CIFAR100 = {"scale": 1.0 / 255.0, "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)}
# The CRD recipe (Tian et al. 2020): SGD 0.05, momentum 0.9, weight decay 5e-4.
CRD_SGD = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
IMAGENET = {"scale": 1.0 / 255.0, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# The ImageNet ResNet recipe (He et al. 2016): SGD 0.1 at batch 256, momentum 0.9, weight decay 1e-4.
IMAGENET_SGD = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-4}

# Peak dense FLOP/s per chip for the MFU column, from the vendors' datasheets: {device-kind substring:
# {compute dtype: FLOP/s}}; float32 on NVIDIA is TF32 (what XLA's and cuDNN's default float32 convolutions
# use). The first matching substring wins; `--peak-tflops` overrides (e.g. a chip not listed here).
PEAK_FLOPS = {
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},  # SXM
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},
}


def peak_flops(device: str, dtype: str) -> float | None:
  """The chip's peak FLOP/s for `dtype` compute from `PEAK_FLOPS`, by the device description; None if unknown
  (CPUs among them)."""
  for kind, peaks in PEAK_FLOPS.items():
    if kind in device:
      return peaks.get(dtype)
  return None


class Skipped(Exception):
  """A case that cannot run here; the message says what it needs."""


@dataclasses.dataclass(frozen=True)
class Settings:
  steps: int | None = None  # None: each case's own default (`Case.steps`)
  warmup: int = 2
  repeats: int = 3
  tiny: bool = False
  seed: int = 0
  # "bfloat16": mixed precision on both sides, kd_jax's `compute_dtype` (bf16 compute, f32 params) and
  # torch.autocast(dtype=torch.bfloat16) around the PyTorch step.
  dtype: str = "float32"
  # A case with a baseline also times the baseline's step in its own worker, the two alternating (see
  # `paired_loops`): the ratio in "vs baseline" then does not move with the machine between two rows.
  paired: bool = True
  # kd_jax's convolution rewrites in the step cases (`engine.StepSpec.rewrites`): "default" (on for CPU), "none",
  # or the ones on, comma-separated (see `conv_rewrites`); the loop cases run the loop's default.
  conv_rewrites: str = "default"


# The fields of `kd_jax.train.backend.ConvRewrites` (checked when one is built), for --conv-rewrites.
CONV_REWRITES = ("hold_inputs", "hold_outputs", "phased_input_gradients")


def conv_rewrites(text: str):
  """The `backend.ConvRewrites` of a --conv-rewrites value: "default", "none" or the names of the rewrites on."""
  from kd_jax.train import backend
  if tuple(f.name for f in dataclasses.fields(backend.ConvRewrites)) != CONV_REWRITES:
    raise RuntimeError(f"benchmark.CONV_REWRITES {CONV_REWRITES} is not backend.ConvRewrites' fields")
  if text == "default":
    return backend.ConvRewrites.default()
  return backend.ConvRewrites(**{name: name in _conv_rewrite_names(text) for name in CONV_REWRITES})


def _conv_rewrite_names(text: str) -> list[str]:
  names = [] if text == "none" else [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in CONV_REWRITES]
  if unknown:
    raise ValueError(f"--conv-rewrites: unknown rewrite(s) {unknown}; allowed: 'default', 'none' or a comma list "
                     f"of {', '.join(CONV_REWRITES)}")
  return names


@dataclasses.dataclass(frozen=True)
class Case:
  """Both sides of one benchmark case; `jax()` / `torch()` are only called inside their worker."""

  description: str
  batch: int  # per model and per step
  images_per_step: int  # examples through a trained model per step (peers x batch for online methods)
  jax: Callable[[], "JaxSetup"]
  torch: Callable[[], Any]  # -> torch_reference.TorchStep
  # Steps per timed loop unless --steps is given: sized so that the default run fits in 10 minutes on
  # 2 CPU cores (an AVX2 EPYC), with loops of at least about a second there.
  steps: int = 1
  # Another case this one is compared with (time and FLOP ratios in the row's "vs_baseline"):
  # co-distillation and DML against 2 independent runs.
  baseline: str | None = None
  # "step": the engine step alone (jax) against PyTorch; "loop": `jax()` returns a `LoopSetup` and the
  # real train loop runs with logging and checkpointing on and off (kd_jax only, see `run_jax_loop`).
  kind: str = "step"
  # In the default run (no --cases); the others run when named, or with --cases=all.
  default: bool = True


CASES: dict[str, Callable[[bool], Case]] = {}


def register(name: str):
  def wrap(fn: Callable[[bool], Case]):
    if name in CASES:
      raise ValueError(f"benchmark case {name!r} is registered twice")
    CASES[name] = fn
    return fn

  return wrap


# ----------------------------------------------------------------------------- the jax side


@dataclasses.dataclass
class JaxSetup:
  """What the jax worker needs to build and run the engine step."""

  spec: Any  # engine.StepSpec
  batch: dict[str, Any]  # host numpy {"image": uint8 [S, B, H, W, C], "label": [S, B], "index": [S, B]}
  input_shape: tuple[int, ...]
  teacher_variables: Any = dataclasses.field(default_factory=dict)
  check_state: Callable[[Any], str] | None = None  # -> a note about the initial state (e.g. a bank's shape)


def missing(*, models: Sequence[str] = (), terms: Sequence[str] = (), losses: Sequence[str] = (),
            exchange: str | None = None) -> list[str]:
  """What of these kd_jax features is not there yet (model names, distill terms, kd_jax.losses functions)."""
  from kd_jax import distill, losses as losses_lib, models as models_lib
  from kd_jax.train import planning
  out = [f"model {m} not available" for m in models if m not in models_lib.names()]
  out += [f"distill term {t!r}" for t in terms if t not in distill.term_names()]
  out += [f"kd_jax.losses.{f}" for f in losses if not hasattr(losses_lib, f)]
  if exchange is not None and exchange not in planning.EXCHANGES:
    out.append(f"engine exchange mode {exchange!r}")
  return out


def require(**kwargs) -> None:
  """Raises `Skipped` naming every missing feature."""
  gaps = missing(**kwargs)
  absent_models = [g for g in gaps if g.startswith("model ")]
  needs = [g for g in gaps if not g.startswith("model ")]
  if gaps:
    raise Skipped("skipped: " + "; ".join(absent_models + (["needs " + ", ".join(needs)] if needs else [])))


def random_batch(*, streams: int, batch: int, input_shape: Sequence[int], num_classes: int, num_train: int,
                 seed: int = 0) -> dict[str, Any]:
  """A fixed random uint8 batch, the same for both sides."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (streams, batch) + tuple(input_shape), dtype=np.uint8),
          "label": rng.integers(0, num_classes, (streams, batch), dtype=np.int32),
          "index": rng.integers(0, num_train, (streams, batch), dtype=np.int32)}


def jax_setup(*, student: str, num_classes: int, terms: dict[str, Any], optimizer: dict[str, Any],
              normalize: dict[str, Any], batch: dict[str, Any], input_shape: tuple[int, ...],
              student_kwargs: dict[str, Any] | None = None, teacher: str | None = None,
              teacher_kwargs: dict[str, Any] | None = None, peers: int = 1, exchange: str = "none",
              exchange_every: int = 1, num_train: int, check_state=None) -> JaxSetup:
  """An engine StepSpec as `kd_jax.train.loop` builds it, and a randomly initialised teacher.

  num_train: the training-set size the batch's "index" values come from (sizes memory banks).
  """
  import jax
  import jax.numpy as jnp
  from kd_jax import models
  from kd_jax.data import augment
  from kd_jax.distill import Objective
  from kd_jax.train import backend, engine, optim, sources

  schedule = optim.make_schedule({"name": "constant"}, base_lr=optimizer["learning_rate"], steps_per_epoch=1,
                                 total_steps=1)
  student_module = models.create(student, num_classes=num_classes, **(student_kwargs or {}))
  teacher_module, teacher_variables = None, {}
  if teacher is not None:
    teacher_module = models.create(teacher, num_classes=num_classes, **(teacher_kwargs or {}))
    # A random teacher costs the same as a trained one.
    teacher_variables = jax.jit(lambda r: teacher_module.init(
        r, jnp.zeros((1,) + input_shape, jnp.float32), train=False))(jax.random.PRNGKey(1))
  source = {"none": sources.Teacher(module=teacher_module) if teacher_module is not None else None,
            "predictions": sources.create("peers", peers=peers),
            "stale": sources.create("stale_peers", peers=peers, every_steps=exchange_every)}[exchange]
  spec = engine.StepSpec(
      student=student_module, objective=Objective(terms, num_train=num_train),
      optimizer=optim.make_optimizer(optimizer, schedule),
      schedule=schedule, normalize=lambda x: augment.normalize(x, **normalize), source=source,
      augment="none", peers=peers, rewrites=backend.ConvRewrites.default())
  return JaxSetup(spec, batch, input_shape, teacher_variables, check_state)


class CompileCounter:
  """Counts XLA backend compilations (and jaxpr traces) through `jax.monitoring` duration events.

  jit records BACKEND_COMPILE_EVENT around every executable it builds (a persistent
  compilation-cache hit included), so a count of 0 over the timed loops means no
  retracing or recompilation there.
  """

  def __init__(self):
    import jax.monitoring
    self.compiles = 0
    self.traces = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      self.compiles += 1
    elif event == TRACE_EVENT:
      self.traces += 1

  def reset(self) -> tuple[int, int]:
    counts = (self.compiles, self.traces)
    self.compiles = self.traces = 0
    return counts

  def close(self) -> None:
    import jax.monitoring
    jax.monitoring.unregister_event_duration_listener(self._listen)


class _JaxRunner:
  """The engine step of a `JaxSetup` on its fixed batch, built as `kd_jax.train.loop` builds it; the train
  state is carried from call to call (the step donates it)."""

  def __init__(self, setup: JaxSetup, settings: Settings):
    import jax
    import jax.numpy as jnp
    from kd_jax.train import backend, engine
    from kd_jax.train import mesh as mesh_lib

    spec = dataclasses.replace(setup.spec, compute_dtype=settings.dtype,
                               rewrites=conv_rewrites(settings.conv_rewrites))
    self.rewrites = spec.rewrites
    mesh = mesh_lib.make_mesh()
    self.teacher_variables = jax.device_put(setup.teacher_variables, mesh_lib.replicated(mesh))
    example = jnp.zeros((mesh.devices.size,) + setup.input_shape, jnp.uint8)
    rng = jax.random.PRNGKey(settings.seed)
    abstract = jax.eval_shape(lambda: engine.init_state(spec, rng, self.teacher_variables, example))
    state_sharding = engine.state_shardings(mesh, abstract, spec)
    self.state = backend.jit(engine.init_state, static_argnums=0, out_shardings=state_sharding)(
        spec, rng, self.teacher_variables, example)
    self.step = engine.make_train_step(spec, mesh, state_sharding)
    self.batch = mesh_lib.put_batch(setup.batch, engine.batch_sharding(mesh, spec))
    self.metrics = None
    jax.block_until_ready((self.state, self.teacher_variables, self.batch))

  def run(self, steps: int) -> float:
    """Seconds per step of `steps` steps back to back, synchronised only at the end."""
    import jax
    start = time.perf_counter()
    for _ in range(steps):
      self.state, self.metrics = self.step(self.state, self.teacher_variables, self.batch)
    jax.block_until_ready((self.state, self.metrics))
    return (time.perf_counter() - start) / steps

  def flops(self) -> float | None:
    return step_flops(self.step, self.state, self.teacher_variables, self.batch)


def paired_loops(run_case: Callable[[int], float], run_baseline: Callable[[int], float], *, steps: int,
                 repeats: int) -> dict[str, Any]:
  """`repeats` timed loops of a case and of its baseline, alternating (case first in even rounds, the
  baseline first in odd ones), in one process: each round's ratio compares loops a few seconds apart, so a
  machine whose speed drifts between two rows (measured minutes apart) moves it much less. `ratio` is the
  median of the rounds' ratios."""
  case_loops, baseline_loops = [], []
  for r in range(repeats):
    order = [(case_loops, run_case), (baseline_loops, run_baseline)]
    for loops, run in (order if r % 2 == 0 else order[::-1]):
      loops.append(run(steps))
  ratios = [c / b for c, b in zip(case_loops, baseline_loops)]
  return {"ms_per_step_loops": [round(t * 1e3, 3) for t in case_loops],
          "baseline_ms_per_step_loops": [round(t * 1e3, 3) for t in baseline_loops],
          "ratios": [round(r, 4) for r in ratios], "ratio": round(statistics.median(ratios), 3)}


def run_jax(case: Case, settings: Settings) -> dict[str, Any]:
  """Builds the engine step, runs warm-up and the timed loops; the jax half of a row."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kd_jax.train import backend

  counter = CompileCounter()
  # The backend (client, thread pools) starts before the memory baseline: it is not the step's.
  jax.block_until_ready(jnp.ones(8).sum())
  memory = _Memory()
  setup = case.jax()
  runner = _JaxRunner(setup, settings)
  note = setup.check_state(runner.state) if setup.check_state else ""
  trained = int(sum(np.size(x) for x in jax.tree.leaves(runner.state.params)))

  counter.reset()
  first_step_s = runner.run(1)
  first_loss = float(runner.metrics["loss"])
  first_compiles, first_traces = counter.reset()
  if settings.warmup > 1:
    runner.run(settings.warmup - 1)
  pair = case.baseline if settings.paired else None
  # Paired, the memory window is one loop of the case alone and the timed loops are the paired ones.
  memory.start_window()
  loops = [runner.run(settings.steps) for _ in range(1 if pair else settings.repeats)]
  compiles, traces = counter.reset()
  peak, measure = memory.peak(jax.devices()[0])  # before the cost analysis below allocates anything
  flops = runner.flops()
  cost_compiles, _ = counter.reset()
  paired = None
  if pair:  # after every measurement above: the baseline's build is not in them
    baseline = _JaxRunner(CASES[pair](settings.tiny).jax(), settings)
    baseline.run(1)  # compiles
    counter.reset()
    paired = {"baseline": pair, **paired_loops(runner.run, baseline.run, steps=settings.steps,
                                               repeats=settings.repeats),
              "baseline_flops_per_step": baseline.flops()}
    more_compiles, more_traces = counter.reset()
    compiles, traces = compiles + more_compiles, traces + more_traces
    loops = [ms / 1e3 for ms in paired["ms_per_step_loops"]]
  counter.close()
  device = jax.devices()[0]
  nonfinite = int(jax.device_get(runner.state.nonfinite_step))
  timing = _timing(loops, case.images_per_step)
  return {
      **timing,
      # XLA's count for the compiled step (per device program), and what the timed loops achieved.
      "flops_per_step": flops, "gflops_per_s": None if flops is None else round(flops / timing["ms_per_step"] / 1e6, 2),
      "cost_analysis_compiles": cost_compiles,
      "device": (f"cpu: {jax.device_count()} device(s), {os.cpu_count()} cores" if device.platform == "cpu"
                 else f"{device.platform}: {jax.device_count()} x {device.device_kind}"),
      "devices": jax.device_count(), "peak_mib": peak, "memory_measure": measure,
      # A first step that registered no compilation means the listener saw nothing: no count then.
      "compiles": compiles if first_compiles else None, "traces": traces if first_compiles else None,
      "compiles_first_step": first_compiles, "traces_first_step": first_traces,
      "compile_method": f"jax.monitoring duration events {BACKEND_COMPILE_EVENT!r}",
      "first_step_s": round(first_step_s, 3), "first_loss": round(first_loss, 5),
      "nonfinite_step": nonfinite, "trained_params": trained, "note": note, "paired": paired,
      "compiler_options": backend.compiler_options(), "conv_rewrites": dataclasses.asdict(runner.rewrites),
      "versions": {"jax": jax.__version__},
  }


def step_flops(step, *args) -> float | None:
  """FLOPs of one call of the jitted `step` on `args`: XLA's cost analysis of the compiled executable.

  `step.lower(*args).compile()` finds the executable the timed loops ran in jit's cache (no new
  compilation: `cost_analysis_compiles` in the JSON says so). For a step partitioned over several
  devices it is the per-device program's count. None where the backend gives no count.
  """
  try:
    cost = step.lower(*args).compile().cost_analysis()
  except Exception:  # a backend without cost analysis: no figure rather than no row
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


# ----------------------------------------------------------------------------- the real train loop


@dataclasses.dataclass
class LoopSetup:
  """A `Case(kind="loop")`'s run of `kd_jax.train.run`: one row on a random in-memory dataset."""

  row: dict[str, Any]  # kwargs of kd_jax.train.row for the trained row (its teacher is set by the worker)
  dataset: Any  # a kd_jax.data.Dataset
  batch_size: int
  teacher: tuple[str, dict[str, Any]] | None = None  # (model, kwargs): randomly initialised, saved as trained
  checkpoint_every_steps: int = 25  # with logging on (metrics every step)


class _LoopTimer:
  """Wraps the loop's own train step (`train.run(..., wrap_step=timer.wrap)`) to mark the timed window.

  The window runs from call `warmup` (the state before it synchronised) to the end of call
  `warmup + steps` (its outputs synchronised): the only two syncs added to the loop, so every
  metric fetch, metrics.jsonl line and checkpoint save the loop does in between is in the time.
  """

  def __init__(self, counter: CompileCounter):
    self.counter = counter
    self.arm(0, 0)

  def arm(self, warmup: int, steps: int) -> None:
    self.warmup, self.steps, self.calls = warmup, steps, 0
    self.start = self.end = None
    self.compiles = None

  def wrap(self, fn):
    """The loop's compiled train step `fn`, timing calls warmup .. warmup + steps."""
    import jax

    def call(state, *rest):
      if self.calls == self.warmup:
        jax.block_until_ready(state)
        self.counter.reset()
        self.start = time.perf_counter()
      out = fn(state, *rest)
      self.calls += 1
      if self.calls == self.warmup + self.steps:
        jax.block_until_ready(out)
        self.end = time.perf_counter()
        self.compiles = self.counter.reset()[0]
      return out

    return call


LOOP_DATASET = "benchmark_random"  # registered with kd_jax.data by the worker: the dataset of the case it runs
_LOOP_DATA: dict[str, Any] = {}


def run_jax_loop(case: Case, settings: Settings) -> dict[str, Any]:
  """The real `kd_jax.train.run` on `--steps` timed steps, logging and checkpointing on, then off.

  On: metrics fetched and written to metrics.jsonl every step, a checkpoint every
  `checkpoint_every_steps`. Log: the metrics only. Off: both intervals past the run's
  last step. The modes alternate `--repeats` times (back to back, so a change of machine load hits
  both); each is a fresh run (its own compile, excluded from the time). Warm-up:
  `--warmup` steps plus one checkpoint interval, so that the first checkpoint (whose
  orbax helpers compile) is before the window. The runs compile the same programs: all but the first
  read them from a persistent compilation cache in a temporary directory (unless one is configured);
  that is before the window too, and a cache hit still counts as a compilation there.
  """
  import jax
  from kd_jax import data as data_lib

  if not jax.config.jax_compilation_cache_dir:  # before this worker's first compilation
    import atexit
    import shutil
    cache = tempfile.mkdtemp(prefix="kd_jax_benchmark_cache_")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  counter = CompileCounter()
  setup = case.jax()
  dataset = setup.dataset
  every = setup.checkpoint_every_steps
  warmup = settings.warmup + every
  total = warmup + settings.steps
  if dataset.num_train < setup.batch_size * (total + 1):
    raise ValueError(f"the loop dataset has {dataset.num_train} examples, fewer than {total + 1} steps of "
                     f"{setup.batch_size}: an epoch end (test evaluation) would fall in the timed window")
  if LOOP_DATASET not in data_lib.names():
    data_lib.register(LOOP_DATASET, lambda directory: _LOOP_DATA["dataset"])
  _LOOP_DATA["dataset"] = dataset
  timer = _LoopTimer(counter)
  try:
    # (log_every_steps, checkpoint_every_steps) of each mode; "off": both past the run's last step.
    # "log": metrics every step without checkpoints, to tell the two costs apart.
    modes = {"on": (1, every), "log": (1, total + 1), "off": (total + 1, total + 1)}
    loops, compiles, written = _loop_runs(setup, settings, timer, warmup, total, modes)
  finally:
    counter.close()
  on, log, off = (_timing(loops[m], case.images_per_step) for m in ("on", "log", "off"))
  steps_per_s = lambda t: round(1e3 / t["ms_per_step"], 2)
  costs = loop_costs(on["ms_per_step"], log["ms_per_step"], off["ms_per_step"], timed_steps=settings.steps,
                     checkpoint_every=every)
  device = jax.devices()[0]
  return {
      **on,  # the row's ms/step: the loop as it runs by default in a real training, logging on
      "device": (f"cpu: {jax.device_count()} device(s), {os.cpu_count()} cores" if device.platform == "cpu"
                 else f"{device.platform}: {jax.device_count()} x {device.device_kind}"),
      "loop": {"on": {**on, "steps_per_s": steps_per_s(on), "log_every_steps": 1, "checkpoint_every_steps": every,
                      **written["on"]},
               "log": {**log, "steps_per_s": steps_per_s(log), "log_every_steps": 1, "checkpoint_every_steps": None,
                       **written["log"]},
               "off": {**off, "steps_per_s": steps_per_s(off), "log_every_steps": None,
                       "checkpoint_every_steps": None, **written["off"]},
               # steps/s with logging and checkpointing over steps/s without: 1 = no cost, below 1 = a slowdown
               "ratio_on_off": round(steps_per_s(on) / steps_per_s(off), 3),
               "ratio_log_off": round(steps_per_s(log) / steps_per_s(off), 3), **costs,
               "timed_steps": settings.steps, "warmup_steps": warmup, "compiles": compiles},
      # Compilations inside the timed windows of every run (each run compiles its step before them).
      "compiles": None if None in sum(compiles.values(), []) else sum(sum(compiles.values(), [])),
      "note": "", "versions": {"jax": jax.__version__},
  }


def loop_costs(on_ms: float, log_ms: float, off_ms: float, *, timed_steps: int, checkpoint_every: int,
               log_every: int | None = None, defaults_checkpoint_every: int | None = None) -> dict[str, float]:
  """What logging and checkpointing cost the loop, and the steps/s ratio they give at the base config's intervals.

  From the median ms/step of the three modes: a logged step costs `log_ms - off_ms` more than an unlogged
  one (every step is logged in "log" and "on"); a checkpoint costs its share of `on_ms - log_ms` over the
  timed window (`timed_steps // checkpoint_every` checkpoints in it). At the intervals a run uses by default
  (`train.base_config()`: metrics every `log_every_steps`, a checkpoint every `checkpoint_every_steps`),
  steps/s is then off / (off + log cost / log interval + checkpoint cost / checkpoint interval) of an
  unlogged loop's. Noise can make a cost slightly negative; it is reported as measured.
  """
  if log_every is None or defaults_checkpoint_every is None:
    from kd_jax import train
    defaults = train.base_config()
    log_every, defaults_checkpoint_every = defaults.log_every_steps, defaults.checkpoint_every_steps
  checkpoints = max(timed_steps // checkpoint_every, 1)
  per_log = log_ms - off_ms
  per_checkpoint = (on_ms - log_ms) * timed_steps / checkpoints
  at_defaults = off_ms / (off_ms + per_log / log_every + per_checkpoint / defaults_checkpoint_every)
  return {"ms_per_logged_step": round(per_log, 3), "ms_per_checkpoint": round(per_checkpoint, 2),
          "defaults": {"log_every_steps": log_every, "checkpoint_every_steps": defaults_checkpoint_every},
          "ratio_at_defaults": round(at_defaults, 4)}


def _loop_runs(setup: LoopSetup, settings: Settings, timer: _LoopTimer, warmup: int, total: int,
               modes: dict[str, tuple[int, int]]):
  """The alternating on/off runs of `run_jax_loop`: per mode the loop times, the compilations in the
  window, and what the last run wrote (train lines in metrics.jsonl, checkpoint steps kept)."""
  import jax
  from kd_jax import models as models_lib
  from kd_jax import train
  from kd_jax.train import checkpoint as checkpoint_lib

  dataset = setup.dataset
  with tempfile.TemporaryDirectory() as tmp:
    teacher_dir = ""
    if setup.teacher is not None:
      import jax.numpy as jnp
      name, kwargs = setup.teacher
      module = models_lib.create(name, num_classes=dataset.num_classes, **kwargs)
      variables = jax.jit(lambda r: module.init(r, jnp.zeros((1,) + dataset.input_shape), train=False))(
          jax.random.PRNGKey(1))
      teacher_dir = os.path.join(tmp, "teacher")
      checkpoint_lib.save_model(teacher_dir, jax.device_get(variables), {
          "model": name, "model_kwargs": kwargs, "num_classes": dataset.num_classes,
          "input_shape": list(dataset.input_shape), "dataset": LOOP_DATASET})
    loops: dict[str, list[float]] = {m: [] for m in modes}
    compiles: dict[str, list[int | None]] = {m: [] for m in modes}
    written: dict[str, dict[str, Any]] = {}
    for r in range(settings.repeats):
      for mode, (log_every, ckpt_every) in modes.items():
        config = train.base_config()
        config.seed = settings.seed
        config.data.name, config.data.batch_size = LOOP_DATASET, setup.batch_size
        config.data.eval_batch_size = setup.batch_size
        config.epochs, config.max_steps = 1, total
        config.log_every_steps, config.checkpoint_every_steps = log_every, ckpt_every
        config.progress = False
        config.rows.bench = train.row(**setup.row, teacher=teacher_dir)
        timer.arm(warmup, settings.steps)
        workdir = os.path.join(tmp, f"{mode}_{r}")
        train.run(config, workdir, wrap_step=timer.wrap)
        if timer.end is None:
          raise RuntimeError(f"the train loop ran {timer.calls} steps, fewer than the {total} asked")
        loops[mode].append((timer.end - timer.start) / settings.steps)
        compiles[mode].append(timer.compiles)
        metrics_path = os.path.join(workdir, "bench", "metrics.jsonl")  # absent if nothing was logged
        lines = 0
        if os.path.exists(metrics_path):
          with open(metrics_path) as f:
            lines = sum(json.loads(line)["split"] == "train" for line in f if line.strip())
        kept = sorted(int(n) for n in os.listdir(os.path.join(workdir, "bench", "checkpoints")) if n.isdigit())
        written[mode] = {"metrics_lines": lines, "checkpoint_steps_kept": kept}
  return loops, compiles, written


# ----------------------------------------------------------------------------- the torch side


def run_torch(case: Case, settings: Settings) -> dict[str, Any]:
  """Builds the PyTorch reference step, runs warm-up and the timed loops; the torch half of a row."""
  try:
    import torch
  except ImportError:
    raise Skipped("skipped: torch not installed") from None
  sys.path.insert(0, str(REPO))
  from third_party import torch_reference

  torch.manual_seed(settings.seed)
  device = torch_reference.setup()
  torch.ones(8, device=device).sum().item()  # start the runtime before the memory baseline
  memory = _Memory()

  def build(case: Case):
    ref = case.torch()
    return _autocast(ref, device, getattr(torch, settings.dtype)) if settings.dtype != "float32" else ref

  last = {}  # the loss tensor of the last step run

  def timed(ref, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      last["loss"] = ref.step()
    ref.sync()  # the only sync of the loop (a no-op on CPU, where every op is synchronous)
    return (time.perf_counter() - start) / steps

  ref = build(case)
  start = time.perf_counter()
  first_loss = float(ref.step())  # .item() syncs
  first_step_s = time.perf_counter() - start
  if settings.warmup > 1:
    timed(ref, settings.warmup - 1)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  pair = case.baseline if settings.paired else None
  memory.start_window()
  loops = [timed(ref, settings.steps) for _ in range(1 if pair else settings.repeats)]
  finite = bool(torch.isfinite(last["loss"]).item())
  if device.type == "cuda":
    peak, measure = torch.cuda.max_memory_allocated(device) / MIB, "torch.cuda.max_memory_allocated"
  else:
    peak, measure = memory.peak(None)
  name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
  paired = None
  if pair:  # after the memory window: the baseline's model is not in it
    baseline = build(CASES[pair](settings.tiny))
    timed(baseline, 1)
    paired = {"baseline": pair, **paired_loops(lambda n: timed(ref, n), lambda n: timed(baseline, n),
                                               steps=settings.steps, repeats=settings.repeats)}
    loops = [ms / 1e3 for ms in paired["ms_per_step_loops"]]
  return {
      **_timing(loops, case.images_per_step),
      "device": f"{device.type}: {name}" + (", channels_last" if ref.channels_last else ""),
      "peak_mib": round(peak, 1), "memory_measure": measure,
      "first_step_s": round(first_step_s, 3), "first_loss": round(first_loss, 5), "finite": finite,
      "trained_params": ref.trained_params, "paired": paired, "versions": {"torch": torch.__version__},
      "loss_source": torch_reference.loss_source(),
  }


# ----------------------------------------------------------------------------- measurements


def _timing(loops: list[float], images_per_step: int) -> dict[str, Any]:
  ms = statistics.median(loops) * 1e3
  return {"ms_per_step": round(ms, 3), "ms_per_step_min": round(min(loops) * 1e3, 3),
          "ms_per_step_loops": [round(t * 1e3, 3) for t in loops], "images_per_s": round(images_per_step / ms * 1e3, 1)}


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


class _Memory:
  """Host memory of this process: RSS high-water mark over the timed loops minus the RSS before building.

  On Linux writing 5 to /proc/self/clear_refs resets the high-water mark, so
  compilation's transient memory (before the window) is not counted, while
  everything the step keeps (parameters, optimizer state, the batch, compiled
  code) and its transient activations are. Elsewhere: ru_maxrss since start
  (which then includes compilation).
  """

  def __init__(self):
    self.base_kib = _status_kib("VmRSS")
    self.windowed = False

  def start_window(self) -> None:
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.windowed = True
    except OSError:
      self.windowed = False

  def peak(self, device) -> tuple[float, str]:
    stats = device.memory_stats() if device is not None and device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
      return round(stats["peak_bytes_in_use"] / MIB, 1), "device peak_bytes_in_use"
    if self.windowed and self.base_kib is not None:
      return round((_status_kib("VmHWM") - self.base_kib) / 1024, 1), "host RSS high-water delta"
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round((maxrss_kib - (self.base_kib or 0)) / 1024, 1), "host ru_maxrss delta (incl. compile)"


# ----------------------------------------------------------------------------- cases


def _torch_models(*names_kwargs: tuple[str, dict[str, Any]], num_classes: int, in_features: int = 784):
  from third_party import torch_reference
  return [torch_reference.create(n, num_classes=num_classes, in_features=in_features, **kw) for n, kw in names_kwargs]


@register("hinton_mlp")
def hinton_mlp(tiny: bool) -> Case:
  """Hinton et al. 2015 on MNIST: 784-1200-1200-10 teacher -> 784-800-800-10 student, CE + KD at T=20."""
  b = 16 if tiny else 128
  shape, classes = (28, 28, 1), 10
  teacher = ("mlp", {"widths": (64, 64), "dropout": 0.5, "input_dropout": 0.2}) if tiny else ("mlp_1200", {})
  student = ("mlp", {"widths": (32, 32)}) if tiny else ("mlp_800", {})
  ce, kd, temperature = 0.1, 0.9, 20.0
  sgd = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}
  num_train = 60000
  batch = lambda: random_batch(streams=1, batch=b, input_shape=shape, num_classes=classes, num_train=num_train)

  def build_jax():
    require(models=[teacher[0], student[0]], terms=["ce", "kd"], losses=["cross_entropy", "kd_loss"])
    return jax_setup(student=student[0], student_kwargs=student[1], teacher=teacher[0], teacher_kwargs=teacher[1],
                     num_classes=classes,
                     terms={"ce": {"weight": ce}, "kd": {"weight": kd, "temperature": temperature}},
                     optimizer=sgd, normalize=MNIST, batch=batch(), input_shape=shape, num_train=num_train)

  def build_torch():
    from third_party import torch_reference as tr
    s, t = _torch_models(student, teacher, num_classes=classes)
    kd_fn = tr.make_kd_loss(ce_weight=ce, kd_weight=kd, temperature=temperature)
    data = batch()
    return tr.offline_step(student=s, teacher=t, images=data["image"][0], labels=data["label"][0],
                           index=data["index"][0], optimizer=sgd, normalize=MNIST, channels_last=False,
                           loss_fn=lambda so, to, y, i, extra: kd_fn(so[0], to[0], y))

  return Case(f"{teacher[0]} -> {student[0]}, 0.1 CE + 0.9 KD (T=20), SGD 0.1 m0.9", b, b, build_jax, build_torch,
              steps=50)


def _offline(tiny: bool, *, teacher: str, student: str, tiny_models: tuple[str, str], terms: dict[str, Any],
             torch_loss: Callable[[], Callable], needs: dict[str, Any], description: str,
             check_state=None, num_train: int = 50000, steps: int = 1, batch: int = 64,
             shape: tuple[int, ...] = (32, 32, 3), classes: int = 100, normalize: dict[str, Any] = CIFAR100,
             optimizer: dict[str, Any] = CRD_SGD, default: bool = True) -> Case:
  """A teacher -> student case on random images: by default CIFAR-100's, with the CRD recipe's SGD, B = 64;
  16 examples of the tiny models at 32×32 when tiny."""
  b = 16 if tiny else batch
  shape = (32, 32, 3) if tiny else shape
  teacher, student = tiny_models if tiny else (teacher, student)
  data = lambda: random_batch(streams=1, batch=b, input_shape=shape, num_classes=classes, num_train=num_train)

  def build_jax():
    require(models=[teacher, student], **needs)
    return jax_setup(student=student, teacher=teacher, num_classes=classes, terms=terms, optimizer=optimizer,
                     normalize=normalize, batch=data(), input_shape=shape, num_train=num_train,
                     check_state=check_state)

  def build_torch():
    from third_party import torch_reference as tr
    s, t = _torch_models((student, {}), (teacher, {}), num_classes=classes)
    loss_fn, extra = torch_loss()
    d = data()
    return tr.offline_step(student=s, teacher=t, images=d["image"][0], labels=d["label"][0],
                           index=d["index"][0], optimizer=optimizer, normalize=normalize, channels_last=True,
                           loss_fn=loss_fn, extra=extra)

  return Case(f"{teacher} -> {student}, {description}", b, b, build_jax, build_torch, steps=steps,
              default=default)


def _kd_loss(ce: float, kd: float, temperature: float):
  """The torch side's loss of a CE + KD case (torchdistill's KDLoss where installed)."""

  def torch_loss():
    from third_party import torch_reference as tr
    kd_fn = tr.make_kd_loss(ce_weight=ce, kd_weight=kd, temperature=temperature)
    return (lambda so, to, y, i, extra: kd_fn(so[0], to[0], y)), None

  return torch_loss


@register("resnet32x4_resnet8x4_kd")
def resnet32x4_resnet8x4_kd(tiny: bool) -> Case:
  """CRD's CIFAR-100 KD row: 0.1 CE + 0.9 KD at T=4; student BN in train mode, teacher in eval mode."""
  return _offline(tiny, teacher="resnet32x4", student="resnet8x4", tiny_models=("resnet8", "resnet8"),
                  terms={"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}},
                  torch_loss=_kd_loss(0.1, 0.9, 4.0),
                  needs={"terms": ["ce", "kd"], "losses": ["cross_entropy", "kd_loss"]},
                  description="0.1 CE + 0.9 KD (T=4), SGD 0.05 m0.9 wd5e-4")


@register("resnet34_resnet18_kd_224")
def resnet34_resnet18_kd_224(tiny: bool) -> Case:
  """ImageNet-sized KD, the accelerator case (images/s and MFU): torchvision's resnet34 -> resnet18 at
  224×224, 1,000 classes, B = 256, 0.5 CE + 0.5 KD at T=1, the ImageNet SGD recipe. Not in the default run
  (4.3 TFLOP a step by XLA's count: 40 s on 2 CPU cores); run it with --dtype=bfloat16 on a GPU or TPU."""
  return _offline(tiny, teacher="resnet34", student="resnet18", tiny_models=("resnet18", "resnet18"),
                  terms={"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 1.0}},
                  torch_loss=_kd_loss(0.5, 0.5, 1.0),
                  needs={"terms": ["ce", "kd"], "losses": ["cross_entropy", "kd_loss"]},
                  description="0.5 CE + 0.5 KD (T=1), SGD 0.1 m0.9 wd1e-4, 224×224, 1,000 classes",
                  num_train=1281167, steps=10, batch=256, shape=(224, 224, 3), classes=1000,
                  normalize=IMAGENET, optimizer=IMAGENET_SGD, default=False)


@register("wrn_40_2_wrn_16_2_at")
def wrn_40_2_wrn_16_2_at(tiny: bool) -> Case:
  """CRD's CIFAR-100 AT row: CE + 1000 x attention transfer on the three stage outputs (p=2)."""

  def torch_loss():
    from third_party import torch_reference as tr
    at_fn = tr.make_at_loss(3)
    return (lambda so, to, y, i, extra: tr.F.cross_entropy(so[0], y) + 1000.0 * at_fn(so[1][1:4], to[1][1:4])), None

  return _offline(tiny, teacher="wrn_40_2", student="wrn_16_2", tiny_models=("wrn_16_1", "wrn_16_1"),
                  terms={"ce": {"weight": 1.0}, "at": {"weight": 1000.0}}, torch_loss=torch_loss,
                  needs={"terms": ["ce", "at"], "losses": ["cross_entropy", "attention_transfer_loss"]},
                  description="CE + 1000 AT (stages 1-3, p=2), SGD 0.05 m0.9 wd5e-4")


# CRD's memory: one 128-d embedding per CIFAR training image and view, 16384 negatives per example.
CRD_BANK = {"num_data": 50000, "dim": 128, "num_negatives": 16384, "temperature": 0.07, "momentum": 0.5}
CRD_BANK_TINY = {"num_data": 1000, "dim": 16, "num_negatives": 64, "temperature": 0.07, "momentum": 0.5}


def _crd_bank_note(bank: dict[str, Any]):
  """Checks that the crd term's state holds the intended bank; its shape is the row's note."""

  def check(state) -> str:
    import jax
    shapes = [tuple(x.shape) for x in jax.tree.leaves(state.method_state)]
    want = (bank["num_data"], bank["dim"])
    if any(s[-2:] == want for s in shapes):
      return f"bank {want[0]}x{want[1]}"
    return f"bank {want[0]}x{want[1]} not found in the crd state (leaves {shapes})"

  return check


@register("resnet32x4_resnet8x4_crd")
def resnet32x4_resnet8x4_crd(tiny: bool) -> Case:
  """CRD's CIFAR-100 CRD row: CE + 0.8 CRD, memory bank 50,000 x 128 per view, 16384 negatives."""
  bank = CRD_BANK_TINY if tiny else CRD_BANK
  options = {k: bank[k] for k in ("dim", "num_negatives", "temperature", "momentum")}

  def torch_loss():
    from third_party import torch_reference as tr
    width = 64 if tiny else 256  # pre_logits of resnet8 / of resnet8x4 and resnet32x4
    head = tr.CRDHead(width, width, feat_dim=bank["dim"], num_data=bank["num_data"],
                      num_negatives=bank["num_negatives"], temperature=bank["temperature"], momentum=bank["momentum"])
    return (lambda so, to, y, i, extra: tr.F.cross_entropy(so[0], y) + 0.8 * extra(so[1][-1], to[1][-1], i)), head

  return _offline(tiny, teacher="resnet32x4", student="resnet8x4", tiny_models=("resnet8", "resnet8"),
                  terms={"ce": {"weight": 1.0}, "crd": {"weight": 0.8, **options}}, torch_loss=torch_loss,
                  needs={"terms": ["ce", "crd"], "losses": ["cross_entropy", "crd_loss"]},
                  description=f"CE + 0.8 CRD (bank {bank['num_data']}x{bank['dim']}, "
                              f"{bank['num_negatives']} negatives), SGD 0.05 m0.9 wd5e-4",
                  check_state=_crd_bank_note(bank), num_train=bank["num_data"])


def _cifar_peers(tiny: bool, *, model: str, terms: dict[str, Any], exchange: str, torch_mode: str, streams: int,
                 description: str, needs: dict[str, Any], peers: int = 2, exchange_every: int = 1,
                 steps: int = 1, baseline: str | None = None, default: bool = True) -> Case:
  """`peers` copies of `model` trained in one step: the engine's vmapped peer axis; in PyTorch, a loop over
  the peers and one SGD over all of them. CIFAR-100, B = 64 per peer (16 when tiny), the CRD recipe's SGD.

  One step per timed loop by default: peers sharing a device run as unrolled copies of the single-model
  step (engine.map_peers), about twice one resnet32 step (1.5-2 s on 2 CPU cores).
  """
  b, shape, classes = (16 if tiny else 64), (32, 32, 3), 100
  model = "resnet8" if tiny else model
  num_train = 50000
  batch = lambda: random_batch(streams=streams, batch=b, input_shape=shape, num_classes=classes, num_train=num_train)

  def build_jax():
    require(models=[model], exchange=exchange, **needs)
    return jax_setup(student=model, num_classes=classes, terms=terms, optimizer=CRD_SGD, normalize=CIFAR100,
                     batch=batch(), input_shape=shape, peers=peers, exchange=exchange, exchange_every=exchange_every,
                     num_train=num_train)

  def build_torch():
    from third_party import torch_reference as tr
    data = batch()
    return tr.peers_step(peers=_torch_models(*[(model, {})] * peers, num_classes=classes), images=data["image"],
                         labels=data["label"], mode=torch_mode, optimizer=CRD_SGD, normalize=CIFAR100,
                         channels_last=True, temperature=1.0, exchange_every=exchange_every)

  return Case(f"{peers} x {model}, {description}", b, peers * b, build_jax, build_torch, steps=steps,
              baseline=baseline, default=default)


@register("dml_resnet32_x2")
def dml_resnet32_x2(tiny: bool) -> Case:
  """Deep mutual learning (Zhang et al. 2018): 2 peers, CE + KL to the other's predictions (T=1), one batch."""
  return _cifar_peers(tiny, model="resnet32", terms={"ce": {"weight": 1.0}, "dml": {"weight": 1.0}},
                      exchange="predictions", torch_mode="dml", streams=1,
                      description="DML: CE + KL(other peer, T=1), shared batch", baseline=INDEPENDENT,
                      needs={"terms": ["ce", "dml"], "losses": ["cross_entropy", "kd_loss"]})


CODISTILL_EVERY = 10  # steps between refreshes of the stale peer copies
INDEPENDENT = "independent_resnet32_x2"  # what the online cases cost against: 2 runs, nothing exchanged


@register("codistill_resnet32_x2")
def codistill_resnet32_x2(tiny: bool) -> Case:
  """Co-distillation (Anil et al. 2018): 2 replicas, each on its own batch, CE + KL to the other's stale copy."""
  return _cifar_peers(tiny, model="resnet32", terms={"ce": {"weight": 1.0}, "codistill": {"weight": 1.0}},
                      exchange="stale", exchange_every=CODISTILL_EVERY, torch_mode="codistill_stale", streams=2,
                      description=f"co-distillation: CE + KL(stale peer copy, refreshed every {CODISTILL_EVERY} "
                                  "steps), own batch per replica", baseline=INDEPENDENT,
                      needs={"terms": ["ce", "codistill"], "losses": ["cross_entropy"]})


@register("codistill_predictions_resnet32_x2")
def codistill_predictions_resnet32_x2(tiny: bool) -> Case:
  """Co-distillation exchanging current predictions every step: CE + KL(mean of the other's p), one shared batch.

  Unlike stale mode (an extra inference forward of each peer's stale copy per step), the targets
  are the peers' own training-forward logits: the same FLOPs as 2 independent runs but for the loss.
  """
  return _cifar_peers(tiny, model="resnet32", terms={"ce": {"weight": 1.0}, "codistill": {"weight": 1.0}},
                      exchange="predictions", torch_mode="codistill_predictions", streams=1,
                      description="co-distillation: CE + KL(other's current predictions, T=1), shared batch",
                      baseline=INDEPENDENT, needs={"terms": ["ce", "codistill"], "losses": ["cross_entropy"]})


@register("independent_resnet32_x2")
def independent_resnet32_x2(tiny: bool) -> Case:
  """Co-distillation's baseline, 2 independent runs: 2 peers of CE alone in one step, nothing exchanged."""
  return _cifar_peers(tiny, model="resnet32", terms={"ce": {"weight": 1.0}}, exchange="none",
                      torch_mode="independent", streams=1, description="2 independent runs in one step: CE only",
                      needs={"terms": ["ce"], "losses": ["cross_entropy"]}, default=False)


@register("single_resnet32")
def single_resnet32(tiny: bool) -> Case:
  """One run of CE alone (peers = 1): twice its time is 2 separate runs, the peer axis' cost is the rest."""
  return _cifar_peers(tiny, model="resnet32", terms={"ce": {"weight": 1.0}}, exchange="none", peers=1,
                      torch_mode="independent", streams=1, description="one run: CE only", steps=2, default=False,
                      needs={"terms": ["ce"], "losses": ["cross_entropy"]})


@register("loop_hinton_mlp")
def loop_hinton_mlp(tiny: bool) -> Case:
  """`hinton_mlp`'s student trained by the real train loop (`kd_jax.train.run`), metrics and checkpoints on vs off.

  The fastest step of the suite (about 10 ms on CPU), so the loop's per-step work (fetching and
  writing the metrics, the input pipeline) and its checkpoints weigh the most here. Random MNIST-shaped
  images, enough that no epoch ends (no test evaluation) inside the timed window.
  """
  b = 16 if tiny else 128
  every = 2 if tiny else 25
  teacher = ("mlp", {"widths": (64, 64), "dropout": 0.5, "input_dropout": 0.2}) if tiny else ("mlp_1200", {})
  student = ("mlp", {"widths": (32, 32)}) if tiny else ("mlp_800", {})
  steps = 100

  def build_jax():
    require(models=[teacher[0], student[0]], terms=["ce", "kd"], losses=["cross_entropy", "kd_loss"])
    import numpy as np
    from kd_jax import data as data_lib
    # Room for the default run (2 + 25 warm-up + 200 timed steps) and a --steps of up to 4 times as many.
    n = b * (4 * steps + 2 * every + 16)
    rng = np.random.default_rng(0)
    images = lambda m: rng.integers(0, 256, (m, 28, 28, 1), dtype=np.uint8)
    dataset = data_lib.Dataset(LOOP_DATASET, images(n), rng.integers(0, 10, n, dtype=np.int32), images(b),
                               rng.integers(0, 10, b, dtype=np.int32), num_classes=10, scale=1.0 / 255.0)
    row = {"model": student[0], "model_kwargs": dict(student[1]),
           "terms": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 20.0}},
           "optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}}
    return LoopSetup(row=row, dataset=dataset, batch_size=b, teacher=(teacher[0], dict(teacher[1])),
                     checkpoint_every_steps=every)

  return Case(f"train loop of {teacher[0]} -> {student[0]} KD: metrics every step + checkpoint every {every} "
              "steps vs metrics only vs neither", b, b, build_jax, lambda: None, steps=steps, kind="loop")


# ----------------------------------------------------------------------------- orchestration


def _autocast(ref, device, dtype):
  """`ref` with its step run under torch.autocast (mixed precision: bf16 convolutions and matmuls)."""
  import torch

  def step():
    with torch.autocast(device_type=device.type, dtype=dtype):
      return ref.step()

  return dataclasses.replace(ref, step=step)


def _worker(side: str, name: str, settings: Settings) -> dict[str, Any]:
  """One side of one case, in this process; never raises (a failure is the row's status)."""
  try:
    case = CASES[name](settings.tiny)
    settings = dataclasses.replace(settings, steps=settings.steps or case.steps)
    if case.kind == "loop":
      if side != "jax":
        raise Skipped("skipped: the train-loop case is kd_jax only")
      result = run_jax_loop(case, settings)
    else:
      result = (run_jax if side == "jax" else run_torch)(case, settings)
    return {"status": "ok", **result}
  except Skipped as e:
    return {"status": "skipped", "reason": str(e)}
  except Exception as e:  # reported in the row; the other cases still run
    import traceback
    return {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


@contextlib.contextmanager
def _shared_compilation_cache():
  """One persistent XLA compilation cache for the run's jax workers (a temporary directory, unless
  JAX_COMPILATION_CACHE_DIR is set): a program several workers build (the online cases' baseline, the
  loop case's runs) compiles once. Only compilation time changes: `first_step_s` includes compiling or
  reading from the cache, and a cache hit still counts in `compiles`."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    yield
    return
  with tempfile.TemporaryDirectory(prefix="kd_jax_benchmark_cache_") as cache:
    added = {key: value for key, value in (("JAX_COMPILATION_CACHE_DIR", cache),
                                           ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                                           ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0"))
             if key not in os.environ}
    os.environ.update(added)
    try:
      yield
    finally:
      for key in added:
        del os.environ[key]


def _spawn(side: str, name: str, settings: Settings, timeout: float) -> dict[str, Any]:
  """Runs `_worker` in a fresh interpreter (its own peak memory, no state shared with the other side)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, "-m", "experiments.benchmark", "--worker", side, "--cases", name,
           "--steps", str(settings.steps), "--warmup", str(settings.warmup), "--repeats", str(settings.repeats),
           "--seed", str(settings.seed), "--dtype", settings.dtype, "--conv-rewrites", settings.conv_rewrites,
           "--result", out,
           "--paired" if settings.paired else "--no-paired"] + (["--tiny"] if settings.tiny else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
      proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    if proc.returncode or not os.path.exists(out):
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
      return {"status": "error", "reason": f"worker exited with {proc.returncode}: " + " | ".join(tail)}
    with open(out) as f:
      return json.load(f)


def run_case(name: str, settings: Settings, *, sides: Sequence[str] = ("jax", "torch"), isolate: bool = True,
             timeout: float = 1800.0) -> dict[str, Any]:
  """One row: both sides (each in a subprocess unless `isolate` is False), ratio, status."""
  case = CASES[name](settings.tiny)
  settings = dataclasses.replace(settings, steps=settings.steps or case.steps)
  row: dict[str, Any] = {"case": name, "description": case.description, "batch": case.batch,
                         "images_per_step": case.images_per_step, "steps": settings.steps,
                         "repeats": settings.repeats, "warmup": settings.warmup, "kind": case.kind,
                         "dtype": settings.dtype}
  if case.baseline:
    row["baseline"] = case.baseline
  if case.kind == "loop":  # kd_jax's loop against itself: no torch half
    sides = [s for s in sides if s == "jax"]
    if not sides:
      return {**row, "status": "skipped", "reason": "skipped: the train-loop case is kd_jax only"}
  if isolate:
    run = lambda side: _spawn(side, name, settings, timeout)
  else:
    run = lambda side: _worker(side, name, settings)
  for side in sides:
    result = run(side)
    row[side] = result
    if side == "jax" and result["status"] == "skipped":
      break  # the torch half alone would not make a comparison
  statuses = {side: row[side]["status"] for side in sides if side in row}
  bad = [s for s in sides if s in row and statuses[s] != "ok"]
  row["status"] = "ok" if not bad else row[bad[0]]["status"]
  row["reason"] = "; ".join(f"{s}: {row[s]['reason']}" if row[s]["status"] == "error" else row[s]["reason"]
                            for s in bad)
  if statuses.get("jax") == "ok" and "loop" in row["jax"]:
    loop = row["jax"]["loop"]
    row["loop_ratio_on_off"] = loop["ratio_on_off"]
    row["reason"] = (f"train loop: {loop['on']['steps_per_s']:,.1f} steps/s with metrics every step + a checkpoint "
                     f"every {loop['on']['checkpoint_every_steps']}, {loop['log']['steps_per_s']:,.1f} with the metrics "
                     f"only, {loop['off']['steps_per_s']:,.1f} with neither: ratio on/off {loop['ratio_on_off']:.2f}, "
                     f"metrics only/off {loop['ratio_log_off']:.2f}; a checkpoint costs "
                     f"{loop['ms_per_checkpoint']:,.0f} ms, a logged step {loop['ms_per_logged_step']:.2f} ms: at the "
                     f"default intervals (metrics every {loop['defaults']['log_every_steps']}, a checkpoint every "
                     f"{loop['defaults']['checkpoint_every_steps']} steps) ratio {loop['ratio_at_defaults']:.3f}")
  if statuses.get("jax") == "ok" and statuses.get("torch") == "ok":
    row["ratio"] = round(row["jax"]["ms_per_step"] / row["torch"]["ms_per_step"], 3)
    if row["jax"]["trained_params"] != row["torch"]["trained_params"]:
      row["reason"] = (f"trained parameters differ: jax {row['jax']['trained_params']}, "
                       f"torch {row['torch']['trained_params']}")
  return row


def compare_baselines(rows: Sequence[dict[str, Any]]) -> None:
  """Adds "vs_baseline" to each row whose case names a baseline: its jax ms/step, its compiled step's FLOPs
  and its torch ms/step, each divided by the baseline's. Times come from the paired loops measured in the
  row's own workers where there are some ("method": "paired"), else from the baseline's row in the same
  table ("rows"); FLOPs from the paired worker or the baseline's row."""
  by_name = {row["case"]: row for row in rows}
  for row in rows:
    if not row.get("baseline"):
      continue
    base = by_name.get(row["baseline"], {})
    ok = lambda r, side: r.get(side, {}).get("status") == "ok"

    def ratio(side, key):
      if not ok(row, side):
        return None
      paired = row[side].get("paired")
      if paired and key == "ms_per_step":
        return paired["ratio"]
      if paired and key == "flops_per_step" and paired.get("baseline_flops_per_step") and row[side].get(key):
        return round(row[side][key] / paired["baseline_flops_per_step"], 3)
      if ok(base, side) and row[side].get(key) and base[side].get(key):
        return round(row[side][key] / base[side][key], 3)
      return None

    vs = {"case": row["baseline"], "jax_time": ratio("jax", "ms_per_step"),
          "jax_flops": ratio("jax", "flops_per_step"), "torch_time": ratio("torch", "ms_per_step"),
          "method": "paired" if any(ok(row, s) and row[s].get("paired") for s in ("jax", "torch")) else "rows"}
    if vs["method"] == "rows" and not base:
      continue  # neither paired loops nor the baseline's row: nothing to compare with
    row["vs_baseline"] = vs


def add_mfu(rows: Sequence[dict[str, Any]], dtype: str, peak_tflops: float | None = None) -> None:
  """Adds "mfu" to each row whose jax side has a FLOP count and whose chip's peak is known (`peak_flops`, or
  `peak_tflops` given): model FLOP utilisation, XLA's FLOPs of the step per device / (seconds per step × the
  chip's peak for `dtype`). The PyTorch step does the same model FLOPs, on one device."""
  for row in rows:
    jx, th = row.get("jax", {}), row.get("torch", {})
    if jx.get("status") != "ok" or not jx.get("flops_per_step"):
      continue
    flops = jx["flops_per_step"]
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(jx["device"], dtype)
    if not peak:
      continue
    mfu = {"peak_flops": peak, "peak_source": "--peak-tflops" if peak_tflops else "PEAK_FLOPS",
           "jax": round(flops / (jx["ms_per_step"] / 1e3) / peak, 4), "torch": None}
    if th.get("status") == "ok":
      mfu["torch"] = round(flops * jx.get("devices", 1) / (th["ms_per_step"] / 1e3) / peak, 4)
    row["mfu"] = mfu


def _fmt(value, digits: int = 1) -> str:
  return "—" if value is None else f"{value:,.{digits}f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
  """The markdown table of a run."""
  head = ("| case | batch | device (jax / torch) | jax ms/step | torch ms/step | ratio jax/torch | jax img/s "
          "| torch img/s | jax GFLOP/step | vs baseline: jax time / jax FLOPs / torch time | MFU jax / torch "
          "| jax peak MiB | torch peak MiB | compiles | note |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for row in rows:
    jx, th = row.get("jax", {}), row.get("torch", {})
    ok_j, ok_t = jx.get("status") == "ok", th.get("status") == "ok"
    devices = " / ".join(d for d in (jx.get("device"), th.get("device")) if d) or "—"
    if row.get("dtype", "float32") != "float32":
      devices += f" ({row['dtype']} compute)"
    mem = lambda side, ok: (f"{_fmt(side['peak_mib'])} ({_short_measure(side['memory_measure'])})"
                            if ok and side.get("peak_mib") is not None else "—")
    lines.append("| " + " | ".join([
        row["case"], str(row["batch"]), devices,
        _fmt(jx.get("ms_per_step")) if ok_j else "—", _fmt(th.get("ms_per_step")) if ok_t else "—",
        _fmt(row.get("ratio"), 2), _fmt(jx.get("images_per_s"), 0) if ok_j else "—",
        _fmt(th.get("images_per_s"), 0) if ok_t else "—",
        _fmt(jx["flops_per_step"] / 1e9, 2) if ok_j and jx.get("flops_per_step") else "—", _vs(row),
        _mfu(row.get("mfu")), mem(jx, ok_j), mem(th, ok_t),
        str(jx.get("compiles")) if ok_j else "—", row.get("reason") or "",
    ]) + " |")
  return "\n".join(lines)


def _vs(row: dict[str, Any]) -> str:
  vs = row.get("vs_baseline")
  if not vs:
    return "—"
  how = ", paired" if vs.get("method") == "paired" else ""
  return " / ".join(_fmt(vs[k], 2) for k in ("jax_time", "jax_flops", "torch_time")) + f" ({vs['case']}{how})"


def _mfu(mfu: dict[str, Any] | None) -> str:
  if not mfu:
    return "—"
  return " / ".join("—" if mfu[side] is None else f"{mfu[side]:.1%}" for side in ("jax", "torch"))


def _short_measure(measure: str) -> str:
  return {"host RSS high-water delta": "RSS", "device peak_bytes_in_use": "device",
          "torch.cuda.max_memory_allocated": "cuda"}.get(measure, measure)


def _meta(settings: Settings, sides: Sequence[str]) -> dict[str, Any]:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "host": platform.node(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
          "python": platform.python_version(), "commit": commit.strip(), "load_average_start": os.getloadavg(),
          "settings": dataclasses.asdict(settings), "sides": list(sides),
          # Threading settings change CPU timings a lot (see BENCHMARKS.md).
          "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")
                  if k in os.environ}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--cases", default="default", help="comma-separated case names, 'default' (the cases marked "
                 "so in --list) or 'all' (see --list)")
  p.add_argument("--steps", type=int, default=None, help="steps per timed loop (default: each case's own, "
                 "see --list)")
  p.add_argument("--warmup", type=int, default=Settings.warmup, help="untimed steps first (the first compiles)")
  p.add_argument("--repeats", type=int, default=Settings.repeats, help="timed loops; ms/step is their median")
  p.add_argument("--json", default="benchmark.json", help="where to write the results")
  p.add_argument("--tiny", action="store_true", help="small models and batch 16: checks the harness quickly")
  p.add_argument("--sides", default="jax,torch", help="which sides to run: jax,torch | jax | torch")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="bfloat16: mixed precision on both sides (kd_jax compute_dtype, torch.autocast)")
  p.add_argument("--conv-rewrites", default=Settings.conv_rewrites,
                 help="kd_jax's convolution rewrites in the step cases: 'default' (all on for CPU, off elsewhere), "
                      "'none', or a comma list of " + ", ".join(CONV_REWRITES) + " (an A/B of them)")
  p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=Settings.paired,
                 help="time a case with a baseline (the online cases) against its baseline in the same worker, "
                      "alternating loops (--no-paired: compare with the baseline's row only)")
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per side of a case")
  p.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak TFLOP/s for the MFU column "
                 "(default: benchmark.PEAK_FLOPS by the jax device's kind and --dtype; CPUs have none)")
  p.add_argument("--inprocess", action="store_true", help="run both sides in this process (debugging; "
                 "peak memory then mixes both frameworks)")
  p.add_argument("--list", action="store_true", help="print the cases and exit")
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if (args.steps is not None and args.steps < 1) or args.warmup < 1 or args.repeats < 1:
    p.error("--steps, --warmup and --repeats must be >= 1 (the first warm-up step compiles)")
  if args.peak_tflops is not None and args.peak_tflops <= 0:
    p.error(f"--peak-tflops must be > 0 (the chip's peak TFLOP/s), got {args.peak_tflops}")
  if args.conv_rewrites != "default":
    try:
      _conv_rewrite_names(args.conv_rewrites)
    except ValueError as e:
      p.error(str(e))
  return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  if args.list:
    for name, fn in CASES.items():
      case = fn(args.tiny)
      print(f"{name:34s} B={case.batch:<4d} steps={case.steps:<3d} {'default' if case.default else '-------'} "
            f"{case.description}")
    return []
  if args.cases in ("default", "all"):
    names = [n for n, fn in CASES.items() if args.cases == "all" or fn(args.tiny).default]
  else:
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = [n for n in names if n not in CASES]
  if unknown:
    raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
  settings = Settings(steps=args.steps, warmup=args.warmup, repeats=args.repeats, tiny=args.tiny, seed=args.seed,
                      dtype=args.dtype, paired=args.paired, conv_rewrites=args.conv_rewrites)
  if args.worker:
    result = _worker(args.worker, names[0], settings)
    with open(args.result, "w") as f:
      json.dump(result, f, indent=2)
    return [result]
  sides = [s.strip() for s in args.sides.split(",") if s.strip()]
  meta = _meta(settings, sides)
  rows = []
  with _shared_compilation_cache():
    for name in names:
      start = time.time()
      rows.append(run_case(name, settings, sides=sides, isolate=not args.inprocess, timeout=args.timeout))
      rows[-1]["wall_s"] = round(time.time() - start, 1)
      print(f"{name}: {rows[-1]['status']} ({rows[-1]['wall_s']} s) {rows[-1].get('reason', '')}", file=sys.stderr)
  compare_baselines(rows)
  add_mfu(rows, settings.dtype, args.peak_tflops)
  meta["load_average_end"] = os.getloadavg()
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "cases": rows}, f, indent=2)
  print(table(rows))
  print(f"\n{meta['date']}, {meta['machine']}, load average {meta['load_average_start'][0]:.1f} -> "
        f"{meta['load_average_end'][0]:.1f}; {settings.repeats} timed loops of "
        f"{settings.steps or 'each case default'} steps after {settings.warmup} warm-up steps; written to {args.json}")
  return rows


if __name__ == "__main__":
  main()
