"""Checkpoints: the only module that imports orbax.

A run directory holds `checkpoints/<step>/` (the full train state, saved every N
steps, at the end, and on SIGTERM) and `final/` (the trained model's variables
and a JSON description, which is what a later row loads as its teacher, and the
loss terms' connector params and state, which a later stage row restores).
Orbax writes to a temporary directory and renames it when complete, so a kill
at any moment leaves the previous checkpoints loadable. Paths go through
`etils.epath` (`kd_jax.train.files`): a `gs://` run directory works as a local one.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from kd_jax.train import files

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  pass


class Checkpointer:
  """Saves and restores the train state of one run under `directory`."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = files.path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (state, meta), or None if there is none.

    A checkpoint that cannot be read (e.g. truncated by a crash of the disk) is
    skipped with a warning and the one before it is used.
    """
    errors = []
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])
      except Exception as e:  # orbax raises many types; each is reported below
        errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        log.warning("checkpoint at step %d in %s is unreadable (%s); trying an older one", step, self.directory, e)
    if errors:
      raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_model(directory: str, variables: Any, description: dict[str, Any], *, terms: Any = None) -> None:
  """Writes a trained model's variables and description (model name, kwargs, classes, input shape).

  terms: optionally the loss terms' {"params": {term: ...}, "state": {term: ...}}
    (connectors such as FT's paraphraser), read back by `load_terms`.
  Every process calls it; model.json is written last, by process 0, and every process waits for it.
  """
  directory = files.path(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "variables", variables, force=True)
    if terms is not None and jax.tree.leaves(terms):
      checkpointer.save(directory / "terms", terms, force=True)
  files.write_json(directory / "model.json", description)
  files.barrier(f"kd_jax.save_model:{directory}")  # no process looks for model.json before it is there


def model_directory(directory: str):
  """The directory holding model.json: `directory` itself, or a kd_jax row directory's `final/`."""
  directory = files.path(directory)
  if not (directory / "model.json").exists() and (directory / "final" / "model.json").exists():
    return directory / "final"
  return directory


def load_model(directory: str) -> tuple[Any, dict[str, Any]]:
  """Reads what `save_model` wrote: (variables as host arrays, description). `directory` may also be a
  kd_jax row directory (its `final/`)."""
  directory = model_directory(directory)
  description_path = directory / "model.json"
  if not description_path.exists():
    raise FileNotFoundError(f"no trained model in {str(directory)!r} (missing model.json); a teacher is a "
                            "directory with model.json or a kd_jax row directory (its final/)")
  description = files.read_json(description_path)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(directory / "variables")
  except Exception as e:
    raise CheckpointError(f"cannot read the model variables in {str(directory)!r}: {e}") from e
  return variables, description


def load_terms(directory: str) -> dict[str, Any]:
  """The loss terms' {"params", "state"} that `save_model` wrote with the model ({} if none)."""
  directory = model_directory(directory)
  path = directory / "terms"
  if not path.exists():
    return {}
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return dict(checkpointer.restore(path))
  except Exception as e:
    raise CheckpointError(f"cannot read the loss terms' params in {str(directory)!r}: {e}") from e
