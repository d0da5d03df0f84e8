"""The benchmark harness (experiments/benchmark.py): a tiny case end to end, its fields, no recompilation."""
import dataclasses
import json
import os

import pytest

from conftest import require_reference

require_reference("torch", "the PyTorch side of the benchmark")

from experiments import benchmark  # noqa: E402
from kd_jax.train import backend  # noqa: E402

ISSUE_CASES = ("hinton_mlp", "resnet32x4_resnet8x4_kd", "wrn_40_2_wrn_16_2_at", "resnet32x4_resnet8x4_crd",
               "dml_resnet32_x2", "codistill_resnet32_x2", "codistill_predictions_resnet32_x2",
               "independent_resnet32_x2", "loop_hinton_mlp", "resnet34_resnet18_kd_224")


def test_registry_holds_the_issue_cases():
  for name in ISSUE_CASES:
    case = benchmark.CASES[name](False)
    assert case.batch == (128 if "hinton" in name else 256 if "224" in name else 64)
    assert case.steps >= 1 and case.description
  # Both co-distillation modes (and DML) are compared with the 2 independent runs.
  for name in ("dml_resnet32_x2", "codistill_resnet32_x2", "codistill_predictions_resnet32_x2"):
    assert benchmark.CASES[name](False).baseline == "independent_resnet32_x2"
  assert benchmark.CASES["loop_hinton_mlp"](False).kind == "loop"
  # The default run (no --cases) is the issue's cases; the 2 independent runs are timed inside each online
  # case's workers (paired), their own row and single_resnet32 run when named or with --cases=all.
  # The ImageNet-sized case (for accelerators) runs when named too.
  assert {name for name, fn in benchmark.CASES.items() if fn(False).default} == set(ISSUE_CASES) - {
      "independent_resnet32_x2", "resnet34_resnet18_kd_224"}
  setup = benchmark.CASES["resnet34_resnet18_kd_224"](False).jax()
  assert setup.batch["image"].shape == (1, 256, 224, 224, 3) and setup.input_shape == (224, 224, 3)
  assert (setup.spec.student.num_classes, setup.spec.source.module.num_classes) == (1000, 1000)


def _row(case, jax_ms, flops, torch_ms, baseline=None):
  row = {"case": case, "jax": {"status": "ok", "ms_per_step": jax_ms, "flops_per_step": flops},
         "torch": {"status": "ok", "ms_per_step": torch_ms}}
  return {**row, "baseline": baseline} if baseline else row


def test_baseline_ratios():
  rows = [_row("independent", 100.0, 50e9, 80.0), _row("codistill", 130.0, 66.5e9, 88.0, baseline="independent"),
          _row("orphan", 1.0, 1.0, 1.0, baseline="not_in_this_run")]
  rows[0]["torch"] = {"status": "error", "reason": "boom"}
  benchmark.compare_baselines(rows)
  assert rows[1]["vs_baseline"] == {"case": "independent", "jax_time": 1.3, "jax_flops": 1.33, "torch_time": None,
                                    "method": "rows"}
  assert "vs_baseline" not in rows[0] and "vs_baseline" not in rows[2]
  assert "| 1.30 / 1.33 / — (independent) |" in benchmark.table([{**rows[1], "batch": 64}])


def test_paired_baseline_ratios_come_from_the_rows_own_workers():
  row = _row("codistill", 130.0, 66.5e9, 88.0, baseline="independent")
  row["jax"]["paired"] = {"baseline": "independent", "ratio": 1.05, "baseline_flops_per_step": 50e9}
  row["torch"]["paired"] = {"baseline": "independent", "ratio": 1.2}
  rows = [row, _row("independent", 200.0, 50e9, 80.0)]  # a slower baseline row, measured at another time
  benchmark.compare_baselines(rows)
  assert rows[0]["vs_baseline"] == {"case": "independent", "jax_time": 1.05, "jax_flops": 1.33, "torch_time": 1.2,
                                    "method": "paired"}
  benchmark.compare_baselines(rows[:1])  # the baseline's row need not be in the run
  assert rows[0]["vs_baseline"]["jax_time"] == 1.05 and rows[0]["vs_baseline"]["jax_flops"] == 1.33
  assert "| 1.05 / 1.33 / 1.20 (independent, paired) |" in benchmark.table([{**rows[0], "batch": 64}])


def test_paired_loops_alternate_and_take_the_median_of_adjacent_ratios():
  calls, speed = [], {"case": [3.0, 2.0, 3.3], "baseline": [1.5, 1.0, 1.1]}  # the machine slows down and back

  def runner(name):
    def run(steps):
      calls.append(name)
      return speed[name][sum(c == name for c in calls) - 1]
    return run

  out = benchmark.paired_loops(runner("case"), runner("baseline"), steps=1, repeats=3)
  assert calls == ["case", "baseline", "baseline", "case", "case", "baseline"]
  assert out["ratios"] == [2.0, 2.0, 3.0] and out["ratio"] == 2.0
  assert out["ms_per_step_loops"] == [3000.0, 2000.0, 3300.0]


def test_mfu_from_the_flop_count_and_the_chips_peak():
  rows = [{"case": "gpu", "jax": {"status": "ok", "device": "gpu: 1 x NVIDIA H200", "devices": 1,
                                  "flops_per_step": 1e12, "ms_per_step": 10.0},
           "torch": {"status": "ok", "ms_per_step": 20.0}},
          {"case": "cpu", "jax": {"status": "ok", "device": "cpu: 1 device(s), 2 cores", "devices": 1,
                                  "flops_per_step": 1e12, "ms_per_step": 10.0}}]
  benchmark.add_mfu(rows, "bfloat16")
  # 1 TFLOP in 10 ms is 100 TFLOP/s: 10.1% of the H200's 989 bf16 TFLOP/s; PyTorch's 20 ms, half of it.
  assert rows[0]["mfu"]["jax"] == pytest.approx(100 / 989, abs=1e-4)
  assert rows[0]["mfu"]["torch"] == pytest.approx(50 / 989, abs=1e-4)
  assert "mfu" not in rows[1]  # no peak for a CPU
  assert "| 10.1% / 5.1% |" in benchmark.table([{**rows[0], "batch": 256}])
  assert benchmark.peak_flops("gpu: 8 x NVIDIA H100 PCIe", "float32") == 378e12  # not the SXM's
  benchmark.add_mfu(rows, "float32", peak_tflops=200.0)  # a given peak, any device
  assert rows[1]["mfu"]["jax"] == 0.5 and rows[1]["mfu"]["peak_source"] == "--peak-tflops"
  with pytest.raises(SystemExit):  # argparse's error: "--peak-tflops must be > 0 ..."
    benchmark.parse_args(["--peak-tflops=0"])


def test_conv_rewrites_are_chosen_by_flag():
  """--conv-rewrites builds the step's `backend.ConvRewrites` (an A/B without touching kd_jax); a typo is an
  argparse error naming the allowed values."""
  assert benchmark.conv_rewrites("default") == backend.ConvRewrites.default()
  assert benchmark.conv_rewrites("none") == backend.ConvRewrites(False, False, False)
  assert benchmark.conv_rewrites("hold_inputs, phased_input_gradients") == backend.ConvRewrites(
      hold_inputs=True, hold_outputs=False, phased_input_gradients=True)
  assert benchmark.parse_args(["--conv-rewrites=hold_outputs"]).conv_rewrites == "hold_outputs"
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--conv-rewrites=hold_input"])
  with pytest.raises(ValueError, match="hold_input.*allowed"):
    benchmark.conv_rewrites("hold_input")


def test_missing_features_are_named():
  with pytest.raises(benchmark.Skipped, match="^skipped: model no_such_net not available$"):
    benchmark.require(models=["no_such_net"])
  with pytest.raises(benchmark.Skipped,
                     match=r"^skipped: needs distill term 'no_such_term', kd_jax.losses.no_such_loss$"):
    benchmark.require(terms=["no_such_term"], losses=["no_such_loss"])


def _worker_env(patch: pytest.MonkeyPatch) -> None:
  """The workers get one CPU device (the suite's 8 fake devices would only slow them down) and OpenMP
  threads that sleep rather than spin when the test machine is busy."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  patch.setenv("XLA_FLAGS", " ".join(flags))
  patch.setenv("OMP_WAIT_POLICY", "PASSIVE")


def _tiny_row(case: str, out, *args: str) -> dict:
  """The row of one tiny harness run of `case`."""
  benchmark.main([f"--cases={case}", "--tiny", *args, f"--json={out}"])
  (row,) = json.loads(out.read_text())["cases"]
  return row


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One harness run of the tiny hinton_mlp step case and its train-loop case (subprocess workers)."""
  patch = pytest.MonkeyPatch()
  _worker_env(patch)
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  import contextlib
  import io
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed):
      benchmark.main(["--cases=hinton_mlp,loop_hinton_mlp", "--tiny", "--steps=2", "--warmup=2", "--repeats=1",
                      f"--json={out}"])
  finally:
    patch.undo()
  return json.loads(out.read_text()), printed.getvalue()


def test_hinton_mlp_tiny_end_to_end(tiny_run):
  data, printed = tiny_run
  assert data["meta"]["settings"] == {"steps": 2, "warmup": 2, "repeats": 1, "tiny": True, "seed": 0,
                                      "dtype": "float32", "paired": True, "conv_rewrites": "default"}
  row = data["cases"][0]
  if row["status"] == "skipped":
    pytest.skip(row["reason"])
  assert row["status"] == "ok", row
  assert (row["case"], row["batch"], row["images_per_step"], row["steps"]) == ("hinton_mlp", 16, 16, 2)
  for side in ("jax", "torch"):
    result = row[side]
    assert result["status"] == "ok"
    assert result["ms_per_step"] > 0 and result["images_per_s"] > 0
    assert len(result["ms_per_step_loops"]) == 1
    assert isinstance(result["peak_mib"], float) and result["memory_measure"]
    assert result["device"].startswith(("cpu", "gpu", "cuda", "tpu"))
  assert row["ratio"] == pytest.approx(row["jax"]["ms_per_step"] / row["torch"]["ms_per_step"], rel=0.01, abs=1e-3)
  # Same architectures on both sides, finite losses.
  assert row["jax"]["trained_params"] == row["torch"]["trained_params"]
  assert row["jax"]["nonfinite_step"] == -1 and row["torch"]["finite"]
  # The listener saw the first step compile, and nothing compiled after it.
  assert row["jax"]["compiles_first_step"] >= 1
  assert row["jax"]["compiles"] == 0
  # XLA's FLOP count of the compiled step, found in jit's cache (no compilation for it), is at least the
  # matmuls' count: student forward and backward (2 x 2 flops per weight and example, the first layer's
  # input gradient aside) and the teacher's forward (2 per weight and example).
  weights = lambda widths: sum(a * b for a, b in zip(widths[:-1], widths[1:]))
  student, teacher = weights((784, 32, 32, 10)), weights((784, 64, 64, 10))
  assert row["jax"]["cost_analysis_compiles"] == 0
  assert 16 * (4 * student + 2 * teacher - 2 * 784 * 32) <= row["jax"]["flops_per_step"] < 16 * 8 * (student + teacher)
  assert row["jax"]["gflops_per_s"] == pytest.approx(row["jax"]["flops_per_step"] / row["jax"]["ms_per_step"] / 1e6,
                                                     rel=0.01)
  assert "| hinton_mlp | 16 |" in printed
  assert row["jax"]["conv_rewrites"] == dataclasses.asdict(backend.ConvRewrites.default())


def test_train_loop_case_logs_and_checkpoints_only_when_on(tiny_run):
  data, printed = tiny_run
  row = data["cases"][1]
  if row["status"] == "skipped":
    pytest.skip(row["reason"])
  assert row["status"] == "ok", row
  assert "torch" not in row  # kd_jax's loop against itself
  loop = row["jax"]["loop"]
  # The tiny case checkpoints every 2 steps: warm-up = 2 steps + one interval, then the 2 timed steps.
  assert (loop["timed_steps"], loop["warmup_steps"]) == (2, 4)
  # Off: the last step only (a run always logs its last step).
  assert [loop[m]["metrics_lines"] for m in ("on", "log", "off")] == [6, 6, 1]
  # On: saves at 2 and 4 in the loop and 6 at the end (2 kept); log and off: only the final save.
  assert [loop[m]["checkpoint_steps_kept"] for m in ("on", "log", "off")] == [[4, 6], [6], [6]]
  assert loop["ratio_on_off"] == pytest.approx(loop["on"]["steps_per_s"] / loop["off"]["steps_per_s"], rel=0.01)
  assert loop["ratio_log_off"] == pytest.approx(loop["log"]["steps_per_s"] / loop["off"]["steps_per_s"], rel=0.01)
  assert row["loop_ratio_on_off"] == loop["ratio_on_off"]
  on, log, off = (loop[m]["ms_per_step"] for m in ("on", "log", "off"))
  assert loop["ms_per_logged_step"] == pytest.approx(log - off, abs=1e-3)
  assert loop["ms_per_checkpoint"] == pytest.approx((on - log) * 2 / 1, abs=0.01)  # 1 checkpoint in the window
  assert "ratio_at_defaults" in loop and "default intervals" in row["reason"]
  assert row["jax"]["ms_per_step"] == loop["on"]["ms_per_step"] > 0
  # No compilation inside any timed window: the loop does not retrace after its first steps.
  assert loop["compiles"] == {"on": [0], "log": [0], "off": [0]} and row["jax"]["compiles"] == 0
  assert "| loop_hinton_mlp | 16 |" in printed and "train loop:" in printed


def test_loop_costs_at_the_default_intervals():
  # A 20 ms step; logging every step adds 1 ms to it, 8 checkpoints in 200 steps another 5 ms: 125 ms each.
  costs = benchmark.loop_costs(on_ms=26.0, log_ms=21.0, off_ms=20.0, timed_steps=200, checkpoint_every=25,
                               log_every=50, defaults_checkpoint_every=1000)
  assert costs["ms_per_logged_step"] == pytest.approx(1.0)
  assert costs["ms_per_checkpoint"] == pytest.approx(5.0 * 200 / 8)
  assert costs["ratio_at_defaults"] == pytest.approx(20.0 / (20.0 + 1.0 / 50 + 125.0 / 1000), rel=1e-4)
  from kd_jax import train
  defaults = benchmark.loop_costs(26.0, 21.0, 20.0, timed_steps=200, checkpoint_every=25)["defaults"]
  assert defaults == {"log_every_steps": train.base_config().log_every_steps,
                      "checkpoint_every_steps": train.base_config().checkpoint_every_steps}


@pytest.mark.slow
def test_an_online_case_times_its_baseline_paired_in_its_own_workers(tmp_path, monkeypatch):
  _worker_env(monkeypatch)
  row = _tiny_row("codistill_predictions_resnet32_x2", tmp_path / "paired.json", "--steps=1", "--warmup=2",
                  "--repeats=2")
  assert row["status"] == "ok", row
  for side in ("jax", "torch"):
    paired = row[side]["paired"]
    assert paired["baseline"] == "independent_resnet32_x2"
    assert len(paired["ms_per_step_loops"]) == len(paired["baseline_ms_per_step_loops"]) == 2
    assert paired["ratio"] > 0
  # Exchanging predictions costs the 2 runs' FLOPs (the baseline's count from the same worker).
  assert row["vs_baseline"]["method"] == "paired" and row["vs_baseline"]["jax_flops"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_bfloat16_runs_both_sides_in_mixed_precision(tiny_run, tmp_path, monkeypatch):
  """--dtype=bfloat16: the same first loss as float32 on each side to bf16's precision, not bit-identical."""
  _worker_env(monkeypatch)  # as the float32 run's
  bf16 = _tiny_row("hinton_mlp", tmp_path / "bf16.json", "--steps=2", "--warmup=2", "--repeats=1",
                   "--dtype=bfloat16")
  f32 = tiny_run[0]["cases"][0]
  assert bf16["dtype"] == "bfloat16" and bf16["status"] == "ok", bf16
  # (Computed in bf16, PyTorch's KD loss at T=20 came out negative: both sides keep the losses in f32.)
  for side in ("jax", "torch"):
    assert bf16[side]["first_loss"] == pytest.approx(f32[side]["first_loss"], rel=2e-2)
  assert bf16["jax"]["first_loss"] != f32["jax"]["first_loss"]  # (torch's agrees to the 5 digits kept)


@pytest.mark.slow
def test_the_imagenet_case_runs_both_sides_on_the_same_models(tmp_path, monkeypatch):
  """resnet34 -> resnet18's harness, shrunk (--tiny: resnet18 -> resnet18 at 32×32): torchvision's twin trains
  as many parameters as kd_jax's zoo model, both losses finite, no MFU on a CPU."""
  _worker_env(monkeypatch)
  row = _tiny_row("resnet34_resnet18_kd_224", tmp_path / "imagenet.json", "--steps=1", "--warmup=2", "--repeats=1")
  assert row["status"] == "ok", row
  assert row["jax"]["trained_params"] == row["torch"]["trained_params"] == 11_689_512  # resnet18, 1,000 classes
  assert row["jax"]["nonfinite_step"] == -1 and row["torch"]["finite"]
  assert "mfu" not in row
