r"""Student architecture search under a teacher: the Pareto front of test accuracy vs parameters.

In the spirit of Liu, Jia, Tang, Xie & Tian 2020 ("Search to Distill: Pearls are
Everywhere but not the Eyes", CVPR): which student architecture distils best
from a given teacher is searched with the distillation objective in the loop.
Every candidate is a row of a generated table config (the config's `search.terms`,
e.g. CE + KD, with `teacher=` the config's teacher row), trained by the one
engine (`kd_jax.train.run`); all candidates share the one trained teacher.

Search space (`config.search`): MLP hidden depth in `depths`, each hidden width
from `widths` (e.g. depth 1-3, widths {50, 100, 200, 400, 800}).
Strategies:
  random     `candidates` distinct architectures drawn uniformly (depth, then
             each width), seeded by --seed;
  evolution  `population` random architectures, then generations of
             `population` children, each a mutation (one width moved to a
             neighbouring value, a layer added or removed) of a member of the
             current Pareto front, until `candidates` architectures.
Early stopping (successive halving, as in Jamieson & Talwalkar 2016 / Li et al.
2017's Hyperband): every candidate trains `rungs[0]` epochs; at rung r the best
ceil(n / eta) candidates of rung r-1 by Pareto rank (non-dominated sorting on
accuracy vs parameters: the front first, then the next front, ties by accuracy)
train `rungs[r]` more epochs, starting from their rung r-1 weights (`init`,
with a fresh schedule). A candidate's figure is its test accuracy at the last
rung it reached; the Pareto front is computed among the candidates of the last
rung (all with the same budget).

Resumable: a finished candidate's row is read back from `<workdir>/<row>/result.json`
(an interrupted one resumes from its checkpoint), so running the same command
again trains only what is missing. Outputs in the workdir:
  search.json  {"candidates": [...], "front": [...]}: per candidate its widths,
               parameter count, per-rung accuracy, final rung, `on_front`
  search.csv   the same, one line per candidate
  pareto.png   every candidate (accuracy vs parameters, log scale), the front highlighted

  python -m experiments.search --config=experiments/configs/mnist_search.py --workdir=/tmp/search
  python -m experiments.search --config=experiments/configs/mnist_search.py --workdir=/tmp/search_evo \
      --strategy=evolution --candidates=12 --seed=1
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags():
  """The CLI's flags, defined only when run as a script: importing this module next to
  experiments.reproduce (which has its own --config) must not redefine them."""
  config_flags.DEFINE_config_file("config", None, "A search config file (experiments/configs/*_search.py).",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Directory of the candidates' runs, the front and the plot.")
  flags.DEFINE_integer("candidates", 0, "Number of architectures to try (> 0 overrides config.search.candidates).")
  flags.DEFINE_string("strategy", "", "'random' or 'evolution' (overrides config.search.strategy).")
  flags.DEFINE_integer("seed", None, "Seed of the proposals and of every run (overrides config.seed).")
  flags.mark_flags_as_required(["config", "workdir"])

STRATEGIES = ("random", "evolution")
Arch = tuple[int, ...]


# --- Pareto fronts -------------------------------------------------------------------------------

def pareto_front(num_params: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
  """Bool mask [N]: the candidates no other candidate dominates.

  j dominates i when params_j <= params_i and accuracy_j >= accuracy_i, one of
  them strictly. Identical points are both on the front. A sweep in order of
  parameters: O(N log N).
  """
  params = np.asarray(num_params, np.float64)
  acc = np.asarray(accuracy, np.float64)
  if params.shape != acc.shape or params.ndim != 1:
    raise ValueError(f"num_params {params.shape} and accuracy {acc.shape} must be 1-D of one length")
  on_front = np.zeros(params.shape, bool)
  best_smaller = -np.inf  # the best accuracy among strictly smaller models
  for p in np.unique(params):  # ascending
    group = np.flatnonzero(params == p)
    top = acc[group].max()
    if top > best_smaller:
      on_front[group[acc[group] == top]] = True
    best_smaller = max(best_smaller, top)
  return on_front


def pareto_ranks(num_params: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
  """Int [N]: 0 for the front, 1 for the front of the rest, ... (non-dominated sorting)."""
  params, acc = np.asarray(num_params, np.float64), np.asarray(accuracy, np.float64)
  ranks = np.full(params.shape, -1, int)
  rank = 0
  while (ranks < 0).any():
    left = np.flatnonzero(ranks < 0)
    ranks[left[pareto_front(params[left], acc[left])]] = rank
    rank += 1
  return ranks


def promote(names: Sequence[str], num_params, accuracy, keep: int) -> list[str]:
  """The `keep` most promising candidates: by Pareto rank, then by accuracy, then by fewer params."""
  ranks = pareto_ranks(num_params, accuracy)
  order = sorted(range(len(names)), key=lambda i: (ranks[i], -accuracy[i], num_params[i], names[i]))
  return [names[i] for i in order[:keep]]


# --- proposals -----------------------------------------------------------------------------------

def arch_name(widths: Arch) -> str:
  return "w" + "x".join(str(w) for w in widths)


def random_arch(rng: np.random.Generator, depths: Sequence[int], widths: Sequence[int]) -> Arch:
  depth = int(rng.choice(depths))
  return tuple(int(rng.choice(widths)) for _ in range(depth))


def mutate(rng: np.random.Generator, arch: Arch, depths: Sequence[int], widths: Sequence[int]) -> Arch:
  """One random change: a width moved to a neighbouring value, or a layer added or removed."""
  widths = sorted(widths)
  moves = ["width"]
  if len(arch) < max(depths):
    moves.append("add")
  if len(arch) > min(depths):
    moves.append("remove")
  move = moves[int(rng.integers(len(moves)))]
  layers = list(arch)
  if move == "width":
    i = int(rng.integers(len(layers)))
    position = widths.index(layers[i]) if layers[i] in widths else 0
    steps = [s for s in (-1, 1) if 0 <= position + s < len(widths)]
    layers[i] = widths[position + steps[int(rng.integers(len(steps)))]] if steps else layers[i]
  elif move == "add":
    layers.insert(int(rng.integers(len(layers) + 1)), int(rng.choice(widths)))
  else:
    del layers[int(rng.integers(len(layers)))]
  return tuple(layers)


def _distinct(propose, count: int, seen: set, *, tries: int = 200) -> list[Arch]:
  """Up to `count` new architectures from `propose()`, none in `seen` (which is updated)."""
  out = []
  for _ in range(tries * max(count, 1)):
    if len(out) == count:
      break
    arch = propose()
    if arch not in seen:
      seen.add(arch)
      out.append(arch)
  return out


def space_size(depths: Sequence[int], widths: Sequence[int]) -> int:
  return sum(len(set(widths)) ** d for d in set(depths))


# --- the search ----------------------------------------------------------------------------------

def check_search(search) -> None:
  """Clear errors for a bad `config.search`, before anything trains."""
  if search.strategy not in STRATEGIES:
    raise ValueError(f"search.strategy must be one of {STRATEGIES}, got {search.strategy!r}")
  depths, widths = list(search.depths), list(search.widths)
  if not depths or min(depths) < 1:
    raise ValueError(f"search.depths must be non-empty positive ints, got {depths}")
  if not widths or min(widths) < 1:
    raise ValueError(f"search.widths must be non-empty positive ints, got {widths}")
  if search.candidates < 1:
    raise ValueError(f"search.candidates must be >= 1, got {search.candidates}")
  if search.candidates > space_size(depths, widths):
    raise ValueError(f"search.candidates={search.candidates} exceeds the {space_size(depths, widths)} "
                     f"architectures of depths {depths} x widths {widths}")
  if not search.rungs or min(search.rungs) < 1:
    raise ValueError(f"search.rungs must be non-empty positive epoch counts, got {list(search.rungs)}")
  if search.eta < 1:
    raise ValueError(f"search.eta must be >= 1, got {search.eta}")
  if search.strategy == "evolution" and search.population < 1:
    raise ValueError(f"search.population must be >= 1, got {search.population}")


def _table(config, rows: dict):
  """The config's own rows (the teacher) plus `rows`, without the `search` section."""
  table = copy.deepcopy(config)
  with table.unlocked():
    del table["search"]
    for name, r in rows.items():
      table.rows[name] = r
  return table


def candidate_row(search, widths: Arch, rung: int):
  from kd_jax.train import row

  kwargs = dict(search.model_kwargs.to_dict() if hasattr(search.model_kwargs, "to_dict") else search.model_kwargs)
  return row(model=search.model, model_kwargs={**kwargs, "widths": list(widths)},
             teacher={"row": search.teacher, "cache": search.cache_teacher}, terms=search.terms.to_dict(),
             optimizer=search.optimizer.to_dict(),
             schedule=search.schedule.to_dict(), epochs=int(search.rungs[rung]),
             init={"from": row_name(widths, rung - 1) if rung > 0 else ""})


def row_name(widths: Arch, rung: int) -> str:
  return f"{arch_name(widths)}_r{rung}"


def search(config, workdir: str, *, run=None) -> dict[str, Any]:
  """Runs the search of `config.search` under `workdir`; returns {"candidates", "front"} (also written).

  `run(table_config, workdir) -> {row: result}` trains a table (default: `kd_jax.train.run`).
  """
  if run is None:
    from kd_jax import train

    run = train.run
  if "search" not in config:
    raise ValueError("the config has no `search` section (see experiments/configs/mnist_search.py)")
  s = config.search
  check_search(s)
  if config.epochs:
    raise ValueError(f"config.epochs={config.epochs} would override the candidates' epochs: the budget of each "
                     "rung is search.rungs")
  if s.teacher and s.teacher not in config.rows:
    raise ValueError(f"search.teacher={s.teacher!r} is not a row of the config ({list(config.rows)})")
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(config.seed)
  depths, widths = list(s.depths), list(s.widths)
  seen: set = set()
  archs: list[Arch] = []
  results: dict[tuple[Arch, int], dict] = {}

  def train_rung(batch: list[Arch], rung: int):
    rows = {row_name(a, r): candidate_row(s, a, r) for a in batch for r in range(rung + 1)}
    # Earlier rungs of these candidates are rows too (finished: read back), for their init.
    out = run(_table(config, rows), workdir)
    for a in batch:
      results[(a, rung)] = out[row_name(a, rung)]

  def accuracy(a, rung):
    return results[(a, rung)]["test_accuracy"]

  def params(a):
    return results[(a, 0)]["num_params"]

  # Low-fidelity proposals: every candidate's first rung.
  first = s.population if s.strategy == "evolution" else s.candidates
  batch = _distinct(lambda: random_arch(rng, depths, widths), min(first, s.candidates), seen)
  while batch:
    train_rung(batch, 0)
    archs += batch
    if s.strategy != "evolution" or len(archs) >= s.candidates:
      break
    front = [a for a, on in zip(archs, pareto_front([params(a) for a in archs], [accuracy(a, 0) for a in archs]))
             if on]
    children = min(s.population, s.candidates - len(archs))
    batch = _distinct(lambda: mutate(rng, front[int(rng.integers(len(front)))], depths, widths), children, seen)
    if len(batch) < children:  # the front's neighbourhood is used up: fill with random architectures
      batch += _distinct(lambda: random_arch(rng, depths, widths), children - len(batch), seen)

  # Successive halving over the rungs.
  alive = list(archs)
  for rung in range(1, len(s.rungs)):
    keep = max(1, math.ceil(len(alive) / s.eta))
    names = [arch_name(a) for a in alive]
    promoted = set(promote(names, [params(a) for a in alive], [accuracy(a, rung - 1) for a in alive], keep))
    alive = [a for a in alive if arch_name(a) in promoted]
    train_rung(alive, rung)

  last = len(s.rungs) - 1
  finals = [a for a in archs if (a, last) in results]
  on_front = dict(zip(finals, pareto_front([params(a) for a in finals], [accuracy(a, last) for a in finals])))
  candidates = []
  for a in archs:
    reached = max(r for r in range(len(s.rungs)) if (a, r) in results)
    candidates.append({
        "name": arch_name(a), "widths": list(a), "depth": len(a), "num_params": params(a),
        "rung": reached, "epochs": int(sum(s.rungs[:reached + 1])),
        "test_accuracy": accuracy(a, reached),
        "rung_accuracy": [accuracy(a, r) for r in range(reached + 1)],
        "on_front": bool(on_front.get(a, False)), "row": row_name(a, reached),
    })
  front = sorted((c for c in candidates if c["on_front"]), key=lambda c: c["num_params"])
  report = {"strategy": s.strategy, "seed": int(config.seed), "rungs": list(s.rungs), "eta": s.eta,
            "teacher": s.teacher, "terms": s.terms.to_dict(), "candidates": candidates, "front": front}
  import jax

  if jax.process_index() == 0:
    write(report, workdir)
  return report


def write(report: dict, workdir: str) -> None:
  with open(os.path.join(workdir, "search.json.tmp"), "w") as f:
    json.dump(report, f, indent=2)
  os.replace(os.path.join(workdir, "search.json.tmp"), os.path.join(workdir, "search.json"))
  fields = ["name", "widths", "depth", "num_params", "rung", "epochs", "test_accuracy", "on_front", "row"]
  with open(os.path.join(workdir, "search.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for c in report["candidates"]:
      writer.writerow({**{k: c[k] for k in fields}, "widths": "x".join(map(str, c["widths"]))})
  plot(report, os.path.join(workdir, "pareto.png"))


def plot(report: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  last = len(report["rungs"]) - 1
  fig, ax = plt.subplots(figsize=(7, 4.5))
  stopped = [c for c in report["candidates"] if c["rung"] < last]
  finals = [c for c in report["candidates"] if c["rung"] == last]
  if stopped:
    ax.scatter([c["num_params"] for c in stopped], [100 * c["test_accuracy"] for c in stopped], c="0.6",
               marker="x", label="stopped early (accuracy at its last rung)")
  ax.scatter([c["num_params"] for c in finals], [100 * c["test_accuracy"] for c in finals], c="tab:blue",
             label=f"trained {sum(report['rungs'])} epochs")
  front = report["front"]
  ax.plot([c["num_params"] for c in front], [100 * c["test_accuracy"] for c in front], "o-", c="tab:red",
          mfc="none", ms=10, label="Pareto front")
  for c in front:
    ax.annotate(c["name"], (c["num_params"], 100 * c["test_accuracy"]), textcoords="offset points", xytext=(4, -10),
                fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{report['strategy']} search, {len(report['candidates'])} candidates, teacher {report['teacher']!r}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  config = FLAGS.config
  if FLAGS.candidates:
    config.search.candidates = FLAGS.candidates
  if FLAGS.strategy:
    config.search.strategy = FLAGS.strategy
  if FLAGS.seed is not None:
    config.seed = FLAGS.seed
  report = search(config, FLAGS.workdir)
  print("| candidate | parameters | test accuracy | epochs | on front |\n|---|---|---|---|---|")
  for c in sorted(report["candidates"], key=lambda c: c["num_params"]):
    print(f"| {c['name']} | {c['num_params']} | {100 * c['test_accuracy']:.2f}% | {c['epochs']} | "
          f"{'yes' if c['on_front'] else ''} |")
  print(f"front: {os.path.join(FLAGS.workdir, 'search.json')}  plot: {os.path.join(FLAGS.workdir, 'pareto.png')}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
