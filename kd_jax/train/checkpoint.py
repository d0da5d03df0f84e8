"""Checkpoints: the only module that imports orbax.

A run directory holds `checkpoints/<step>/` (the full train state, saved every N
steps, at the end, and on SIGTERM) and `final/` (the trained model's variables
and a JSON description, which is what a later row loads as its teacher, and the
loss terms' connector params and state, which a later stage row restores).
Orbax writes to a temporary directory and renames it when complete, so a kill
at any moment leaves the previous checkpoints loadable.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  pass


class Checkpointer:
  """Saves and restores the train state of one run under `directory`."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
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
  """
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, "variables"), variables, force=True)
    if terms is not None and jax.tree.leaves(terms):
      checkpointer.save(os.path.join(directory, "terms"), terms, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(directory, "model.json"), "w") as f:
      json.dump(description, f, indent=2)


def load_model(directory: str) -> tuple[Any, dict[str, Any]]:
  """Reads what `save_model` wrote: (variables as host arrays, description)."""
  directory = os.path.abspath(directory)
  description_path = os.path.join(directory, "model.json")
  if not os.path.isfile(description_path):
    raise FileNotFoundError(f"no trained model in {directory!r} (missing model.json)")
  with open(description_path) as f:
    description = json.load(f)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(os.path.join(directory, "variables"))
  except Exception as e:
    raise CheckpointError(f"cannot read the model variables in {directory!r}: {e}") from e
  return variables, description


def load_terms(directory: str) -> dict[str, Any]:
  """The loss terms' {"params", "state"} that `save_model` wrote with the model ({} if none)."""
  path = os.path.join(os.path.abspath(directory), "terms")
  if not os.path.isdir(path):
    return {}
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return dict(checkpointer.restore(path))
  except Exception as e:
    raise CheckpointError(f"cannot read the loss terms' params in {directory!r}: {e}") from e
