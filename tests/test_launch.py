"""experiments/launch/*.sh --dry-run: the full command sequence, each argument arriving whole on the workers."""
import os
import re
import shlex
import subprocess

import pytest

from tests.processes import REPO

LAUNCH = os.path.join(REPO, "experiments", "launch")
CONFIG = "experiments/configs/hinton_mnist.py"
OVERRIDE = '--config.rows.teacher.model_kwargs={"widths": [8, 8], "dropout": 0.5}'
with open(os.path.join(REPO, "constraints.txt")) as f:
  JAX_VERSION = re.search(r"^jax==(\S+)$", f.read(), re.M).group(1)


def dry_run(script, *args, env=None):
  out = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, check=True).stdout
  return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def train_argv(shell_command):
  """The experiments.main argv inside a worker's shell command (up to its redirection)."""
  tokens = shlex.split(shell_command)
  start = tokens.index("python3", tokens.index("nohup"))
  return tokens[start:tokens.index(">", start)]


@pytest.mark.parametrize("accelerator,tpu_type,runtime", [("v4-32", "v4-32", "tpu-ubuntu2204-base"),
                                                          ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                          ("v6e-8", "v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_vm_creates_copies_installs_and_starts_detached(accelerator, tpu_type, runtime):
  commands = dry_run("tpu_vm.sh", "kd-node", "us-central2-b", accelerator, CONFIG, "gs://bucket/my run", OVERRIDE)
  assert [c[:4] for c in commands] == [
      ["gcloud", "compute", "tpus", "tpu-vm"], ["tar", "czf", "/tmp/kd_jax_src.tgz", "-C"],
      ["gcloud", "compute", "tpus", "tpu-vm"], ["gcloud", "compute", "tpus", "tpu-vm"]]
  create, _, scp, ssh = commands
  assert create[4:] == ["create", "kd-node", "--zone", "us-central2-b", "--accelerator-type", tpu_type,
                        "--version", runtime]
  assert scp[4:7] == ["scp", "/tmp/kd_jax_src.tgz", "kd-node:~/"] and "--worker=all" in scp
  assert ssh[4:6] == ["ssh", "kd-node"] and "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  assert f"-c constraints.txt -e . 'jax[tpu]=={JAX_VERSION}'" in remote
  assert "setsid nohup" in remote and "> ~/kd_jax_logs/worker-$WORKER.log 2>&1 < /dev/null &" in remote
  assert train_argv(remote) == ["python3", "-m", "experiments.main", f"--config={CONFIG}",
                                "--workdir=gs://bucket/my run", "--multihost", OVERRIDE]


def test_tpu_vm_recreates_a_preempted_node():
  commands = dry_run("tpu_vm.sh", "kd-node", "z", "v5p-8", CONFIG, "gs://b/r", env={"TPU_STATE": "PREEMPTED"})
  assert commands[0][4:6] == ["delete", "kd-node"] and "--quiet" in commands[0]
  assert commands[1][4:6] == ["create", "kd-node"] and commands[1][-1] == "v2-alpha-tpuv5"
  assert dry_run("tpu_vm.sh", "kd-node", "z", "v4-8", CONFIG, "gs://b/r", env={"TPU_STATE": "READY"})[0][0] == "tar"


def test_tpu_vm_queued_spot_request():
  commands = dry_run("tpu_vm.sh", "--queued", "--spot", "--project", "my proj", "kd-node", "z", "v6e-8", CONFIG,
                     "gs://b/r")
  create = next(c for c in commands if c[3:5] == ["queued-resources", "create"])
  assert create[5:] == ["kd-node-qr", "--node-id", "kd-node", "--zone", "z", "--project", "my proj",
                        "--accelerator-type", "v6e-8", "--runtime-version", "v2-alpha-tpuv6e", "--spot"]


def test_tpu_vm_refuses_an_unknown_accelerator():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "n", "z", "v3-8", CONFIG, "w"],
                       capture_output=True, text=True)
  assert out.returncode == 2 and "unknown accelerator type v3-8" in out.stderr


def test_multi_gpu_two_hosts_one_process_each():
  commands = dry_run("multi_gpu.sh", "--hosts", "gpu-a,gpu-b", "--install", CONFIG, "/shared/my run", OVERRIDE)
  assert [c[:2] for c in commands] == [["ssh", "gpu-a"], ["ssh", "gpu-b"]]
  for i, (_, _, remote) in enumerate(commands):
    install = shlex.split(remote)[shlex.split(remote).index("pip"):]
    assert install[:7] == ["pip", "install", "-q", "-c", "constraints.txt", "-e", "."]
    assert install[7] == f"jax[cuda12]=={JAX_VERSION}"
    assert train_argv(remote) == ["python3", "-m", "experiments.main", f"--config={CONFIG}", "--workdir=/shared/my run",
                                  OVERRIDE, "--coordinator_address=gpu-a:12355", "--num_processes=2",
                                  f"--process_id={i}"]
    assert shlex.split(remote)[-6:] == [">", f"/shared/my run.logs/worker-{i}.log", "2>&1", "<", "/dev/null", "&"]


def test_multi_gpu_slurm_job(tmp_path):
  (mkdir, sbatch) = dry_run("multi_gpu.sh", "--slurm", "2", "--port", "23456", CONFIG, "/shared/my run", OVERRIDE)
  assert mkdir == ["mkdir", "-p", "/shared/my run.logs"]
  assert sbatch[:5] == ["sbatch", "--job-name=kd_jax", "--nodes=2", "--ntasks-per-node=1",
                        "--output=/shared/my run.logs/job-%j.log"]
  job = shlex.split(sbatch[sbatch.index("--wrap") + 1])
  srun = job[job.index("srun"):]
  assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--output=/shared/my run.logs/worker-%t.log"]
  # The task as srun runs it on node 2 of 2: stand-ins for scontrol and python3 print what they receive.
  (tmp_path / "scontrol").write_text('#!/bin/sh\nprintf "node-a\\nnode-b\\n"\n')
  (tmp_path / "python3").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
  for stub in ("scontrol", "python3"):
    os.chmod(tmp_path / stub, 0o755)
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
         "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
  argv = subprocess.run(srun[srun.index("bash"):], env=env, capture_output=True, text=True, check=True).stdout
  assert argv.splitlines() == ["-m", "experiments.main", f"--config={CONFIG}", "--workdir=/shared/my run", OVERRIDE,
                               "--coordinator_address=node-a:23456", "--num_processes=2", "--process_id=1"]


def test_multi_gpu_one_host():
  (mkdir, start) = [line for line in subprocess.run(
      ["bash", os.path.join(LAUNCH, "multi_gpu.sh"), "--dry-run", CONFIG, "/tmp/my run", OVERRIDE],
      capture_output=True, text=True, check=True).stdout.splitlines() if not line.startswith("#")]
  assert shlex.split(mkdir) == ["mkdir", "-p", "/tmp/my run.logs"]
  assert train_argv(start) == ["python3", "-m", "experiments.main", f"--config={CONFIG}", "--workdir=/tmp/my run",
                               OVERRIDE]
