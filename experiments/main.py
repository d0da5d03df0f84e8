r"""Runs every row of a table config: `kd_jax.train.run(config, workdir)`.

  python -m experiments.main --config=experiments/configs/hinton_mnist.py --workdir=/tmp/hinton
  python -m experiments.main --config=experiments/configs/hinton_mnist.py:student_kd --workdir=/tmp/hinton \
      --config.epochs=3 --config.seed=1

Running the same command again resumes an interrupted run and skips finished rows.
On several hosts (TPU VM pod slice, GPU cluster) add --multihost on every host.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A table config file (experiments/configs/*.py[:row]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (cluster auto-detection).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a manual multi-process start.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for a manual multi-process start.")
flags.DEFINE_integer("process_id", None, "This process's index, for a manual multi-process start.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def format_results(results) -> str:
  lines = ["| row | model | test accuracy | test errors | epochs |", "|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['model']} | {100 * r['test_accuracy']:.2f}% | {r['test_errors']} | {r['epochs']} |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  from kd_jax.train import distributed

  distributed.initialize(multihost=FLAGS.multihost, coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  import jax

  from kd_jax import train

  results = train.run(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(format_results(results))
    sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
