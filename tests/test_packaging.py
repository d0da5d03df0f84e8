"""`pip install .` in a fresh virtualenv: only kd_jax lands on the path, and `kd-jax train` finds the shipped
configs by short name from `/` (slow: an install and a short training run, about a minute on 2 cores)."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_install_puts_only_kd_jax_on_the_path_and_the_cli_runs_from_root(tmp_path):
  source = tmp_path / "src"  # a copy of the tracked files: the build leaves build/ and *.egg-info behind
  tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
  for path in tracked:
    if os.path.exists(os.path.join(REPO, path)):
      os.makedirs(source / os.path.dirname(path), exist_ok=True)
      shutil.copy2(os.path.join(REPO, path), source / path)
  venv = tmp_path / "venv"
  subprocess.run([os.path.join(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}"),
                  "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  # The dependencies from this environment's site-packages, as a plain path: its .pth files (an editable
  # install of this checkout) are not processed, so nothing of the checkout leaks in.
  with open(os.path.join(site, "deps.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                  "--no-build-isolation", str(source)], check=True, capture_output=True)
  assert sorted(p for p in os.listdir(site) if not p.endswith(".pth")) == ["kd_jax", "kd_jax-0.1.0.dist-info"]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  found = subprocess.run(
      [python, "-c", "import importlib.util as u; print([m for m in ('kd_jax', 'experiments', 'third_party', "
       "'kd_jax.experiments.configs') if u.find_spec(m)])"], cwd="/", env=env, capture_output=True, text=True,
      check=True).stdout
  assert found.strip() == "['kd_jax', 'kd_jax.experiments.configs']"
  workdir = tmp_path / "run"
  run = subprocess.run([str(venv / "bin" / "kd-jax"), "train", "digits_demo:student", f"--workdir={workdir}",
                        "--config.max_steps=2"], cwd="/", env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| student | mlp |" in run.stdout
  assert {"results.json", "REPORT.md", "accuracy.png"} <= set(os.listdir(workdir))
  with open(os.path.join(site, "kd_jax-0.1.0.dist-info", "METADATA")) as f:
    metadata = f.read()
  assert "Author: kd_jax developers" in metadata and "License: Apache-2.0" in metadata
  assert os.path.exists(os.path.join(site, "kd_jax-0.1.0.dist-info", "licenses", "LICENSE"))
