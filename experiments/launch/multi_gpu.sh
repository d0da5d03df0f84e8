#!/usr/bin/env bash
# One host, all its GPUs: a single process sees every local GPU and shards the batch over them.
#   experiments/launch/multi_gpu.sh CONFIG WORKDIR [extra flags...]
# Several hosts (e.g. SLURM): start one process per host with `--multihost`, or pass
# --coordinator_address=HOST:PORT --num_processes=N --process_id=I on each.
set -euo pipefail
CONFIG=$1; WORKDIR=$2; shift 2
exec python3 -m experiments.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
