#!/usr/bin/env bash
# Runs one kd_jax experiment on every worker of a Cloud TPU VM (single host or pod slice).
#
#   experiments/launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [extra flags...]
#   experiments/launch/tpu_vm.sh kd-v4 us-central2-b v4-32 experiments/configs/hinton_mnist.py /mnt/shared/hinton
#
# Creates the TPU VM if it does not exist, copies this checkout to every worker,
# installs kd_jax with JAX for TPU, and starts the same command on all workers
# (`--multihost` makes each call jax.distributed.initialize()). WORKDIR must be a
# directory every worker sees (a shared filesystem such as Filestore or a gcsfuse
# mount): checkpoints are written there, and re-running this script after a
# preemption resumes from the last one. Results: WORKDIR/results.json.
set -euo pipefail
NAME=$1; ZONE=$2; ACCELERATOR=$3; CONFIG=$4; WORKDIR=$5; shift 5
RUNTIME=${TPU_RUNTIME:-tpu-ubuntu2204-base}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
tar czf /tmp/kd_jax_src.tgz --exclude=.venv --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/kd_jax_src.tgz "$NAME":~/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/kd_jax && tar xzf ~/kd_jax_src.tgz -C ~/kd_jax && cd ~/kd_jax
  python3 -m pip install -q -e . 'jax[tpu]'
  python3 -m experiments.main --config=$CONFIG --workdir=$WORKDIR --multihost $*"
