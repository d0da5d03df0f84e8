#!/usr/bin/env bash
# Runs one kd_jax experiment on GPUs: one host, several hosts over ssh, or a SLURM allocation.
#
#   experiments/launch/multi_gpu.sh [options] CONFIG WORKDIR [extra experiments.main flags...]
#
#   one host (default): one process sees every local GPU and shards the batch over them
#   --hosts h1,h2,...   one process per host, started over ssh in the same checkout path on each host
#                       (a shared filesystem or the same clone); h1 is jax.distributed's coordinator
#   --slurm N           submits (sbatch) a job of N nodes, one task per node; the tasks find the coordinator
#                       (the job's first node) and their ids from SLURM's variables
# Options:
#   --port P            the coordinator's port (default 12355)
#   --install           first install this checkout with the versions of constraints.txt (JAX for CUDA 12)
#   --logs DIR          per-process logs (default: WORKDIR.logs, or ./kd_jax_logs for a gs:// WORKDIR)
#   --dry-run           print every command (shell-quoted, copy-pasteable) instead of running it
#
# Every mode runs detached (nohup/setsid, or a SLURM job) with one log per process: worker-<i>.log. Re-running
# the same command resumes from WORKDIR's checkpoints.
set -euo pipefail

DRY_RUN=0; INSTALL=0; HOSTS=""; SLURM_NODES=""; PORT=12355; LOGS=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    --hosts) HOSTS=$2; shift ;;
    --slurm) SLURM_NODES=$2; shift ;;
    --port) PORT=$2; shift ;;
    --logs) LOGS=$2; shift ;;
    --) shift; break ;;
    *) echo "multi_gpu.sh: unknown option $1 (known: --hosts H1,H2 --slurm N --port P --install --logs DIR" \
            "--dry-run)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then
  echo "usage: multi_gpu.sh [--hosts H1,H2 | --slurm N] [--port P] [--install] [--logs DIR] [--dry-run] CONFIG" \
       "WORKDIR [flags...]" >&2
  exit 2
fi
if [[ -n $HOSTS && -n $SLURM_NODES ]]; then
  echo "multi_gpu.sh: --hosts and --slurm exclude each other" >&2; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
EXTRA=("$@")
HERE=$(cd "$(dirname "$0")/../.." && pwd)
if [[ -z $LOGS ]]; then
  if [[ $WORKDIR == *://* ]]; then LOGS=$PWD/kd_jax_logs; else LOGS=$WORKDIR.logs; fi
fi
JAX_VERSION=$(sed -nE 's/^jax==([^ ;]+).*/\1/p' "$HERE/constraints.txt")

run() {
  printf '%q ' "$@" | sed 's/ $//'; echo
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

q() { printf '%q ' "$@" | sed 's/ $//'; }

INSTALL_CMD=$(q python3 -m pip install -q -c constraints.txt -e . "jax[cuda12]==$JAX_VERSION")
TRAIN=(python3 -m experiments.main "--config=$CONFIG" "--workdir=$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})

if [[ -n $HOSTS ]]; then
  IFS=, read -r -a HOST_LIST <<< "$HOSTS"
  COORDINATOR=${HOST_LIST[0]}:$PORT
  for i in "${!HOST_LIST[@]}"; do
    remote="set -e; cd $(q "$HERE") && mkdir -p $(q "$LOGS")"
    [[ $INSTALL == 1 ]] && remote+=" && $INSTALL_CMD"
    remote+=" && setsid nohup $(q "${TRAIN[@]}" "--coordinator_address=$COORDINATOR" \
      "--num_processes=${#HOST_LIST[@]}" "--process_id=$i") > $(q "$LOGS/worker-$i.log") 2>&1 < /dev/null &"
    run ssh "${HOST_LIST[$i]}" "$remote"
  done
elif [[ -n $SLURM_NODES ]]; then
  # Each task's id and the coordinator are read inside the task (single quotes keep them unexpanded here).
  task="cd $(q "$HERE") && exec $(q "${TRAIN[@]}")"
  task+=' --coordinator_address="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)":'"$PORT"
  task+=' --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'
  job="set -e; mkdir -p $(q "$LOGS")"
  [[ $INSTALL == 1 ]] && job+=" && cd $(q "$HERE") && $INSTALL_CMD"
  job+=" && srun --nodes=$SLURM_NODES --ntasks-per-node=1 --output=$(q "$LOGS/worker-%t.log") bash -c $(q "$task")"
  run mkdir -p "$LOGS"
  run sbatch --job-name=kd_jax --nodes="$SLURM_NODES" --ntasks-per-node=1 --output="$LOGS/job-%j.log" --wrap "$job"
else
  run mkdir -p "$LOGS"
  if [[ $INSTALL == 1 ]]; then
    (cd "$HERE" && run python3 -m pip install -q -c constraints.txt -e . "jax[cuda12]==$JAX_VERSION")
  fi
  echo "# log: $LOGS/worker-0.log"
  if [[ $DRY_RUN == 1 ]]; then
    echo "cd $(q "$HERE") && setsid nohup $(q "${TRAIN[@]}") > $(q "$LOGS/worker-0.log") 2>&1 < /dev/null &"
  else
    (cd "$HERE" && setsid nohup "${TRAIN[@]}" > "$LOGS/worker-0.log" 2>&1 < /dev/null &)
  fi
fi
