"""Collaborative online distillation: KDCL, OKDDip and FFL, on peers, branches or a group's members.

  kdcl    Guo et al. 2020: every network distils from the group's ensemble (mean of logits or MinLogit);
          on the row's peers or (group="member" / "branch") on one model's members.
  okddip  Chen et al. 2020: a `one` model without gate (`gate=False`); branch 0 is the group leader, the
          others auxiliary peers that each distil from their own attention-weighted aggregate of the peers
          (nothing detached, an 80-epoch ramp of the KD weight and C/8 projections, as the authors' code).
  ffl     Kim et al. 2019: a `group` model with a fusion module (`fusion="<feature>"`); the fused
          classifier and the sub-networks teach each other.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distill.core import Term, feature, register_term
from kd_jax.distill.online import GroupOption, group_logits
from kd_jax.losses.collaborative import ENSEMBLES


@register_term("kdcl")
class CollaborativeLearning(GroupOption):
  """KDCL (Guo et al. 2020, "Online Knowledge Distillation via Collaborative Learning"), per example:

      Σ_m T² · KL(softmax(z_t / T) ‖ softmax(z_m / T)),   z_t = stop_gradient(ensemble(z_1..z_M)),

  with `ensemble` "mean" (KDCL-Naive: the mean of the logits) or "min_logit"
  (KDCL-MinLogit: every member's logits minus its true-class logit, the minimum
  per class over members; `losses.kdcl_ensemble_logits`). On the row's peers
  (group=""), peer k's term is its own KL against the ensemble of all K peers,
  itself included (its own logits enter the target as a constant); with
  group="member"/"branch" the sum runs over the model's members. Add `ce`
  (with the same `group`) for the paper's CE of every network.
  """

  def __init__(self, temperature: float = 2.0, ensemble: str = "mean", group: str = ""):
    if ensemble not in ENSEMBLES:
      raise ValueError(f"kdcl: ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    self.temperature, self.ensemble = temperature, ensemble
    self._set_group(group)

  def __call__(self, student, teacher, batch, params, state, *, step):
    if self.group:
      members = group_logits(student, self.group)
    else:
      members = jnp.concatenate([student.logits[None], teacher.logits])  # this peer first; order is irrelevant
    target = jax.lax.stop_gradient(losses.kdcl_ensemble_logits(members, labels=batch["label"], kind=self.ensemble))
    students = members if self.group else student.logits[None]
    return sum(losses.kd_loss(z, target, temperature=self.temperature) for z in students), state


class _Projection(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.dim, use_bias=False, name="query")(h), nn.Dense(self.dim, use_bias=False, name="key")(h)


@register_term("okddip")
class DiversePeers(Term):
  """OKDDip (Chen, Mei, Wang, Feng & Chen 2020, "Online Knowledge Distillation with Diverse Peers"), per example:

      Σ_{m=0}^{M-1} CE(z_m) + w · r(e) · [Σ_{i=1}^{M-1} T² · KL(softmax(t_i / T) ‖ softmax(z_i / T))
                                         + T² · KL(softmax(z̄ / T) ‖ softmax(z_0 / T))],

  on a `one` model with `gate=False` (shared low layers, M branches): branch 0
  is the group leader (the model's output, the network kept for test), branches
  1..M-1 the auxiliary peers. Peer i's target aggregates the peers with its own
  attention weights, t_i = Σ_j a_ij z_j, a_ij = softmax_j(q_i · k_j) over the
  peers j (itself included), q_i = L h_i, k_j = E h_j, h the branches'
  `branch_<m>_pre_logits`, L and E (no bias, `projection_dim` wide: C / 8 of the
  features' width C by default, the authors' `input_channel // factor`) the
  term's params; the leader's target z̄ is the mean of the peers' logits.
  w = `kd_weight`; r(e) = exp(−5 (1 − min(e, R) / R)²), e the epoch from 0 and
  R = `rampup_epochs` (80; 0: r = 1), the authors' consistency ramp.

  As the authors' code (DefangChen/OKDDip, `train_GL.py`, `resnet_GL.py`) nothing
  is detached: the KLs' gradients reach the peers through their targets t_i and
  z̄ and the branches' features through q and k. stop_gradients=True makes the
  targets and the attention's inputs constants for the branches (L and E still learn).
  The term includes the cross-entropies: use it alone.
  """

  def __init__(self, temperature: float = 3.0, kd_weight: float = 1.0, projection_dim: int | None = None,
               rampup_epochs: float = 80.0, stop_gradients: bool = False):
    if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
      raise ValueError(f"okddip: projection_dim must be a positive int or None (C / 8), got {projection_dim!r}")
    if rampup_epochs < 0:
      raise ValueError(f"okddip: rampup_epochs must be >= 0, got {rampup_epochs}")
    if not isinstance(stop_gradients, bool):
      raise ValueError(f"okddip: stop_gradients must be True or False, got {stop_gradients!r}")
    self.temperature, self.kd_weight, self.projection_dim = temperature, kd_weight, projection_dim
    self.rampup_epochs, self.stop_gradients = float(rampup_epochs), stop_gradients

  def _branches(self, student):
    logits = group_logits(student, "branch", who="student (a `one` model with gate=False)", at_least=3)
    features = jnp.stack([feature(student, f"branch_{m}_pre_logits", who="student (a `one` model)")
                          for m in range(logits.shape[0])])
    return logits, features.reshape(features.shape[:2] + (-1,)).astype(jnp.float32)

  def _projection(self, features):
    return _Projection(self.projection_dim or max(features.shape[-1] // 8, 1))

  def init(self, rng, student, teacher):
    _, features = self._branches(student)
    return self._projection(features).init(rng, features[0])["params"], {}

  def _constant(self, x):
    return jax.lax.stop_gradient(x) if self.stop_gradients else x

  def attention(self, params, student):
    """The peers' attention weights [B, M-1, M-1] (branches 1..M-1)."""
    _, features = self._branches(student)
    queries, keys = self._projection(features).apply({"params": params}, self._constant(features[1:]))
    return losses.peer_attention_weights(queries, keys)

  def ramp(self, step):
    """The authors' consistency weight r(e) for the epoch holding `step` (epochs from 0)."""
    if not self.rampup_epochs:
      return 1.0
    epoch = jnp.minimum((step // self.steps_per_epoch).astype(jnp.float32), self.rampup_epochs)
    return jnp.exp(-5.0 * jnp.square(1.0 - epoch / self.rampup_epochs))

  def __call__(self, student, teacher, batch, params, state, *, step):
    logits, _ = self._branches(student)
    peers = logits[1:]
    targets = losses.peer_attention_logits(self.attention(params, student), self._constant(peers))
    peer_kd = sum(losses.soft_kl_loss(z, t, temperature=self.temperature) for z, t in zip(peers, targets))
    leader_target = self._constant(jnp.mean(peers.astype(jnp.float32), axis=0))
    leader_kd = losses.soft_kl_loss(logits[0], leader_target, temperature=self.temperature)
    ce = sum(losses.cross_entropy(z, batch["label"]) for z in logits)
    return ce + self.kd_weight * self.ramp(step) * (peer_kd + leader_kd), state


@register_term("ffl")
class FeatureFusion(Term):
  """FFL (Kim, Park, Kim & Kwak 2019, "Feature Fusion for Online Mutual Knowledge Distillation"), per example:

      Σ_m CE(z_m) + CE(z_f) + w · [Σ_m T² · KL(softmax(z_f / T) ‖ softmax(z_m / T))
                                  + T² · KL(softmax(z_e / T) ‖ softmax(z_f / T))],

  on a `group` model with a fusion module (`fusion="<feature>"`, features
  `member_<m>_logits` = z_m and `fused_logits` = z_f): the sub-networks learn
  from the fused classifier, the fused classifier from the sub-networks'
  ensemble z_e = (1/M) Σ_m z_m; both targets are constants. w = `kd_weight`.
  The term includes the cross-entropies: use it alone. group="branch" reads a
  `one` model's branches instead (its fusion would then be the model's own).
  """

  def __init__(self, temperature: float = 3.0, kd_weight: float = 1.0, group: str = "member"):
    self.temperature, self.kd_weight, self.group = temperature, kd_weight, group

  def __call__(self, student, teacher, batch, params, state, *, step):
    members = group_logits(student, self.group)
    fused = feature(student, "fused_logits", who="student (a `group` model with fusion='<feature>')")
    labels = batch["label"]
    ce = sum(losses.cross_entropy(z, labels) for z in members) + losses.cross_entropy(fused, labels)
    to_members = sum(losses.kd_loss(z, jax.lax.stop_gradient(fused), temperature=self.temperature) for z in members)
    ensemble = jax.lax.stop_gradient(jnp.mean(members.astype(jnp.float32), axis=0))
    to_fused = losses.kd_loss(fused, ensemble, temperature=self.temperature)
    return ce + self.kd_weight * (to_members + to_fused), state
