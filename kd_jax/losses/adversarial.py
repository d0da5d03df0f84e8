"""Adversarial losses on a discriminator's scores: AFD's feature-map-level online distillation.

A discriminator D maps a feature to a score; "real" features are the peer's,
"fake" the network's own. Scores are raw (no sigmoid): least squares (LSGAN,
Mao et al. 2017, the form AFD uses) compares them with the targets 1 / 0;
"bce" reads them as logits of the probability of "real".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks

GAN_KINDS = ("lsgan", "bce")


def _check(kind: str, what: str) -> None:
  if kind not in GAN_KINDS:
    raise ValueError(f"{what}: kind must be one of {GAN_KINDS}, got {kind!r}")


def _toward(scores: jax.Array, target: float, kind: str) -> jax.Array:
  """Per-score loss of pushing D's score toward the target (1: real, 0: fake)."""
  scores = _checks.as_f32(scores)
  if kind == "lsgan":
    return jnp.square(scores - target)
  labels = jnp.full_like(scores, target)
  return -(labels * jax.nn.log_sigmoid(scores) + (1.0 - labels) * jax.nn.log_sigmoid(-scores))


def adversarial_generator_loss(fake_scores: jax.Array, *, kind: str = "lsgan") -> jax.Array:
  """The network's loss: its own features should pass for the peer's, per example.

  lsgan: (1 − D(F_own))²;  bce: −log σ(D(F_own)).

  Args:
    fake_scores: [B] float, D's scores of the network's own features.
    kind: "lsgan" or "bce".

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> adversarial_generator_loss(jnp.array([1.0, 0.0])).tolist()  # fooled D: 0; caught: 1
    [0.0, 1.0]

  References:
    Chung, Park, Kim & Kwak 2020, "Feature-map-level Online Adversarial Knowledge Distillation", ICML.
  """
  _check(kind, "adversarial_generator_loss")
  _checks.rank(fake_scores, (1,), what="adversarial_generator_loss", name="fake_scores [B]")
  return _toward(fake_scores, 1.0, kind)


def adversarial_discriminator_loss(real_scores: jax.Array, fake_scores: jax.Array, *,
                                   kind: str = "lsgan") -> jax.Array:
  """The discriminator's loss: the peers' features are real, the network's own fake, per example.

  lsgan: mean_p (1 − D(F_p))² + D(F_own)²;  bce: mean_p −log σ(D(F_p)) − log(1 − σ(D(F_own))).

  Args:
    real_scores: [P, B] float, D's scores of the P peers' features.
    fake_scores: [B] float, D's scores of the network's own features.
    kind: "lsgan" or "bce".

  Returns:
    [B] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> adversarial_discriminator_loss(jnp.array([[1.0]]), jnp.array([0.0])).tolist()  # a perfect D
    [0.0]

  References:
    Chung, Park, Kim & Kwak 2020, "Feature-map-level Online Adversarial Knowledge Distillation", ICML;
    Mao, Li, Xie, Lau, Wang & Smolley 2017, "Least Squares Generative Adversarial Networks", ICCV.
  """
  _check(kind, "adversarial_discriminator_loss")
  _checks.rank(real_scores, (2,), what="adversarial_discriminator_loss", name="real_scores [P, B]")
  _checks.rank(fake_scores, (1,), what="adversarial_discriminator_loss", name="fake_scores [B]")
  if jnp.shape(real_scores)[1:] != jnp.shape(fake_scores):
    raise ValueError(f"adversarial_discriminator_loss: real_scores {jnp.shape(real_scores)} must be "
                     f"[P, B] with B = {jnp.shape(fake_scores)[0]} (fake_scores)")
  return jnp.mean(_toward(real_scores, 1.0, kind), axis=0) + _toward(fake_scores, 0.0, kind)
