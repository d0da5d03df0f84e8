"""AFD (Chung, Park, Kim & Kwak 2020): online peers, each with a feature discriminator in its term state.

A term's state may hold a trainable module of its own, with its own optimizer
state, that the term updates inside the jitted step (`jax.grad` of its own
loss on constant features): the network's loss uses the discriminator as it
was before this step's update, no gradient of the network's loss reaches it,
and checkpoints, resumption, peer stacking [K, ...] and the non-finite-step
guard cover it as any other term state.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kd_jax import losses
from kd_jax.distill.core import Term, feature, register_term
from kd_jax.losses.adversarial import GAN_KINDS

POOLS = ("none", "mean")


class FeatureDiscriminator(nn.Module):
  """An MLP discriminator on flattened features [B, D] -> raw scores [B] (LeakyReLU 0.2 hidden layers)."""

  hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.hidden):
      x = nn.leaky_relu(nn.Dense(width, name=f"dense{i}")(x), 0.2)
    return nn.Dense(1, name="score")(x)[..., 0]


@register_term("afd")
class AdversarialFeatureDistillation(Term):
  """Feature-map-level online adversarial distillation (AFD), the adversarial part, per example.

  Peer k has a discriminator D_k that learns to tell the other peers' features
  F_j (real) from its own F_k (fake); peer k learns to fool it:

      network loss       (1 − D_k(F_k))²                               [B]
      discriminator loss mean_j (1 − D_k(F_j))² + D_k(F_k)²            (least squares GAN)

  (`kind="bce"`: the cross-entropy GAN losses instead). Each step the network's
  loss uses D_k as it was before the step; D_k then takes one Adam step on its
  own loss with F_k and F_j held constant (AFD's alternating updates, fused in
  one step). The state {"discriminator", "opt_state", "discriminator_loss"} is
  per peer. Combine with "ce" and "dml" (the paper's logit-level KL between
  peers) in a row with peers >= 2 and exchange="predictions" (the peers'
  features are exchanged with their logits).

  Args:
    feature: the features compared (MLPs: a hidden layer, e.g. "pre_logits"; conv
      nets: the last feature map). Shapes [B, ...].
    hidden: the discriminator's hidden widths.
    kind: "lsgan" (the paper's) or "bce".
    pool: "none" (flatten [B, ...] -> [B, D]) or "mean" (feature maps [B, H, W, C]:
      the spatial mean, [B, C]).
    learning_rate, b1, b2: the discriminator's Adam.
  """

  needs_peers = True

  def __init__(self, feature: str = "pre_logits", hidden: Sequence[int] = (64,), kind: str = "lsgan",
               pool: str = "none", learning_rate: float = 1e-4, b1: float = 0.5, b2: float = 0.999):
    if kind not in GAN_KINDS:
      raise ValueError(f"afd: kind must be one of {GAN_KINDS}, got {kind!r}")
    if pool not in POOLS:
      raise ValueError(f"afd: pool must be one of {POOLS}, got {pool!r}")
    if not learning_rate > 0:
      raise ValueError(f"afd: learning_rate must be > 0, got {learning_rate}")
    self.feature_name, self.kind, self.pool = feature, kind, pool
    self.discriminator = FeatureDiscriminator(hidden=tuple(int(h) for h in hidden))
    self.optimizer = optax.adam(learning_rate, b1=b1, b2=b2)

  def _vectors(self, x: jax.Array) -> jax.Array:
    """[B, ...] -> [B, D]."""
    x = x.astype(jnp.float32)
    if self.pool == "mean":
      if x.ndim != 4:
        raise ValueError(f"afd: pool='mean' needs feature maps [B, H, W, C], got {self.feature_name!r} of "
                         f"shape {x.shape}")
      return jnp.mean(x, axis=(1, 2))
    return x.reshape((x.shape[0], -1))

  def _peer_vectors(self, teacher) -> jax.Array:
    peers = feature(teacher, self.feature_name, who="peers (exchange='predictions' shares features)")
    return jax.vmap(self._vectors)(peers)  # [P, B, D]

  def init(self, rng, student, teacher):
    if teacher is None or self.feature_name not in teacher.features:
      raise ValueError(f"afd: the peers' feature {self.feature_name!r} is not exchanged: use peers >= 2 and "
                       "exchange='predictions'")
    own = self._vectors(feature(student, self.feature_name, who="student"))
    params = self.discriminator.init(rng, own)["params"]
    return {}, {"discriminator": params, "opt_state": self.optimizer.init(params),
                "discriminator_loss": jnp.zeros((), jnp.float32)}

  def score(self, params, vectors: jax.Array) -> jax.Array:
    return self.discriminator.apply({"params": params}, vectors)

  def __call__(self, student, teacher, batch, params, state, *, step):
    own = self._vectors(feature(student, self.feature_name, who="student"))
    peers = jax.lax.stop_gradient(self._peer_vectors(teacher))
    discriminator = state["discriminator"]
    # The network's loss: D as it was before this step, a constant.
    loss = losses.adversarial_generator_loss(self.score(jax.lax.stop_gradient(discriminator), own), kind=self.kind)

    def discriminator_loss(d_params):
      real = jax.vmap(lambda p: self.score(d_params, p))(peers)
      fake = self.score(d_params, jax.lax.stop_gradient(own))
      return jnp.mean(losses.adversarial_discriminator_loss(real, fake, kind=self.kind))

    value, grads = jax.value_and_grad(discriminator_loss)(discriminator)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], discriminator)
    return loss, {"discriminator": optax.apply_updates(discriminator, updates), "opt_state": opt_state,
                  "discriminator_loss": value}
