"""The experiment CLI as a user meets it: one-line config errors, --print_config, --list_rows.

The cases run in ONE subprocess (JAX is imported once) that calls `experiments.main`'s absl
entry point in a loop, catching its exit.
"""
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "experiments/configs/digits_demo.py"

# A user's own config with mistakes the overrides cannot make (they only reach existing keys).
BAD_CONFIG = '''
from kd_jax.train.tables import select_rows
from kd_jax.train import base_config, row


def get_config(mistake=""):
  c = base_config()
  c.epochs = 1
  terms = {"ce": {}}
  if mistake == "term":
    terms = {"ce": {}, "kdd": {"temperature": 4.0}}
  if mistake == "term_option":
    terms = {"ce": {}, "kd": {"temprature": 4.0}}
  c.rows.student = row(model="mlp", terms=terms, teacher="teacher" if mistake else "")
  c.rows.teacher = row(model="mlp", terms={"ce": {}})
  if mistake == "value":
    c.rows.student.optimizer.learning_rate = "fast"
  return c
'''

DRIVER = r'''
import contextlib, io, json, sys
from absl import app
from experiments import main as cli_main
from kd_jax import cli

out = []
for argv in json.loads(sys.argv[1]):
  stderr, stdout = io.StringIO(), io.StringIO()
  code, error = 0, ""
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
    try:
      cli.run_app(cli_main.main, ["main", *argv])
    except SystemExit as e:
      code = e.code
    except Exception as e:  # --verbose: the exception itself
      code, error = 1, type(e).__name__
  out.append({"code": code, "stderr": stderr.getvalue(), "stdout": stdout.getvalue(), "raised": error})
print("RESULTS" + json.dumps(out))
'''


def _run_cases(tmp_path, cases):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULTS", 1)[1])


def test_config_mistakes_are_one_line_and_print_config_lists_rows(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(textwrap.dedent(BAD_CONFIG))
  work = f"--workdir={tmp_path / 'w'}"
  mistakes = [  # (argv, what the one line must name)
      ([f"--config={DEMO}", "--config.epoch=3", work], ["'epoch'", "--config.epoch", '"epochs"']),
      ([f"--config={DEMO}:studnt", work], ["'studnt'", "student_kd"]),
      ([f"--config={DEMO}", "--config.rows.student.model=mlpp", work], ["'mlpp'", "Did you mean 'mlp'"]),
      ([f"--config={bad}:term", work], ["rows.student.terms", "'kdd'", "Did you mean 'kd'"]),
      ([f"--config={bad}:term_option", work], ["rows.student.terms", "'temprature'", "temperature"]),
      ([f"--config={DEMO}:student", "--config.rows.student.optimizer.name=adamm", "--config.max_steps=1", work],
       ["'adamm'", "optimizer", "adamw"]),
      ([f"--config={DEMO}", "--config.data.name=mnistt", work], ["'mnistt'", "did you mean 'mnist'"]),
      ([f"--config={DEMO}", "--config.epochs=abc", work], ["--config.epochs=abc", "int"]),
      ([f"--config={DEMO}", "--config.data.batch_size=1.5", work], ["--config.data.batch_size=1.5"]),
      ([f"--config={DEMO}", "--config.max_steps=-1", work], ["max_steps", "-1"]),
      ([f"--config={DEMO}", "--config.rows.student.terms.ce.weigth=2", work],
       ["'weigth'", "--config.rows.student.terms.ce.weigth"]),
      ([f"--config={DEMO}", "--config.data.dataset=mnist", work], ["'dataset'", "--config.data.dataset"]),
  ]
  others = [
      [f"--config={DEMO}", "--config.epoch=3", work, "--verbose"],
      [f"--config={DEMO}:student_kd", "--config.max_steps=7", "--print_config"],
      [f"--config={DEMO}", "--list_rows"],
      [f"--config={DEMO}:student", "--config.rows.student.model=mlpp", "--list_rows"],
      ["--config=tests/configs/tiny_digits.py:teacher", "--config.epochs=1", f"--workdir={tmp_path / 'report'}"],
      # A list-valued option (stored as a tuple) overridden on the command line.
      ["--config=tests/configs/tiny_digits.py:teacher", "--config.max_steps=2", f"--workdir={tmp_path / 'lists'}",
       "--config.rows.teacher.model_kwargs.widths=(7, 5)"],
  ]
  results = _run_cases(tmp_path, [argv for argv, _ in mistakes] + others)
  for (argv, names), r in zip(mistakes, results):
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert r["code"] == 2, (argv, r)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, r["stderr"])
    for name in names:
      assert name in lines[0], (argv, name, lines[0])
    assert "Traceback" not in r["stderr"] and not r["stdout"], (argv, r)
  verbose, printed, listed, listed_bad, trained, overridden = results[len(mistakes):]
  assert overridden["code"] == 0, overridden
  model = json.loads((tmp_path / "lists" / "teacher" / "final" / "model.json").read_text())
  assert model["model_kwargs"]["widths"] == [7, 5]
  assert verbose["raised"] and verbose["code"] == 1  # the exception itself, for its traceback
  assert printed["code"] == 0 and not printed["stderr"].strip()
  text = printed["stdout"]
  assert "max_steps: 7" in text and "temperature: 8.0" in text
  assert "student_kd:" in text and "teacher:" in text and "\n  student:" not in text  # resolved rows only
  assert listed["code"] == 0
  assert listed["stdout"].splitlines() == [
      "teacher: model=mlp terms=ce epochs=100",
      "student: model=mlp terms=ce epochs=100",
      "student_kd: model=mlp teacher=teacher terms=ce*0.1,kd*0.9 epochs=100",
  ]
  assert listed_bad["code"] == 2 and "'mlpp'" in listed_bad["stderr"]  # listing checks the config too
  # A run writes reproduce's report for its one seed, and the plot.
  assert trained["code"] == 0, trained
  report = (tmp_path / "report" / "REPORT.md").read_text()
  assert "Command: `python -m experiments.main --config=tests/configs/tiny_digits.py:teacher" in report
  assert "| teacher | mlp | – |" in report and "| 1 | 1 |" in report  # 1 seed, 1 epoch
  assert (tmp_path / "report" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
  assert "| teacher | mlp |" in trained["stdout"] and "REPORT.md" in trained["stdout"]


def test_shipped_config_by_short_name(capsys):
  from kd_jax import cli

  assert "digits_demo" in cli.config_names() and "hinton_mnist" in cli.config_names()
  path = cli.config_path("digits_demo:student")
  assert path.endswith(os.path.join("configs", "digits_demo.py") + ":student") and os.path.isabs(path)
  assert cli.config_path("my/own.py:row") == "my/own.py:row"
  for call in (lambda: cli.config_path("digits_dem"), lambda: cli.main(["trian", "digits_demo"])):
    try:
      call()
    except SystemExit as e:
      assert e.code == 2
    else:
      raise AssertionError("a mistake must exit")
  lines = capsys.readouterr().err.splitlines()
  assert lines[0].startswith("error: no shipped config 'digits_dem' (did you mean 'digits_demo'?)")
  assert lines[1] == "error: unknown command 'trian'; use one of train, reproduce, search, benchmark, configs"


def test_shipped_configs_import_nothing_outside_kd_jax():
  """Installed, the configs travel as kd_jax.experiments.configs and the top-level `experiments` is absent:
  a config that imports it loads only from a checkout."""
  import ast
  import glob

  for path in glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")):
    with open(path) as f:
      tree = ast.parse(f.read())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m.split(".")[0] in ("experiments", "third_party", "tests")], path
