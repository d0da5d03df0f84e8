"""Online terms: the source is the other peers' outputs, stacked [K-1, ...], or the members of one model.

Two ways to train networks together, one per term option `group`:
  * group="" (default): the row's peers (`row(peers=K, exchange=...)`), K
    copies of one architecture; each peer's loss sees its own logits and the
    others' stacked [K-1, B, K] as `teacher` (constants).
  * group="<prefix>": the members of one model that exposes
    `<prefix>_<m>_logits` for m = 0, 1, ... (`member` for a `group` model of
    different architectures, kd_jax/models/group.py; `branch` for a `one`
    model's branches). The term's value is the sum over members of each
    member's loss against the others (held constant), so one optimiser step
    trains every member as K peers' steps would.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distill.core import Term, register_term


def group_logits(outputs, prefix: str, *, who: str = "student", at_least: int = 2) -> jax.Array:
  """The members' logits `<prefix>_0_logits`, `<prefix>_1_logits`, ... stacked [M, B, K]."""
  found = []
  while f"{prefix}_{len(found)}_logits" in outputs.features:
    found.append(outputs.features[f"{prefix}_{len(found)}_logits"])
  if len(found) < at_least:
    raise KeyError(f"the {who} has {len(found)} feature(s) {prefix}_<m>_logits, {at_least} or more needed (a "
                   f"'group' model exposes member_<m>_logits, a 'one' model branch_<m>_logits); available "
                   f"features: {sorted(outputs.features)}")
  return jnp.stack(found)


def others(stacked: jax.Array) -> list[jax.Array]:
  """[M, ...] -> for each m, the other members' values [M-1, ...], as constants."""
  stacked = jax.lax.stop_gradient(stacked)
  return [jnp.concatenate([stacked[:m], stacked[m + 1:]]) for m in range(stacked.shape[0])]


class GroupOption(Term):
  """A term that runs on the row's peers (group="") or on one model's members (group="<prefix>")."""

  def _set_group(self, group: str):
    if not isinstance(group, str):
      raise ValueError(f"group must be a feature prefix ('member', 'branch') or '' for the row's peers, "
                       f"got {group!r}")
    self.group = group
    self.needs_peers = not group


class _PeerTerm(GroupOption):
  """standardize=True z-scores every network's logits first (logit standardization, Sun et al. 2024)."""

  loss = None
  name = ""

  def __init__(self, temperature: float = 1.0, group: str = "", standardize: bool = False):
    if not isinstance(standardize, bool):
      raise ValueError(f"{self.name}: standardize must be True or False, got {standardize!r}")
    self.temperature, self.standardize = temperature, standardize
    self._set_group(group)

  def _loss(self, z, peers):
    if self.standardize:
      z, peers = losses.standardize_logits(z), losses.standardize_logits(peers)
    return type(self).loss(z, peers, temperature=self.temperature)

  def __call__(self, student, teacher, batch, params, state, *, step):
    if not self.group:
      return self._loss(student.logits, teacher.logits), state
    members = group_logits(student, self.group)
    return sum(self._loss(z, rest) for z, rest in zip(members, others(members))), state


@register_term("dml")
class MutualLearning(_PeerTerm):
  """Deep mutual learning (Zhang et al. 2018): mean over the other peers j of KL(p_j ‖ p_k) at T."""

  loss, name = staticmethod(losses.mutual_learning_loss), "dml"


@register_term("codistill")
class CoDistillation(_PeerTerm):
  """Co-distillation (Anil et al. 2018): T² · KL(mean of the other peers' p ‖ p_k)."""

  loss, name = staticmethod(losses.codistillation_loss), "codistill"
