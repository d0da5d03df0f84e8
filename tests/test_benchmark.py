"""The benchmark harness (experiments/benchmark.py): a tiny case end to end, its fields, no recompilation."""
import json
import os

import pytest

pytest.importorskip("torch")

from experiments import benchmark  # noqa: E402

ISSUE_CASES = ("hinton_mlp", "resnet32x4_resnet8x4_kd", "wrn_40_2_wrn_16_2_at", "resnet32x4_resnet8x4_crd",
               "dml_resnet32_x2", "codistill_resnet32_x2", "independent_resnet32_x2")


def test_registry_holds_the_issue_cases():
  for name in ISSUE_CASES:
    case = benchmark.CASES[name](False)
    assert case.batch == (128 if name == "hinton_mlp" else 64)
    assert case.steps >= 1 and case.description


def test_missing_features_are_named():
  with pytest.raises(benchmark.Skipped, match="^skipped: model no_such_net not available$"):
    benchmark.require(models=["no_such_net"])
  with pytest.raises(benchmark.Skipped,
                     match=r"^skipped: needs distill term 'no_such_term', kd_jax.losses.no_such_loss$"):
    benchmark.require(terms=["no_such_term"], losses=["no_such_loss"])


def test_hinton_mlp_tiny_end_to_end(tmp_path, monkeypatch, capsys):
  # The workers get one CPU device (the suite's 8 fake devices would only slow them down) and
  # OpenMP threads that sleep rather than spin when the test machine is busy.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
  monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
  out = tmp_path / "bench.json"
  benchmark.main(["--cases=hinton_mlp", "--tiny", "--steps=2", "--warmup=2", "--repeats=1", f"--json={out}"])

  data = json.loads(out.read_text())
  assert data["meta"]["settings"] == {"steps": 2, "warmup": 2, "repeats": 1, "tiny": True, "seed": 0}
  (row,) = data["cases"]
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
  assert "| hinton_mlp | 16 |" in capsys.readouterr().out
