r"""Runs every row of a table config for several seeds and reports mean ± std.

  python -m experiments.reproduce --config=experiments/configs/hinton_mnist.py --seeds=3 --workdir=/tmp/hinton

Each seed trains in `<workdir>/seed_<s>/` (finished rows are skipped, an
interrupted one resumes), then `<workdir>/REPORT.md` gets a markdown table
(row, paper figure, ours at the LAST epoch as mean ± std over seeds, best epoch
for reference only, seeds, wall time, device) and `<workdir>/accuracy.png` the
test accuracy over epochs per row (mean with a ±std band).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags():
  """The CLI's flags, defined only when run as a script: experiments.main imports the report code and
  has its own --config."""
  config_flags.DEFINE_config_file("config", None, "A table config file (experiments/configs/*.py[:rows]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the runs and the report.")
  flags.DEFINE_integer("seeds", 3, "Number of seeds: 0 .. seeds-1 (plus --first_seed).")
  flags.DEFINE_integer("first_seed", 0, "The first seed.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks of config mistakes, and INFO logs.")
  flags.mark_flags_as_required(["config", "workdir"])


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def summarize(config, per_seed: dict[int, dict[str, dict]]) -> list[dict]:
  """One summary per row: last-epoch mean/std over seeds, best epoch, time."""
  rows = []
  for name in config.rows:
    results = [r[name] for r in per_seed.values() if name in r]
    acc = _mean_std([100 * r["test_accuracy"] for r in results])
    errors = _mean_std([r["test_errors"] for r in results])
    best = _mean_std([100 * r["best_test_accuracy"] for r in results])
    rows.append({
        "row": name, "paper": config.rows[name].paper, "accuracy": acc, "errors": errors, "best_accuracy": best,
        "seeds": len(results), "wall_time_s": float(np.mean([r["wall_time_s"] for r in results])),
        "device": results[0].get("device", "?"), "epochs": results[0]["epochs"], "model": results[0]["model"],
        "history": [r["history"] for r in results],
    })
  return rows


def versus_paper(config, r: dict) -> str:
  """ours − paper in the paper's metric, flagged when the gap exceeds two standard deviations."""
  try:
    paper = float(r["paper"])
  except ValueError:
    return "–"
  mean, std = r["errors"] if config.paper_metric == "test_errors" else r["accuracy"]
  gap = mean - paper
  if r["seeds"] < 2:
    flag = " (1 seed: no spread to judge it by)" if gap else ""
  else:
    flag = " (more than 2 std)" if abs(gap) > 2 * std else ""
  return f"{gap:+.2f}{flag}"


def versus_baseline(config, r: dict, base: dict | None) -> str:
  """ours − the baseline row in the paper's metric, flagged where the difference of the means exceeds two
  standard errors (sqrt(s1²/n1 + s0²/n0): Welch's, over seeds)."""
  if base is None or r["row"] == base["row"]:
    return "–"
  key = "errors" if config.paper_metric == "test_errors" else "accuracy"
  (mean, std), (base_mean, base_std) = r[key], base[key]
  gap = mean - base_mean
  if min(r["seeds"], base["seeds"]) < 2:
    return f"{gap:+.2f}" + (" (1 seed: no spread to judge it by)" if gap else "")
  se = float(np.sqrt(std ** 2 / r["seeds"] + base_std ** 2 / base["seeds"]))
  return f"{gap:+.2f}" + (" (more than 2 SE)" if abs(gap) > 2 * se else "")


def markdown(config, rows: list[dict], command: str) -> str:
  metric = "test errors" if config.paper_metric == "test_errors" else "test accuracy (%)"
  baseline = config.get("baseline_row", "")
  base = next((r for r in rows if r["row"] == baseline), None)
  lines = [
      f"Command: `{command}`", "",
      f"| row | model | paper ({metric}) | ours: test accuracy (%), last epoch | ours: test errors, last epoch "
      "| ours − paper |" + (f" ours − {baseline} |" if base else "") +
      " best epoch acc. (reference only) | seeds | epochs | wall time / seed | device |",
      "|---|---|---|---|---|---|" + ("---|" if base else "") + "---|---|---|---|---|",
  ]
  for r in rows:
    paper = r["paper"] if r["paper"] != "" else "–"
    lines.append(
        f"| {r['row']} | {r['model']} | {paper} | {r['accuracy'][0]:.2f} ± {r['accuracy'][1]:.2f} "
        f"| {r['errors'][0]:.1f} ± {r['errors'][1]:.1f} | {versus_paper(config, r)} |"
        + (f" {versus_baseline(config, r, base)} |" if base else "") +
        f" {r['best_accuracy'][0]:.2f} | {r['seeds']} | {r['epochs']} | {r['wall_time_s']:.0f} s | {r['device']} |")
  if base:
    lines += ["", f"`ours − {baseline}`: the difference of the last-epoch means in {metric}, flagged where it "
              "exceeds two standard errors of the difference over seeds."]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    histories = [h for h in r["history"] if h]
    if not histories:
      continue
    length = min(len(h) for h in histories)
    epochs = [e["epoch"] for e in histories[0][:length]]
    acc = np.asarray([[100 * e["test_accuracy"] for e in h[:length]] for h in histories])
    mean, std = acc.mean(0), acc.std(0)
    ax.plot(epochs, mean, label=r["row"], marker="o" if len(epochs) == 1 else None)  # one point: no line
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.25)
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3)
  if ax.lines:  # rows without a history (a run shorter than an epoch) leave nothing to label
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def reproduce(config, workdir: str, *, seeds: int, first_seed: int = 0, command: str = "") -> list[dict]:
  import jax

  from kd_jax import train

  per_seed = {}
  for i, seed in enumerate(range(first_seed, first_seed + seeds)):
    if jax.process_index() == 0:
      print(f"seed {seed} ({i + 1}/{seeds}): {os.path.join(workdir, f'seed_{seed}')}", flush=True)
    seed_config = copy.deepcopy(config)
    seed_config.seed = seed
    per_seed[seed] = train.run(seed_config, os.path.join(workdir, f"seed_{seed}"))
  rows = summarize(config, per_seed)
  if jax.process_index() == 0:
    write_report(config, per_seed, workdir, command, rows=rows)
  return rows


def write_report(config, per_seed: dict[int, dict[str, dict]], workdir: str, command: str,
                 rows: list[dict] | None = None) -> list[dict]:
  """REPORT.md, summary.json and accuracy.png in `workdir` from {seed: train.run's results}."""
  rows = summarize(config, per_seed) if rows is None else rows
  with open(os.path.join(workdir, "REPORT.md"), "w") as f:
    f.write(markdown(config, rows, command))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump([{k: v for k, v in r.items() if k != "history"} for r in rows], f, indent=2)
  plot(rows, os.path.join(workdir, "accuracy.png"))
  return rows


def main(argv):
  del argv
  from kd_jax import cli

  if not FLAGS.verbose:
    cli.quiet_logs()
  command = "python -m experiments.reproduce " + " ".join(sys.argv[1:])
  rows = reproduce(FLAGS.config, FLAGS.workdir, seeds=FLAGS.seeds, first_seed=FLAGS.first_seed, command=command)
  print(markdown(FLAGS.config, rows, command))
  print(f"report: {os.path.join(FLAGS.workdir, 'REPORT.md')}  plot: {os.path.join(FLAGS.workdir, 'accuracy.png')}"
        f"  ({platform.node()})")


if __name__ == "__main__":
  from kd_jax import cli

  _define_flags()
  cli.run_app(main)
