"""experiments/search.py: the Pareto front vs brute force, and a 3-candidate KD search on digits that
writes the front file and plot and resumes without retraining; slow: a short MNIST search."""
import csv
import json
import os

import numpy as np
import pytest

from experiments import search as search_lib
from experiments.configs import mnist_search


def brute_force_front(params, acc):
  n = len(params)
  return np.array([not any(params[j] <= params[i] and acc[j] >= acc[i] and (params[j] < params[i] or acc[j] > acc[i])
                           for j in range(n)) for i in range(n)])


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  params = rng.integers(0, 12, size=40)  # small ranges: many ties in both coordinates
  acc = rng.integers(0, 8, size=40) / 8
  np.testing.assert_array_equal(search_lib.pareto_front(params, acc), brute_force_front(params, acc))
  ranks = search_lib.pareto_ranks(params, acc)
  np.testing.assert_array_equal(ranks == 0, brute_force_front(params, acc))
  second = ranks > 0
  np.testing.assert_array_equal(ranks[second] == 1, brute_force_front(params[second], acc[second]))


def test_front_edge_cases():
  assert search_lib.pareto_front([5, 5], [0.9, 0.9]).tolist() == [True, True]  # identical points
  assert search_lib.pareto_front([1, 2, 3], [0.5, 0.5, 0.9]).tolist() == [True, False, True]
  with pytest.raises(ValueError, match="1-D of one length"):
    search_lib.pareto_front([1, 2], [0.5])


def test_mutations_stay_in_the_space():
  rng = np.random.default_rng(0)
  depths, widths = [1, 2, 3], [50, 100, 200]
  arch = (100, 50)
  for _ in range(200):
    child = search_lib.mutate(rng, arch, depths, widths)
    assert child != arch and len(child) in depths and set(child) <= set(widths)
    arch = child


def mlp_params(widths, inputs=64, classes=10):
  sizes = [inputs] + list(widths) + [classes]
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


class FakeTrainer:
  """Stands in for kd_jax.train.run: a made-up accuracy per architecture that grows with the epochs."""

  def __init__(self):
    self.trained = []

  def __call__(self, table, workdir):
    out = {}
    for name, r in table.rows.items():
      if name == "teacher":
        continue
      widths = list(r.model_kwargs.widths)
      epochs = r.epochs + (out[r.init["from"]]["epochs"] if r.init["from"] else 0)
      capacity = 1 - 1 / (1 + sum(widths) / 100) / (1 + 0.3 * len(widths))
      out[name] = {"test_accuracy": capacity * (1 - 0.5 ** epochs), "num_params": mlp_params(widths),
                   "epochs": epochs}
      self.trained.append(name)
    return out


def test_evolution_mutates_the_front_and_halves(tmp_path):
  config = digits_search_config(candidates=9)
  config.search.strategy = "evolution"
  config.search.population = 3
  config.search.depths = [1, 2, 3]
  config.search.widths = [4, 16, 32, 64]
  config.search.rungs = [1, 2, 2]
  trainer = FakeTrainer()
  report = search_lib.search(config, str(tmp_path), run=trainer)
  candidates = report["candidates"]
  assert len(candidates) == 9 and len({c["name"] for c in candidates}) == 9
  # 9 at rung 0, ceil(9/3) = 3 at rung 1, 1 at rung 2.
  assert sorted(c["rung"] for c in candidates) == [0] * 6 + [1] * 2 + [2]
  # Each child of generations 2 and 3 is one mutation away from a member of the front it was drawn from.
  def one_mutation(a, b):
    if len(a) == len(b):
      return sum(x != y for x, y in zip(a, b)) == 1
    long, short = (a, b) if len(a) > len(b) else (b, a)
    return len(long) == len(short) + 1 and any(long[:i] + long[i + 1:] == short for i in range(len(long)))
  archs = [tuple(c["widths"]) for c in candidates]
  acc0 = [c["rung_accuracy"][0] for c in candidates]
  for generation in (1, 2):
    seen = slice(0, 3 * generation)
    front = [a for a, on in zip(archs[seen], search_lib.pareto_front(
        [mlp_params(a) for a in archs[seen]], acc0[seen])) if on]
    for child in archs[3 * generation: 3 * generation + 3]:
      assert any(one_mutation(child, parent) for parent in front), (child, front)
  (final,) = [c for c in candidates if c["rung"] == 2]
  assert final["on_front"] and final["epochs"] == 5 and report["front"] == [final]
  assert (tmp_path / "pareto.png").exists()


def digits_search_config(candidates=3):
  config = mnist_search.get_config()
  config.data.name = "digits"
  config.data.batch_size = 64
  config.data.eval_batch_size = 360
  config.mesh.data = 1
  config.progress = False
  config.log_every_steps = 10
  config.rows.teacher = config.rows.teacher.copy_and_resolve_references()
  config.rows.teacher.model = "mlp"
  config.rows.teacher.model_kwargs = {"widths": [64]}
  config.rows.teacher.data.augment = "none"
  config.rows.teacher.epochs = 3
  config.rows.teacher.optimizer.learning_rate = 1e-2
  config.search.depths = [1, 2]
  config.search.widths = [4, 16, 32]
  config.search.candidates = candidates
  config.search.rungs = [1, 1]
  config.search.eta = 3
  config.search.optimizer.learning_rate = 1e-2
  config.search.terms = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}}
  return config


def test_bad_search_config_is_a_clear_error(tmp_path):
  config = digits_search_config()
  config.search.strategy = "grid"
  with pytest.raises(ValueError, match="search.strategy"):
    search_lib.search(config, str(tmp_path))
  config = digits_search_config(candidates=20)
  with pytest.raises(ValueError, match="exceeds the 12 architectures"):
    search_lib.search(config, str(tmp_path))


def test_digits_search_writes_front_and_plot_and_resumes(tmp_path):
  config = digits_search_config()
  report = search_lib.search(config, str(tmp_path))
  candidates = report["candidates"]
  assert len(candidates) == 3 and len({c["name"] for c in candidates}) == 3
  # Successive halving: ceil(3 / 3) = 1 candidate reaches rung 1 (from its rung-0 weights): the most
  # accurate of the rung-0 front.
  assert sorted(c["rung"] for c in candidates) == [0, 0, 1]
  rung0 = search_lib.pareto_front([c["num_params"] for c in candidates], [c["rung_accuracy"][0] for c in candidates])
  (promoted,) = [c for c in candidates if c["rung"] == 1]
  assert rung0[candidates.index(promoted)]
  assert promoted["rung_accuracy"][0] == max(c["rung_accuracy"][0] for c, on in zip(candidates, rung0) if on)
  assert promoted["epochs"] == 2 and len(promoted["rung_accuracy"]) == 2
  finals = [c for c in candidates if c["rung"] == 1]
  expected = search_lib.pareto_front([c["num_params"] for c in finals], [c["test_accuracy"] for c in finals])
  assert [c["on_front"] for c in finals] == expected.tolist() == [True]
  for c in candidates:  # the parameter count is the MLP's: 64 -> widths -> 10, with biases
    sizes = [64] + c["widths"] + [10]
    assert c["num_params"] == sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    result = json.loads((tmp_path / c["row"] / "result.json").read_text())
    assert result["test_accuracy"] == c["test_accuracy"]
  saved = json.loads((tmp_path / "search.json").read_text())
  assert saved["candidates"] == candidates and [c["name"] for c in saved["front"]] == [
      c["name"] for c in sorted(finals, key=lambda c: c["num_params"]) if c["on_front"]]
  with open(tmp_path / "search.csv") as f:
    lines = list(csv.DictReader(f))
  assert [line["name"] for line in lines] == [c["name"] for c in candidates]
  assert [line["on_front"] for line in lines] == [str(c["on_front"]) for c in candidates]
  png = (tmp_path / "pareto.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  # The teacher was trained once, in the workdir, and every candidate learned from it.
  assert json.loads((tmp_path / finals[0]["row"] / "result.json").read_text())["model"] == "mlp"
  # Again: nothing is retrained (every candidate's result is read back), same report.
  stamps = {p: os.path.getmtime(p) for p in tmp_path.glob("*/result.json")}
  assert len(stamps) == 1 + 3 + 1
  again = search_lib.search(digits_search_config(), str(tmp_path))
  assert again["candidates"] == candidates
  assert stamps == {p: os.path.getmtime(p) for p in tmp_path.glob("*/result.json")}


@pytest.mark.slow
def test_mnist_search_front_beats_the_smallest_candidate(tmp_path):
  config = mnist_search.get_config()
  # A short run: a smaller teacher (784-400-400-10, no jitter), 2 epochs; each candidate 1 + 1 epochs.
  config.rows.teacher.model = "mlp"
  config.rows.teacher.model_kwargs = {"widths": [400, 400]}
  config.rows.teacher.data.augment = "none"
  config.rows.teacher.epochs = 2
  config.search.candidates = 5
  config.search.rungs = [1, 1]
  config.search.eta = 2
  config.mesh.data = 1
  config.progress = False
  report = search_lib.search(config, str(tmp_path))
  for c in sorted(report["candidates"], key=lambda c: c["num_params"]):
    print(f"{c['name']}: {c['num_params']} params, {100 * c['test_accuracy']:.2f}% after {c['epochs']} epochs, "
          f"front={c['on_front']}")
  smallest = min(report["candidates"], key=lambda c: c["num_params"])
  best = max(report["front"], key=lambda c: c["test_accuracy"])
  assert best["test_accuracy"] > smallest["test_accuracy"] and best["test_accuracy"] > 0.96
  assert (tmp_path / "pareto.png").exists()


def test_generated_table_is_a_valid_config():
  from kd_jax.train import config as config_lib

  config = mnist_search.get_config()
  rows = {search_lib.row_name((800, 50), 0): search_lib.candidate_row(config.search, (800, 50), 0),
          search_lib.row_name((800, 50), 1): search_lib.candidate_row(config.search, (800, 50), 1)}
  table = config_lib.validate(search_lib._table(config, rows))
  assert "search" not in table and table.rows.w800x50_r1.init["from"] == "w800x50_r0"
  assert table.rows.w800x50_r0.teacher.row == "teacher" and list(table.rows.w800x50_r0.model_kwargs.widths) == [800, 50]
