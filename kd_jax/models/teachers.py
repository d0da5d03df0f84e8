"""Teachers trained elsewhere: a module's variables -> a kd_jax teacher directory.

A row's `teacher` may name a directory holding `model.json` (the registered
model name, its kwargs, class count, input shape) and the variables, as a
finished row's `final/`. `import_teacher` writes one from variables trained
anywhere (a plain flax/optax loop, a msgpack file, orbax, an NNX state, the
PyTorch converters in third_party/), after checking them against the
registered model: a mismatch names the first differing paths and shapes. The
params of a user's module that `create` wraps (`WithFeatures`, `from_nnx`)
sit under 'module'; variables given without that level are nested there.

    python -m kd_jax.models.teachers --model=my_cnn --variables=teacher.msgpack \\
        --num_classes=10 --input_shape=28,28,1 --out=/data/teachers/my_cnn --import=my_project.models
"""
from __future__ import annotations

import argparse
import importlib
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["import_teacher", "match_variables"]

_COLLECTIONS = ("params", "batch_stats")


def _flat(tree: Any) -> dict[str, tuple[int, ...]]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _differences(got: Any, want: Any, limit: int = 4) -> str:
  got, want = _flat(got), _flat(want)
  missing = [p for p in want if p not in got][:limit]
  extra = [p for p in got if p not in want][:limit]
  shapes = [f"{p}: {got[p]} vs {want[p]}" for p in want if p in got and got[p] != want[p]][:limit]
  parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []) + (
      [f"shape (given vs model) {shapes}"] if shapes else [])
  return "; ".join(parts) or "none"


def _key_like(tree: Any, keys_of: Any) -> Any:
  """`tree`'s dict keys converted to the types of `keys_of`'s (msgpack turns NNX's int keys into str)."""
  if not isinstance(keys_of, Mapping) or not isinstance(tree, Mapping):
    return tree
  by_name = {str(k): k for k in keys_of}
  return {by_name.get(str(k), k): _key_like(v, keys_of.get(by_name.get(str(k), k))) for k, v in tree.items()}


def _linen_variables(variables: Any) -> Any:
  """An NNX model or its `nnx.state` as {"params", "batch_stats"} plain dicts; anything else unchanged."""
  from flax import nnx

  if isinstance(variables, nnx.Module):
    variables = nnx.state(variables)
  if not isinstance(variables, nnx.State):
    return variables
  params, stats, _ = nnx.split_state(variables, nnx.Param, nnx.BatchStat, ...)
  stats = nnx.to_pure_dict(stats)
  return {"params": nnx.to_pure_dict(params), **({"batch_stats": stats} if stats else {})}


def match_variables(variables: Any, expected: Mapping[str, Any], *, model: str) -> dict[str, Any]:
  """`variables` laid out as `expected` (the model's abstract variables): collections, the 'module'
  nesting of a wrapped model, and dict keys as the model has them; leaves as numpy arrays of its dtypes.

  variables: {"params": ..., "batch_stats": ...}, the params alone, or an NNX model or its `nnx.state`.
  """
  expected = {c: expected[c] for c in _COLLECTIONS if c in expected}
  given = dict(_linen_variables(variables))
  if "params" not in given:
    given = {"params": given}
  unknown = sorted(set(given) - set(_COLLECTIONS))
  if unknown:
    raise ValueError(f"model {model!r}: variables have collections {unknown}; expected {sorted(expected)}")
  candidates = [given]
  if all(set(tree) == {"module"} for tree in expected.values() if isinstance(tree, Mapping) and tree):
    candidates.append({c: {"module": tree} for c, tree in given.items()})  # the wrapped module's own variables
  for candidate in candidates:
    candidate = _key_like(candidate, expected)
    if set(candidate) == set(expected) and jax.tree.structure(candidate) == jax.tree.structure(expected) and all(
        np.shape(a) == b.shape for a, b in zip(jax.tree.leaves(candidate), jax.tree.leaves(expected))):
      return jax.tree.map(lambda a, b: np.asarray(a, b.dtype), candidate, expected)
  raise ValueError(f"model {model!r}: the variables do not fit the registered model (differences: "
                   f"{_differences(candidates[-1], expected)}); import the variables of the module that "
                   f"models.create({model!r}, ...) builds")


def import_teacher(directory: str, model: str, variables: Any, *, num_classes: int,
                   input_shape: Sequence[int], model_kwargs: Mapping[str, Any] | None = None,
                   input_dtype: Any = jnp.float32, dataset: str = "") -> str:
  """Writes `variables` of the registered `model` as a teacher directory; returns its path.

  A row then distils from it with `teacher=<directory>`. The teacher sees the dataset's
  normalised inputs (uint8 images: `(x * scale - mean) / std`; float features as they are),
  so it must have been trained on the same.

  Args:
    directory: where to write (created; model.json and variables/ as a row's `final/`).
    model: a registered model name (`kd_jax.models.register`).
    variables: {"params": ..., "batch_stats": ...} or the params alone, of the module the
      constructor returns (re-nested under 'module' if `create` wraps it); numpy or jax arrays;
      for a `from_nnx` model, the trained NNX model itself or its `nnx.state`.
    num_classes, input_shape: the model's outputs and one example's shape (no batch axis),
      checked against the dataset of every row that uses the teacher.
    model_kwargs: further keyword arguments of the constructor (JSON values).
    input_dtype: the inputs' dtype for the shape check.
    dataset: the dataset's name, for the record.
  """
  from kd_jax import models
  from kd_jax.train import checkpoint

  kwargs = dict(model_kwargs or {})
  module = models.create(model, num_classes=num_classes, **kwargs)
  example = jax.ShapeDtypeStruct((1, *tuple(input_shape)), input_dtype)
  expected = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                                                  train=False), example)
  matched = match_variables(variables, expected, model=model)
  checkpoint.save_model(directory, matched, {"model": model, "model_kwargs": kwargs, "num_classes": int(num_classes),
                                             "input_shape": [int(d) for d in input_shape], "dataset": dataset})
  return os.path.abspath(directory)


def _read_variables(path: str) -> Any:
  """A variables pytree from a msgpack file (`flax.serialization.to_bytes` / `msgpack_serialize`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--variables {path!r} is not a file; the command line reads msgpack files (for an "
                            "orbax checkpoint, restore it and call kd_jax.models.import_teacher)")
  from flax import serialization

  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description="Import a teacher trained elsewhere as a kd_jax teacher directory.")
  parser.add_argument("--model", required=True, help="registered model name")
  parser.add_argument("--variables", required=True, help="a msgpack file of the variables")
  parser.add_argument("--num_classes", type=int, required=True)
  parser.add_argument("--input_shape", required=True, help="one example's shape, e.g. 28,28,1")
  parser.add_argument("--out", required=True, help="the teacher directory to write")
  parser.add_argument("--import", dest="imports", action="append", default=[],
                      help="a Python module to import first (it registers the model); repeatable")
  args = parser.parse_args(argv)
  for name in args.imports:
    importlib.import_module(name)
  shape = tuple(int(d) for d in args.input_shape.split(","))
  return import_teacher(args.out, args.model, _read_variables(args.variables), num_classes=args.num_classes,
                        input_shape=shape)


if __name__ == "__main__":
  print(main())
