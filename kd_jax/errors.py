"""What the rooms share at the bottom of the house: the config-mistake error and the registries' rule
for a name registered twice."""
from __future__ import annotations

import functools
from typing import Any


class ConfigError(ValueError):
  """A mistake in a config or its overrides: the message names the key, the bad value and what is allowed."""


def _definition(fn: Any) -> Any:
  """What identifies a constructor across re-imports: its code's place (file, line, qualified name)."""
  if isinstance(fn, functools.partial):
    return (_definition(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
  code = getattr(fn, "__code__", None)
  if code is None:
    return fn
  # Plain values a closure captured (register_tfds's options) tell apart two uses of one definition.
  cells = tuple(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()))
  plain = all(isinstance(c, (str, int, float, bool, tuple, type(None))) for c in cells)
  return (code.co_filename, code.co_firstlineno, getattr(fn, "__qualname__", None), cells if plain else None)


def same_definition(a: Any, b: Any) -> bool:
  """Whether `a` and `b` are one constructor: the same object, or the same definition run again
  (a config file imported twice defines new function objects from the same source lines)."""
  if a is b:
    return True
  try:
    return _definition(a) == _definition(b)
  except (TypeError, ValueError):  # arguments that do not compare (arrays)
    return False
