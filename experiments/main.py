r"""Runs every row of a table config: `kd_jax.train.run(config, workdir)`.

  python -m experiments.main --config=experiments/configs/hinton_mnist.py --workdir=/tmp/hinton
  python -m experiments.main --config=experiments/configs/hinton_mnist.py:student_kd --workdir=/tmp/hinton \
      --config.epochs=3 --config.seed=1
  python -m experiments.main --config=experiments/configs/hinton_mnist.py --list_rows
  python -m experiments.main --config=experiments/configs/hinton_mnist.py:student_kd --print_config

Running the same command again resumes an interrupted run and skips finished rows.
The workdir gets results.json, REPORT.md (the table of `experiments.reproduce`, one
seed) and accuracy.png. A mistake in the config or a flag prints one line and exits
with status 2 (`--verbose`: the traceback). On several hosts (TPU VM pod slice, GPU
cluster) add --multihost on every host.
"""
from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A table config file (experiments/configs/*.py[:row]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("print_config", False, "Print the resolved config (every row and key, after the overrides), "
                  "check it, and exit.")
flags.DEFINE_bool("list_rows", False, "List the config's rows (model, teacher, loss terms, epochs) and exit.")
flags.DEFINE_bool("verbose", False, "Show tracebacks of config mistakes, and INFO logs.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (cluster auto-detection).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a manual multi-process start.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for a manual multi-process start.")
flags.DEFINE_integer("process_id", None, "This process's index, for a manual multi-process start.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def format_results(results) -> str:
  lines = ["| row | model | test accuracy | test errors | epochs |", "|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['model']} | {100 * r['test_accuracy']:.2f}% | {r['test_errors']} | {r['epochs']} |")
  return "\n".join(lines)


def list_rows(config) -> str:
  """One line per row, in training order: model, teacher or peers, loss terms (with weights), epochs."""
  from kd_jax.train import config as config_lib

  lines = []
  for name in config_lib.row_order(config):
    r = config.rows[name]
    terms = ",".join(f"{t}" + (f"*{o['weight']}" if "weight" in o else "") for t, o in r.terms.items())
    source = f" teacher={r.teacher.row}" if r.teacher.row else (
        f" peers={r.peers.count}" if r.peers.count > 1 else "")
    lines.append(f"{name}: model={r.model}{source} terms={terms} epochs={config_lib.row_epochs(config, name)}"
                 + (f" init={r.init['from']}" if r.init["from"] else ""))
  return "\n".join(lines)


def main(argv):
  del argv
  from kd_jax import cli

  if not FLAGS.verbose:
    cli.quiet_logs()
  if FLAGS.print_config or FLAGS.list_rows:
    from kd_jax.train import config as config_lib

    config_lib.validate(FLAGS.config)
    print(FLAGS.config if FLAGS.print_config else list_rows(FLAGS.config))
    return 0
  if not FLAGS.workdir:
    raise flags.ValidationError("--workdir is required to train (or use --print_config / --list_rows)")
  from kd_jax.train import distributed

  distributed.initialize(multihost=FLAGS.multihost, coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  import jax

  from kd_jax import train

  from . import reproduce

  results = train.run(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    command = "python -m experiments.main " + " ".join(sys.argv[1:])
    reproduce.write_report(FLAGS.config, {FLAGS.config.seed: results}, FLAGS.workdir, command)
    print(format_results(results))
    print(f"report: {FLAGS.workdir}/REPORT.md  plot: {FLAGS.workdir}/accuracy.png")
    sys.stdout.flush()
  return 0


if __name__ == "__main__":
  from kd_jax import cli

  cli.run_app(main)
