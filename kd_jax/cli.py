r"""The `kd-jax` command, and what the experiment CLIs share: one-line config errors, quiet logs.

  kd-jax train digits_demo --workdir=/tmp/demo --config.max_steps=2
  kd-jax train hinton_mnist:student_kd --workdir=/tmp/hinton --config.epochs=3
  kd-jax reproduce digits_demo --seeds=3 --workdir=/tmp/demo
  kd-jax search mnist_search --workdir=/tmp/search
  kd-jax benchmark --tiny --steps=2
  kd-jax configs                      # the shipped configs' short names

`train`, `reproduce` and `search` take a shipped config by short name (`NAME` or
`NAME:rows`, from any directory) or a config file path, then the flags of
`python -m experiments.main|reproduce|search`. A mistake in a config or a flag
prints one line and exits with status 2; `--verbose` shows the traceback.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Callable, Sequence

COMMANDS = {"train": "main", "reproduce": "reproduce", "search": "search", "benchmark": "benchmark"}
USAGE_ERROR = 2  # the exit status of a config or flag mistake


def _usage_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def _experiments_module(name: str):
  """`kd_jax.experiments.<name>` in an installed package, `experiments.<name>` in a checkout."""
  try:
    return importlib.import_module(f"kd_jax.experiments.{name}")
  except ModuleNotFoundError as e:
    if e.name not in ("kd_jax.experiments", f"kd_jax.experiments.{name}"):
      raise
    return importlib.import_module(f"experiments.{name}")


def configs_dir() -> str:
  """The directory of the shipped table configs."""
  return os.path.dirname(_experiments_module("configs").__file__)


def config_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(configs_dir()) if f.endswith(".py") and not f.startswith("_"))


def config_path(spec: str) -> str:
  """`NAME[:rows]` of a shipped config, or a config file path `path.py[:rows]`, as a path for --config."""
  name, colon, rows = spec.partition(":")
  if name.endswith(".py") or os.sep in name:
    return spec
  if name not in config_names():
    import difflib

    close = difflib.get_close_matches(name, config_names(), n=2)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    _usage_error(f"no shipped config {name!r}{hint}; shipped: {', '.join(config_names())}")
  return os.path.join(configs_dir(), name + ".py") + colon + rows


# --- one-line errors ---------------------------------------------------------------------------

def _chain(exc: BaseException) -> list[BaseException]:
  """`exc` and the exceptions it was raised from, outermost first (config_flags and absl re-raise)."""
  chain = [exc]
  while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
    chain.append(inner)
  return chain


def _flag_naming(key: str, argv: Sequence[str]) -> str:
  """" in --config.a.key" for the override in `argv` that names `key`, or ""."""
  key = key.strip("'\"")
  flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}" in a.split("=")[0]), "")
  return f" in {flag}" if flag else ""


def error_line(exc: BaseException, argv: Sequence[str] = ()) -> str:
  """One line for a config or flag mistake, its suggestion kept: the ConfigError behind `exc` if any,
  ml_collections' unknown-key error of a mistyped --config.<key>, absl's flag error, or the config
  file's own exception."""
  from absl import flags

  from kd_jax.train.config import ConfigError

  chain = _chain(exc)
  # the outermost one with context ("rows.x.terms: ..."), not config_flags' re-raise of the same type
  config_error = next((e for e in chain if isinstance(e, ConfigError)
                       and "Error whilst parsing config file" not in str(e)), None)
  unknown_key = next((e for e in chain if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str)
                      and "\nDid you mean" in e.args[0]), None)
  if config_error is not None:
    message = str(config_error)
  elif unknown_key is not None:  # "'key'\nDid you mean "keys" instead of "key"?"
    key, _, hint = str(unknown_key.args[0]).partition("\n")
    message = f"unknown config key {key}{_flag_naming(key, argv)} ({hint[0].lower()}{hint[1:]})"
  elif isinstance(exc, flags.Error) and "Error whilst parsing config file" not in str(exc):
    message = str(exc)  # names the flag: "flag --config.epochs=abc: invalid literal ..."
  elif "Error whilst parsing config file" in str(exc):  # the chain can be cut: the traceback's last line
    message = [line for line in str(exc).splitlines() if line.strip()][-1].strip()
    message = message.split("ConfigError: ", 1)[-1]
  elif isinstance(chain[-1], (KeyError, AttributeError)) and not isinstance(exc, flags.Error):
    key = str(chain[-1].args[0] if chain[-1].args else chain[-1])
    message = f"unknown config key {key!r}{_flag_naming(key, argv)}"
  else:  # the config file's own exception
    message = f"{type(chain[-1]).__name__}: {chain[-1]}"
  return "error: " + " ".join(message.split())


def _wants_verbose(argv: Sequence[str]) -> bool:
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flags parser for `app.run`, printing a flag or config-file mistake as one line (exit 2)."""
  from absl import flags

  if flags.FLAGS.is_parsed():  # a second run in one process (tests): config_flags' overrides are made anew
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # noqa: BLE001: every parse failure is the user's input
    if _wants_verbose(argv):
      raise
    print(error_line(e, argv), file=sys.stderr)
    sys.exit(USAGE_ERROR)


def guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Wraps an absl `main`: a ConfigError (or flag error) raised while it runs prints one line, exit status 2."""
  from absl import flags

  from kd_jax.train.config import ConfigError

  def guarded(argv):
    try:
      return main(argv)
    except (ConfigError, flags.Error) as e:
      if _wants_verbose(sys.argv) or _wants_verbose(argv):
        raise
      print(error_line(e), file=sys.stderr)
      return USAGE_ERROR

  return guarded


def quiet_logs() -> None:
  """Warnings and errors only: orbax and the loop log every save and restore at INFO through absl."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)


def run_app(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """`app.run(main)` with one-line config errors; exits."""
  from absl import app

  if argv is not None:
    sys.argv = list(argv)  # config_flags finds the --config.<key> overrides in sys.argv
  app.run(guard(main), argv=list(sys.argv), flags_parser=parse_flags)


# --- kd-jax -----------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
  """The `kd-jax` console entry point: `kd-jax train|reproduce|search|benchmark [NAME[:rows]] [flags]`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(__doc__.split("\n\n")[1] if __doc__ else "", file=sys.stderr)
    sys.exit(0 if argv else USAGE_ERROR)
  command, rest = argv[0], argv[1:]
  if command == "configs":
    print("\n".join(config_names()))
    return
  if command not in COMMANDS:
    _usage_error(f"unknown command {command!r}; use one of {', '.join([*COMMANDS, 'configs'])}")
  if command == "benchmark":  # argparse: its own errors and --help
    try:  # its workers run `python -m experiments.benchmark` in the checkout, its PyTorch side third_party/
      module = importlib.import_module("experiments.benchmark")
    except ModuleNotFoundError:
      _usage_error("kd-jax benchmark runs from a checkout of the repository (its worker processes and PyTorch "
                   "references live there): cd into it first")
    module.main(rest)
    return
  module = _experiments_module(COMMANDS[command])
  if rest and not rest[0].startswith("-"):
    rest = [f"--config={config_path(rest[0])}", *rest[1:]]
  if command == "search":  # search.py defines its flags only when run
    module._define_flags()
  run_app(module.main, [f"kd-jax {command}", *rest])

if __name__ == "__main__":
  main()
