"""Weight distillation: a parameter generator that builds the student's weights from the teacher's.

Following the seed paper (weight distillation for Transformer MT), parameters
are grouped by class: leaves with the same path once the layer index is taken
out (e.g. every `layers_<i>/mlp/dense1/kernel` is one class). A class has L_t
teacher instances and L_s student instances; teacher layers are split into L_s
consecutive subsets of L_t / L_s. For the subset of student instance j, the
teacher matrices stacked as T ∈ R^{I_t×O_t×(L_t/L_s)} map to

    T' = Σ_l W_L[l] · W_Iᵀ T[:, :, l] W_O ∈ R^{I_s×O_s},   S_j = tanh(W_j) ⊙ T' + B_j,

with W_I ∈ R^{I_t×I_s}, W_O ∈ R^{O_t×O_s}, W_L ∈ R^{L_t/L_s} shared by all the
instances of a class, and W_j, B_j of S_j's shape. Vectors (biases, norm
scales) use W_O only. Tensors of higher rank (attention kernels [D, H, D/H] and
[H, D/H, D], per-head biases [H, D/H]) get one such matrix per axis: T' is T
multiplied along axis a by W_a ∈ R^{t_a×s_a} (W_I the first axis, W_O the last,
`w_axis<a>` those between), the matrix formula's natural extension; its
truncated-identity start keeps the student's first heads and, in each, the
first channels. Phase 1 trains only these generator parameters, with the
KD objective evaluated through the generated student (an engine row with
`weight_generator`); phase 2 fine-tunes the generated student directly (a plain
KD row with `init_from` the phase-1 row, whose exported model is the generated
student's plain param tree).

At initialisation every W_I, W_O (and W_a) is a truncated identity, W_L
averages the subset, W = 2 (tanh ≈ 0.96) and B = 0: the generated student starts as the
teacher cut to the student's widths, a deterministic function of the teacher.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

_INITIAL_GATE = 2.0


@dataclasses.dataclass(frozen=True)
class Group:
  """One weight class: which teacher leaves make each student leaf."""

  key: str  # the class, e.g. "layers_N.mlp.dense1.kernel"
  student_paths: tuple[tuple[str, ...], ...]  # L_s leaves
  teacher_paths: tuple[tuple[tuple[str, ...], ...], ...]  # for each student leaf, its L_t/L_s teacher leaves
  teacher_shape: tuple[int, ...]
  student_shape: tuple[int, ...]


def _leaves(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def make_plan(student_params, teacher_params, *, layer_pattern: str = r"layers_(\d+)") -> tuple[Group, ...]:
  """Groups student and teacher leaves (arrays or shape structs) into weight classes."""
  pattern = re.compile(layer_pattern)

  def classify(leaves):
    classes: dict[str, list] = {}
    for path, leaf in leaves.items():
      matches = [pattern.fullmatch(part) for part in path]
      indices = [int(m.group(1)) for m in matches if m]
      # The class key: the path with each layer index replaced by "N" ("layers_3" -> "layers_N").
      key = ".".join(part[:m.start(1)] + "N" + part[m.end(1):] if m else part for part, m in zip(path, matches))
      classes.setdefault(key, []).append((tuple(indices), path, tuple(leaf.shape)))
    return {k: sorted(v) for k, v in classes.items()}

  student, teacher = classify(_leaves(student_params)), classify(_leaves(teacher_params))
  if set(student) != set(teacher):
    raise ValueError("student and teacher parameters do not form the same weight classes; only in the student: "
                     f"{sorted(set(student) - set(teacher))}, only in the teacher: {sorted(set(teacher) - set(student))}")
  plan = []
  for key in sorted(student):
    s_items, t_items = student[key], teacher[key]
    if len(t_items) % len(s_items):
      raise ValueError(f"weight class {key!r}: {len(t_items)} teacher layers cannot be split into "
                       f"{len(s_items)} student layers")
    per = len(t_items) // len(s_items)
    s_shape, t_shape = s_items[0][2], t_items[0][2]
    if len(s_shape) != len(t_shape) or not s_shape:
      raise ValueError(f"weight class {key!r}: student {s_shape} and teacher {t_shape} must be arrays of the "
                       "same rank (>= 1)")
    plan.append(Group(key, tuple(p for _, p, _ in s_items),
                      tuple(tuple(p for _, p, _ in t_items[j * per:(j + 1) * per]) for j in range(len(s_items))),
                      t_shape, s_shape))
  return tuple(plan)


def _axis_names(rank: int) -> list[str]:
  """The generator's matrix for each axis: W_I first, W_O last (a vector has W_O only)."""
  if rank == 1:
    return ["w_out"]
  return ["w_in"] + [f"w_axis{a}" for a in range(1, rank - 1)] + ["w_out"]


def init_generator(plan: tuple[Group, ...]) -> dict[str, Any]:
  """The generator's parameters at the deterministic starting point described above."""
  classes, instances = {}, {}
  for group in plan:
    per = len(group.teacher_paths[0])
    shared = {"w_layers": jnp.full((per,), 1.0 / per)}
    for axis, name in enumerate(_axis_names(len(group.student_shape))):
      shared[name] = jnp.eye(group.teacher_shape[axis], group.student_shape[axis])
    classes[group.key] = shared
    for j in range(len(group.student_paths)):
      instances[f"{group.key}.{j}"] = {"gate": jnp.full(group.student_shape, _INITIAL_GATE),
                                       "bias": jnp.zeros(group.student_shape)}
  return {"classes": classes, "instances": instances}


def generate(generator: Mapping[str, Any], teacher_params, plan: tuple[Group, ...]) -> dict[str, Any]:
  """The student's param tree generated from the teacher's (differentiable in `generator`)."""
  teacher = _leaves(teacher_params)
  student: dict[str, Any] = {}
  for group in plan:
    shared = generator["classes"][group.key]
    for j, (path, subset) in enumerate(zip(group.student_paths, group.teacher_paths)):
      stacked = jnp.stack([teacher[p].astype(jnp.float32) for p in subset], axis=-1)  # [I_t, ..., O_t, L]
      mapped = jnp.tensordot(stacked, shared["w_layers"], axes=([-1], [0]))  # mix the subset's layers first
      for axis, name in enumerate(_axis_names(mapped.ndim)):  # then map each axis: W_Iᵀ T W_O for a matrix
        mapped = jnp.moveaxis(jnp.tensordot(mapped, shared[name], axes=([axis], [0])), -1, axis)
      instance = generator["instances"][f"{group.key}.{j}"]
      node = student
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = jnp.tanh(instance["gate"]) * mapped + instance["bias"]
  return student


def generator_size(plan: tuple[Group, ...]) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(jax.eval_shape(lambda: init_generator(plan)))))


@dataclasses.dataclass(frozen=True)
class Generator:
  """Weight distillation's phase 1 as a parameter map for the train step: the trained params are the
  generator's, and the student's are generated from them and the teacher's (`constants`: its variables)."""

  plan: tuple[Group, ...]

  def init(self, student_params) -> dict[str, Any]:
    """The generator's params, with the leading peer axis [1, ...] of `student_params`' leaves."""
    del student_params
    return jax.tree.map(lambda x: x[None], init_generator(self.plan))

  def __call__(self, params, constants) -> dict[str, Any]:
    return generate(params, constants["params"], self.plan)
