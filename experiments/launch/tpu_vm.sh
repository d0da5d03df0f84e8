#!/usr/bin/env bash
# Runs one kd_jax experiment on every worker of a Cloud TPU VM (single host or pod slice), detached.
#
#   experiments/launch/tpu_vm.sh [options] NAME ZONE ACCELERATOR CONFIG WORKDIR [extra experiments.main flags...]
#   experiments/launch/tpu_vm.sh kd-v4 us-central2-b v4-32 experiments/configs/hinton_mnist.py gs://my-bucket/hinton
#
# Options:
#   --dry-run        print every command (shell-quoted, copy-pasteable) instead of running it
#   --spot           a Spot VM (preemptible; cheaper)
#   --queued         ask through queued resources (waits for capacity; with --spot: a Spot request)
#   --project P      the Google Cloud project (default: gcloud's)
#   --watch          after the launch, check the node every 5 minutes: a PREEMPTED node is recreated and the
#                    run relaunched (it resumes from WORKDIR's checkpoints) until WORKDIR/results.json exists
#
# ACCELERATOR is the TPU type (v4-32, v5litepod-16 or v5e-16, v5p-8, v6e-8); the TPU VM runtime is chosen
# from it. A node that does not exist is created; a PREEMPTED or TERMINATED node is deleted and created
# again. This checkout is copied to every worker and installed with the versions of constraints.txt (JAX
# for TPU at the pinned JAX version). The run starts detached on every worker (`--multihost`: each calls
# jax.distributed.initialize()), its output in ~/kd_jax_logs/worker-<i>.log on worker i; a dropped ssh
# does not stop it. WORKDIR should be on Cloud Storage (gs://...): no shared filesystem is needed.
# Re-running the script resumes the run from the last checkpoint. Results: WORKDIR/results.json.
set -euo pipefail

DRY_RUN=0; SPOT=0; QUEUED=0; WATCH=0; PROJECT=()
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --watch) WATCH=1 ;;
    --project) PROJECT=(--project "$2"); shift ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (known: --dry-run --spot --queued --project P --watch)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 5 ]]; then
  echo "usage: tpu_vm.sh [--dry-run] [--spot] [--queued] [--project P] [--watch] NAME ZONE ACCELERATOR CONFIG" \
       "WORKDIR [flags...]" >&2
  exit 2
fi
NAME=$1; ZONE=$2; ACCELERATOR=$3; CONFIG=$4; WORKDIR=$5; shift 5
EXTRA=("$@")
HERE=$(cd "$(dirname "$0")/../.." && pwd)

# v5e's documented type is v5litepod-N; accept v5e-N too.
[[ $ACCELERATOR == v5e-* ]] && ACCELERATOR=v5litepod-${ACCELERATOR#v5e-}
# The TPU VM software version each generation needs (cloud.google.com/tpu/docs/runtimes).
case $ACCELERATOR in
  v4-*) RUNTIME=tpu-ubuntu2204-base ;;
  v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
  *) echo "tpu_vm.sh: unknown accelerator type $ACCELERATOR (known: v4-N, v5litepod-N or v5e-N, v5p-N, v6e-N)" >&2
     exit 2 ;;
esac
RUNTIME=${TPU_RUNTIME:-$RUNTIME}
JAX_VERSION=$(sed -nE 's/^jax==([^ ;]+).*/\1/p' "$HERE/constraints.txt")
if [[ -z $JAX_VERSION ]]; then
  echo "tpu_vm.sh: no jax==VERSION line in $HERE/constraints.txt" >&2; exit 2
fi

# Prints a command shell-quoted; runs it unless --dry-run.
run() {
  printf '%q ' "$@" | sed 's/ $//'; echo
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

node_state() {
  # --dry-run: TPU_STATE (default NOT_FOUND) stands for the node's state.
  if [[ $DRY_RUN == 1 ]]; then echo "${TPU_STATE:-NOT_FOUND}"; return; fi
  gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" "${PROJECT[@]}" --format='value(state)' 2>/dev/null \
    || echo NOT_FOUND
}

create_node() {
  local spot=()
  [[ $SPOT == 1 ]] && spot=(--spot)
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME-qr" --zone "$ZONE" "${PROJECT[@]}" --quiet --force \
      || true
    run gcloud compute tpus queued-resources create "$NAME-qr" --node-id "$NAME" --zone "$ZONE" "${PROJECT[@]}" \
      --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${spot[@]}"
    echo "# waiting until queued resource $NAME-qr is ACTIVE"
    if [[ $DRY_RUN == 0 ]]; then
      until [[ $(gcloud compute tpus queued-resources describe "$NAME-qr" --zone "$ZONE" "${PROJECT[@]}" \
                 --format='value(state.state)') == ACTIVE ]]; do sleep 60; done
    fi
  else
    run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" "${PROJECT[@]}" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${spot[@]}"
  fi
}

ensure_node() {
  local state
  state=$(node_state)
  echo "# node $NAME: $state"
  case $state in
    READY) ;;
    NOT_FOUND) create_node ;;
    PREEMPTED|TERMINATED)
      run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" "${PROJECT[@]}" --quiet
      create_node ;;
    *) echo "tpu_vm.sh: node $NAME is $state; wait until it is READY (or delete it) and run again" >&2; exit 1 ;;
  esac
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJECT[@]}" --worker=all --command "$1"
}

launch() {
  local train remote
  ensure_node
  run tar czf /tmp/kd_jax_src.tgz -C "$HERE" --exclude=.venv --exclude=.git .
  run gcloud compute tpus tpu-vm scp /tmp/kd_jax_src.tgz "$NAME:~/" --zone "$ZONE" "${PROJECT[@]}" --worker=all
  # Every argument reaches the worker's shell quoted (a workdir with a space, a JSON-valued override).
  train=$(printf '%q ' python3 -m experiments.main "--config=$CONFIG" "--workdir=$WORKDIR" --multihost \
          ${EXTRA[@]+"${EXTRA[@]}"})
  remote="set -e; rm -rf ~/kd_jax && mkdir -p ~/kd_jax ~/kd_jax_logs && tar xzf ~/kd_jax_src.tgz -C ~/kd_jax"
  remote+=" && cd ~/kd_jax && python3 -m pip install -q -c constraints.txt -e . 'jax[tpu]==$JAX_VERSION'"
  remote+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  remote+=" && WORKER=\$(curl -s -H Metadata-Flavor:Google"
  remote+=" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"
  remote+=" && setsid nohup $train> ~/kd_jax_logs/worker-\$WORKER.log 2>&1 < /dev/null &"
  ssh_all "$remote"
  echo "# logs: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=all --command 'tail -n 5 ~/kd_jax_logs/*.log'"
}

launch
if [[ $WATCH == 1 && $DRY_RUN == 0 ]]; then
  RESULTS=$WORKDIR/results.json
  while sleep 300; do
    if [[ $RESULTS == gs://* ]] && gcloud storage ls "$RESULTS" >/dev/null 2>&1; then break; fi
    if [[ $RESULTS != gs://* ]] && [[ -e $RESULTS ]]; then break; fi
    case $(node_state) in PREEMPTED|TERMINATED|NOT_FOUND) echo "# $NAME was preempted: relaunching"; launch ;; esac
  done
  echo "# done: $RESULTS"
fi
