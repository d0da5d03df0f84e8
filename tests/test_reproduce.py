"""experiments/reproduce.py: seeds -> markdown table and plot; a second call resumes without retraining."""
import json
import os

import pytest

from experiments import reproduce
from kd_jax import train
from tests.configs import tiny_digits


def test_reproduce_writes_table_and_plot_and_resumes(tmp_path, capsys):
  config = tiny_digits.get_config()
  config.epochs = 1
  config.rows.teacher.paper = "97.5"
  rows = reproduce.reproduce(config, str(tmp_path), seeds=2, command="python -m experiments.reproduce ...")
  printed = capsys.readouterr().out
  assert f"seed 0 (1/2): {tmp_path / 'seed_0'}" in printed and f"seed 1 (2/2): {tmp_path / 'seed_1'}" in printed
  report = (tmp_path / "REPORT.md").read_text()
  assert "| teacher | mlp | 97.5 |" in report and "| student_kd | mlp | – |" in report
  assert "(more than 2 std)" in report or "| +0.00 |" in report  # the gap to the paper is shown
  assert report.count("| 2 | 1 |") == 2  # 2 seeds, 1 epoch, for both rows
  png = (tmp_path / "accuracy.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  by_row = {r["row"]: r for r in rows}
  seeds = [json.loads((tmp_path / f"seed_{s}" / "results.json").read_text())["teacher"] for s in (0, 1)]
  mean = 100 * (seeds[0]["test_accuracy"] + seeds[1]["test_accuracy"]) / 2
  assert abs(by_row["teacher"]["accuracy"][0] - mean) < 1e-9
  assert seeds[0]["test_accuracy"] != seeds[1]["test_accuracy"] or seeds[0]["history"] != seeds[1]["history"]
  # A second call trains nothing: the finished rows' results are reused as they are.
  stamps = {p: os.path.getmtime(p) for p in tmp_path.glob("seed_*/*/result.json")}
  again = reproduce.reproduce(config, str(tmp_path), seeds=2)
  assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
  assert stamps == {p: os.path.getmtime(p) for p in tmp_path.glob("seed_*/*/result.json")}


def test_plot_marks_single_points(tmp_path, monkeypatch):
  """A one-epoch history is one point: a line alone would draw nothing."""
  from matplotlib.axes import Axes

  drawn = []
  original = Axes.plot
  monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append((list(a[0]), k.get("marker"))) or
                      original(self, *a, **k))
  epoch = lambda e, acc: {"epoch": e, "test_accuracy": acc}
  rows = [{"row": "one", "history": [[epoch(1, 0.9)], [epoch(1, 0.92)]]},
          {"row": "two", "history": [[epoch(1, 0.8), epoch(2, 0.85)]]},
          {"row": "none", "history": [[]]}]
  reproduce.plot(rows, str(tmp_path / "accuracy.png"))
  assert drawn == [([1], "o"), ([1, 2], None)]
  assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_is_not_called_a_significant_gap():
  row = {"paper": "146", "seeds": 1, "errors": (141.0, 0.0), "accuracy": (98.59, 0.0)}
  config = tiny_digits.get_config()
  config.paper_metric = "test_errors"
  assert reproduce.versus_paper(config, row) == "-5.00 (1 seed: no spread to judge it by)"
  assert reproduce.versus_paper(config, {**row, "seeds": 3, "errors": (141.0, 1.0)}) == "-5.00 (more than 2 std)"
  assert reproduce.versus_paper(config, {**row, "seeds": 3, "errors": (141.0, 3.0)}) == "-5.00"


def test_rows_are_compared_with_the_baseline_row_by_standard_error():
  config = tiny_digits.get_config()
  config.paper_metric = "test_errors"
  config.baseline_row = "teacher"
  base = {"row": "teacher", "seeds": 3, "errors": (141.0, 6.0), "accuracy": (98.59, 0.06)}
  row = {"row": "student_kd", "seeds": 3, "errors": (131.0, 6.0), "accuracy": (98.69, 0.06)}
  # SE of the difference: sqrt(36/3 + 36/3) = 4.9, so -10 is beyond 2 SE and -9 is not.
  assert reproduce.versus_baseline(config, row, base) == "-10.00 (more than 2 SE)"
  assert reproduce.versus_baseline(config, {**row, "errors": (132.0, 6.0)}, base) == "-9.00"
  assert reproduce.versus_baseline(config, base, base) == "–"
  assert reproduce.versus_baseline(config, {**row, "seeds": 1}, base) == "-10.00 (1 seed: no spread to judge it by)"
  summary = {"paper": "", "model": "mlp", "best_accuracy": (98.7, 0.0), "epochs": 1, "wall_time_s": 1.0,
             "device": "cpu"}
  table = reproduce.markdown(config, [{**summary, **base}, {**summary, **row}], "cmd")
  assert "| ours − paper | ours − teacher |" in table
  assert "| – | -10.00 (more than 2 SE) |" in table and "| – | – |" in table
  config.baseline_row = ""
  assert "ours − teacher" not in reproduce.markdown(config, [{**summary, **base}], "cmd")


def test_unknown_baseline_row_is_named():
  config = tiny_digits.get_config()
  config.baseline_row = "studnet"
  with pytest.raises(ValueError, match="baseline_row 'studnet' is not a row of this config"):
    train.run(config, "/nonexistent/never/written")
