"""A student with a residual-error assistant (Gao, Wang, Wu & Zhou 2020, "Residual Error Based Knowledge
Distillation", Neurocomputing).

`residual` pairs two zoo models: the student S and an assistant A that learns
the residual error z_t − z_s between the teacher's and the student's logits
(the `residual` term). At inference the prediction is their sum,
  logits = z_s + a,
so the pair's cost is the student's plus the (small) assistant's.

`output="student"`: the student alone (the assistant is not built: its params do
not exist), the first stage of the recipe (KD from the teacher); `output="sum"`
builds both. The second stage starts from the first with `init_partial` (the
student's params keep their path `student/...`), freezes "student/student" and
trains the assistant on the residual (experiments/configs/mnist_students.py).

Features: the student's own (`stage1`, ..., `pre_logits`), `student_logits` [B, K];
with the assistant, `assistant_logits` [B, K] and its features as `assistant/<name>`.

  model = kd_jax.models.create("residual", num_classes=10, student="mlp_800", assistant="mlp",
                               assistant_kwargs={"widths": [200]})
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from kd_jax.models import create, register

OUTPUTS = ("student", "sum")


class ResidualPair(nn.Module):
  """Student + assistant, logits summed (see the module docstring)."""

  student: nn.Module
  assistant: nn.Module
  output: str = "sum"

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    logits, student_features = self.student(x, train=train, return_features=True)
    features = {**student_features, "student_logits": logits}
    if self.output == "sum":
      assistant_logits, assistant_features = self.assistant(x, train=train, return_features=True)
      features.update({f"assistant/{k}": v for k, v in assistant_features.items()})
      features["assistant_logits"] = assistant_logits
      logits = logits + assistant_logits
    return (logits, features) if return_features else logits


@register("residual", input_shape=None)
def residual(*, num_classes: int, student: str, assistant: str, output: str = "sum",
             student_kwargs: Mapping[str, Any] | None = None,
             assistant_kwargs: Mapping[str, Any] | None = None) -> ResidualPair:
  """The zoo model `student` with the zoo model `assistant` learning its residual error."""
  if output not in OUTPUTS:
    raise ValueError(f"residual: output must be one of {OUTPUTS}, got {output!r}")
  return ResidualPair(create(student, num_classes=num_classes, **dict(student_kwargs or {})),
                      create(assistant, num_classes=num_classes, **dict(assistant_kwargs or {})), output)
