"""Self-attention distillation for Transformers: MiniLM's attention and value-relation transfer, TinyBERT's
attention loss, on the zoo Transformer's per-layer features (kd_jax/models/transformer.py)."""
from __future__ import annotations

import re
from typing import Sequence

import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distill.core import Term, feature, register_term
from kd_jax.losses.attention import ATTENTION_LOSSES, HEADS

KINDS = ("encoder", "decoder_self", "decoder_cross")
# Value relations are between the positions a self-attention attends over (MiniLM's are the encoder's).
VALUE_KINDS = ("encoder", "decoder_self")


def layer_count(outputs, kind: str) -> int:
  pattern = re.compile(rf"{kind}_attention_(\d+)$")
  return len([n for n in outputs.features if pattern.match(n)])


def layer_pairs(layers, teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
  """(teacher layer, student layer) pairs, 0-indexed.

  "uniform": student layer j learns from teacher layer ⌈(j + 1) N / M⌉ − 1 (TinyBERT's
  g(m) = m N / M, 1-indexed; N teacher, M student layers); "last": the last layers only
  (MiniLM); or explicit pairs [[t, s], ...].
  """
  if layers == "uniform":
    return [(-(-(j + 1) * teacher_layers // student_layers) - 1, j) for j in range(student_layers)]
  if layers == "last":
    return [(teacher_layers - 1, student_layers - 1)]
  if isinstance(layers, str):
    raise ValueError(f"attention: layers must be 'uniform', 'last' or [[teacher, student], ...], got {layers!r}")
  pairs = [tuple(int(i) for i in pair) for pair in layers]
  for pair in pairs:
    if len(pair) != 2 or not (0 <= pair[0] < teacher_layers and 0 <= pair[1] < student_layers):
      raise ValueError(f"attention: layer pair {list(pair)} is not [teacher layer < {teacher_layers}, student "
                       f"layer < {student_layers}]")
  return pairs


@register_term("attention")
class AttentionDistillation(Term):
  """The student's attention distributions (and value relations) learn the teacher's, per example:

      attention_weight · mean_{kind, (t, s)} L_AT(A^s_{kind, s}, A^t_{kind, t})
        + value_weight · mean_{self-attention kind, (t, s)} KL(VR^t_t ‖ VR^s_s)

  with L_AT the KL of MiniLM (or the MSE of TinyBERT, `loss="mse"`) over heads
  and allowed query/key positions (`losses.attention_map_loss`; the decoder's
  causal mask from the `decoder_self_attention_mask` feature), VR = softmax(V Vᵀ / √d)
  (`losses.value_relation_loss`). Layer pairs: `layers` ("uniform": TinyBERT's
  mapping; "last": MiniLM's; or [[t, s], ...]) applied to each attention kind.

  Args:
    kinds: of "encoder", "decoder_self", "decoder_cross".
    layers: the layer mapping.
    loss: "kl" or "mse".
    heads: "equal" (same head counts, head by head) or "mean" (averaged over heads).
    attention_weight, value_weight: the two parts (value_weight 0: attention maps only).
  """

  needs_teacher = True

  def __init__(self, kinds: Sequence[str] = KINDS, layers="uniform", loss: str = "kl", heads: str = "equal",
               attention_weight: float = 1.0, value_weight: float = 0.0):
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
      raise ValueError(f"attention: kinds must be a non-empty list of {KINDS}, got {kinds}")
    if loss not in ATTENTION_LOSSES:
      raise ValueError(f"attention: loss must be one of {ATTENTION_LOSSES}, got {loss!r}")
    if heads not in HEADS:
      raise ValueError(f"attention: heads must be one of {HEADS}, got {heads!r}")
    if isinstance(layers, str):
      layer_pairs(layers, 1, 1)  # checks the name
    self.kinds, self.layers, self.loss, self.heads = kinds, layers, loss, heads
    self.attention_weight, self.value_weight = float(attention_weight), float(value_weight)

  def _pairs(self, student, teacher, kind):
    counts = layer_count(teacher, kind), layer_count(student, kind)
    if not all(counts):
      raise ValueError(f"attention: no {kind!r} attention features (`{kind}_attention_<i>`) in the "
                       f"{'teacher' if not counts[0] else 'student'}: a Transformer from the zoo exposes them; "
                       f"student features: {sorted(student.features)[:8]}...")
    return layer_pairs(self.layers, *counts)

  def __call__(self, student, teacher, batch, params, state, *, step):
    mask = student.features.get("decoder_self_attention_mask")
    masks = {"decoder_self": mask}
    total = jnp.zeros(student.logits.shape[:1], jnp.float32)
    if self.attention_weight:
      parts = [losses.attention_map_loss(feature(student, f"{kind}_attention_{s}", who="student"),
                                         feature(teacher, f"{kind}_attention_{t}", who="teacher"),
                                         mask=masks.get(kind), kind=self.loss, heads=self.heads)
               for kind in self.kinds for t, s in self._pairs(student, teacher, kind)]
      total = total + self.attention_weight * sum(parts) / len(parts)
    value_kinds = [k for k in self.kinds if k in VALUE_KINDS]
    if self.value_weight and value_kinds:
      parts = [losses.value_relation_loss(feature(student, f"{kind}_values_{s}", who="student"),
                                          feature(teacher, f"{kind}_values_{t}", who="teacher"),
                                          mask=masks.get(kind), heads=self.heads)
               for kind in value_kinds for t, s in self._pairs(student, teacher, kind)]
      total = total + self.value_weight * sum(parts) / len(parts)
    return total, state
