"""Distillation methods as weighted sums of terms, run by one trainer.

A method is a config mapping term names to their weight and hyper-parameters::

    terms = {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}}

Each term is a small object: `init` creates its trainable connector params and
its state (e.g. a memory bank) from example outputs, and `__call__` maps
(student outputs, source outputs, batch, params, state) to a per-example [B]
or scalar loss and the new state. The source is what the student learns from:
the frozen teacher's outputs (`needs_teacher`), or for online methods
(`needs_peers`) the other peers' outputs stacked on a leading axis [K-1, ...].
The `Objective` sums the weighted means, so a method combined with KD (the CRD
table's "+KD" column) is just one more entry. Besides `weight`, every term
takes `start_epoch` (weight 0 before it: co-distillation's burn-in) and
`warmup_epochs` (weight ramped from 0: DKD's warm-up), per step by default
(`warmup_shape="linear"`) or, with `warmup_shape="epoch"`, as mdistiller's
min(epoch / warmup_epochs, 1) with epochs counted from 1 (so warmup_epochs=1 is full
weight from the first step). A term may define `metrics(params, state) -> {name: scalar}`:
the Objective logs each as `<name>/<term>` (e.g. a learned `temperature/kd`).
New terms register with `@register_term("name")`.
"""
from kd_jax.distill.core import Objective, Outputs, Term, feature, register_term, term_names  # noqa: F401

__all__ = ["Outputs", "Term", "Objective", "register_term", "term_names"]

# Importing the families registers their terms.
from kd_jax.distill import logits as _logits  # noqa: F401
from kd_jax.distill import features as _features  # noqa: F401
from kd_jax.distill import online as _online  # noqa: F401
from kd_jax.distill import self_distillation as _self_distillation  # noqa: F401
from kd_jax.distill import contrastive as _contrastive  # noqa: F401
from kd_jax.distill import one as _one  # noqa: F401
from kd_jax.distill import adversarial as _adversarial  # noqa: F401
from kd_jax.distill import attention as _attention  # noqa: F401
from kd_jax.distill import collaborative as _collaborative  # noqa: F401
from kd_jax.distill import students as _students  # noqa: F401
