"""Training subprocesses (`python -m experiments.main`) for the reliability and multi-process tests."""
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tests", "configs", "tiny_digits.py")


class Run:
  """A training subprocess whose output goes to a file (a pipe could fill up and stall it)."""

  def __init__(self, workdir, *flags, env=None):
    config = [] if any(f.startswith("--config=") for f in flags) else [f"--config={CONFIG}"]
    cmd = [sys.executable, "-m", "experiments.main", *config, f"--workdir={workdir}", *flags]
    full_env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    self.log_path = os.path.join(workdir + ".logs", f"{time.time_ns()}.log")
    os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
    self._log = open(self.log_path, "w")
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

  def poll(self):
    return self.proc.poll()

  def wait(self, timeout=300):
    code = self.proc.wait(timeout=timeout)
    self._log.close()
    return code

  def output(self):
    with open(self.log_path) as f:
      return f.read()


launch = Run


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]
