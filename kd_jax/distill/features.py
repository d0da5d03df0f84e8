"""Terms over intermediate features and relations between examples.

Each term names the features it reads (`student_feature(s)`, `teacher_feature(s)`,
e.g. "stage2" or "pre_logits"; see kd_jax.models). Trainable connectors (FitNets'
regressor) are the term's params, trained with the student.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distill import Term, feature, register_term
from kd_jax.models import connectors


def _pairs(student_names, teacher_names, who):
  student_names, teacher_names = list(student_names), list(teacher_names)
  if len(student_names) != len(teacher_names):
    raise ValueError(f"{who}: {len(student_names)} student features {student_names} but "
                     f"{len(teacher_names)} teacher features {teacher_names}")
  return list(zip(student_names, teacher_names))


def init_connector(module: nn.Module, rng, x, *args):
  """(params, batch_stats) of a connector module applied to example inputs."""
  variables = module.init(rng, x, *args, train=False)
  return variables["params"], variables.get("batch_stats", {})


def apply_connector(module: nn.Module, params, batch_stats, x, *args):
  """The connector in training mode: (output, new batch_stats)."""
  if batch_stats:
    out, updates = module.apply({"params": params, "batch_stats": batch_stats}, x, *args, train=True,
                                mutable=["batch_stats"])
    return out, updates["batch_stats"]
  return module.apply({"params": params}, x, *args, train=True), batch_stats


@register_term("hint")
class Hint(Term):
  """FitNets (Romero et al. 2015): regress the teacher's feature from the student's.

  Maps go through FitNets' regressor (connectors.ConvReg: conv + BN + ReLU to the
  teacher's shape), vectors through a Dense layer; `regressor=False` compares them as they are.
  """

  needs_teacher = True

  def __init__(self, student_feature: str = "stage2", teacher_feature: str = "stage2", regressor: bool = True):
    self.student_feature, self.teacher_feature, self.regressor = student_feature, teacher_feature, regressor

  def _connector(self, teacher) -> nn.Module:
    t = feature(teacher, self.teacher_feature, who="teacher")
    if t.ndim == 4:
      return connectors.ConvReg(out_channels=t.shape[-1], out_hw=tuple(t.shape[1:3]))
    return nn.Dense(t.shape[-1])

  def init(self, rng, student, teacher):
    if not self.regressor:
      return {}, {}
    s = feature(student, self.student_feature, who="student")
    module = self._connector(teacher)
    if isinstance(module, nn.Dense):
      return module.init(rng, s)["params"], {}
    return init_connector(module, rng, s)

  def __call__(self, student, teacher, batch, params, state, *, step):
    s = feature(student, self.student_feature, who="student")
    t = jax.lax.stop_gradient(feature(teacher, self.teacher_feature, who="teacher"))
    if self.regressor:
      module = self._connector(teacher)
      if isinstance(module, nn.Dense):
        s = module.apply({"params": params}, s)
      else:
        s, state = apply_connector(module, params, state, s)
    return losses.hint_loss(s, t), state


@register_term("at")
class AttentionTransfer(Term):
  """Attention transfer (Zagoruyko & Komodakis 2017), summed over matched stages."""

  needs_teacher = True

  def __init__(self, student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
               teacher_features: Sequence[str] = ("stage1", "stage2", "stage3"), p: float = 2.0):
    self.pairs, self.p = _pairs(student_features, teacher_features, "at"), p

  def __call__(self, student, teacher, batch, params, state, *, step):
    total = 0.0
    for s_name, t_name in self.pairs:
      t = jax.lax.stop_gradient(feature(teacher, t_name, who="teacher"))
      total = total + losses.attention_transfer_loss(feature(student, s_name, who="student"), t, p=self.p)
    return total, state


@register_term("fsp")
class FSP(Term):
  """Flow of solution procedure (Yim et al. 2017) between consecutive named features."""

  needs_teacher = True

  def __init__(self, student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
               teacher_features: Sequence[str] = ("stage1", "stage2", "stage3")):
    self.pairs = _pairs(student_features, teacher_features, "fsp")

  def __call__(self, student, teacher, batch, params, state, *, step):
    total = 0.0
    for (s1, t1), (s2, t2) in zip(self.pairs[:-1], self.pairs[1:]):
      t_first = jax.lax.stop_gradient(feature(teacher, t1, who="teacher"))
      t_second = jax.lax.stop_gradient(feature(teacher, t2, who="teacher"))
      total = total + losses.fsp_loss(feature(student, s1, who="student"), feature(student, s2, who="student"),
                                      t_first, t_second)
    return total, state


class _PairTerm(Term):
  """A relation loss between one student feature and one teacher feature."""

  needs_teacher = True
  loss = None

  def __init__(self, student_feature: str = "pre_logits", teacher_feature: str = "pre_logits"):
    self.student_feature, self.teacher_feature = student_feature, teacher_feature

  def _features(self, student, teacher):
    return (feature(student, self.student_feature, who="student"),
            jax.lax.stop_gradient(feature(teacher, self.teacher_feature, who="teacher")))


@register_term("sp")
class SimilarityPreserving(_PairTerm):
  """Similarity-preserving KD (Tung & Mori 2019): batch similarity matrices of a feature."""

  def __init__(self, student_feature: str = "stage3", teacher_feature: str = "stage3"):
    super().__init__(student_feature, teacher_feature)

  def __call__(self, student, teacher, batch, params, state, *, step):
    return losses.similarity_preserving_loss(*self._features(student, teacher)), state


@register_term("rkd")
class RKD(_PairTerm):
  """Relational KD (Park et al. 2019): distance and angle relations of embeddings."""

  def __init__(self, student_feature: str = "pre_logits", teacher_feature: str = "pre_logits",
               distance_weight: float = 25.0, angle_weight: float = 50.0):
    super().__init__(student_feature, teacher_feature)
    self.distance_weight, self.angle_weight = distance_weight, angle_weight

  def __call__(self, student, teacher, batch, params, state, *, step):
    return losses.rkd_loss(*self._features(student, teacher), distance_weight=self.distance_weight,
                           angle_weight=self.angle_weight), state


@register_term("pkt")
class PKT(_PairTerm):
  """Probabilistic knowledge transfer (Passalis & Tefas 2018) on embeddings."""

  def __call__(self, student, teacher, batch, params, state, *, step):
    return losses.pkt_loss(*self._features(student, teacher)), state


def _match_spatial(student, teacher):
  """Average-pools the larger of two maps to the smaller's spatial size (VID, NST)."""
  pool = lambda x, h, w: x.reshape(x.shape[0], h, x.shape[1] // h, w, x.shape[2] // w, x.shape[3]).mean(axis=(2, 4))
  if student.ndim == 4 and student.shape[1] > teacher.shape[1]:
    student = pool(student, *teacher.shape[1:3])
  elif student.ndim == 4 and teacher.shape[1] > student.shape[1]:
    teacher = pool(teacher, *student.shape[1:3])
  return student, teacher


class _ConnectedPairs(Term):
  """A loss over matched (student, teacher) feature pairs through one connector per pair."""

  needs_teacher = True

  def __init__(self, student_features, teacher_features):
    self.pairs = _pairs(student_features, teacher_features, type(self).__name__)

  def connector(self, student_feature, teacher_feature) -> nn.Module:
    raise NotImplementedError

  def loss(self, connected, teacher_feature):
    raise NotImplementedError

  def _features(self, student, teacher, s_name, t_name):
    return (feature(student, s_name, who="student"),
            jax.lax.stop_gradient(feature(teacher, t_name, who="teacher")))

  def init(self, rng, student, teacher):
    params, stats = {}, {}
    for i, (s_name, t_name) in enumerate(self.pairs):
      s, t = self._features(student, teacher, s_name, t_name)
      params[f"pair{i}"], stats[f"pair{i}"] = init_connector(self.connector(s, t), jax.random.fold_in(rng, i), s)
    return params, stats

  def __call__(self, student, teacher, batch, params, state, *, step):
    total, new_state = 0.0, {}
    for i, (s_name, t_name) in enumerate(self.pairs):
      s, t = self._features(student, teacher, s_name, t_name)
      out, new_state[f"pair{i}"] = apply_connector(self.connector(s, t), params[f"pair{i}"],
                                                   state.get(f"pair{i}", {}), s)
      total = total + self.loss(out, t)
    return total, new_state


@register_term("vid")
class VID(_ConnectedPairs):
  """Variational information distillation (Ahn et al. 2019) on matched stages, VIDRegressor per pair."""

  def __init__(self, student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
               teacher_features: Sequence[str] = ("stage1", "stage2", "stage3"), init_variance: float = 5.0):
    super().__init__(student_features, teacher_features)
    self.init_variance = init_variance

  def _features(self, student, teacher, s_name, t_name):
    return _match_spatial(*super()._features(student, teacher, s_name, t_name))

  def connector(self, s, t):
    return connectors.VIDRegressor(out_channels=t.shape[-1], init_pred_var=self.init_variance)

  def loss(self, connected, t):
    mean, variance = connected
    return losses.vid_loss(mean, t, variance)


@register_term("ab")
class ActivationBoundaries(_ConnectedPairs):
  """Activation-boundary transfer (Heo et al. 2019) on pre-ReLU features, ABConnector per pair.

  Usually an initialisation stage (AB's `_init` rows in crd_cifar100.py).
  """

  def __init__(self, student_features: Sequence[str] = ("stage1_preact", "stage2_preact", "stage3_preact"),
               teacher_features: Sequence[str] = ("stage1_preact", "stage2_preact", "stage3_preact"),
               margin: float = 1.0):
    super().__init__(student_features, teacher_features)
    self.margin = margin

  def connector(self, s, t):
    return connectors.ABConnector(out_channels=t.shape[-1], out_hw=tuple(t.shape[1:3]))

  def loss(self, connected, t):
    # The paper's code scales the summed hinge by 1/1000 per example.
    return losses.activation_boundary_loss(connected, t, margin=self.margin) / 1000.0


@register_term("nst")
class NST(Term):
  """Neuron selectivity transfer (Huang & Wang 2017), summed over matched stages."""

  needs_teacher = True

  def __init__(self, student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
               teacher_features: Sequence[str] = ("stage1", "stage2", "stage3")):
    self.pairs = _pairs(student_features, teacher_features, "nst")

  def __call__(self, student, teacher, batch, params, state, *, step):
    total = 0.0
    for s_name, t_name in self.pairs:
      t = jax.lax.stop_gradient(feature(teacher, t_name, who="teacher"))
      total = total + losses.nst_loss(feature(student, s_name, who="student"), t)
    return total, state


@register_term("cc")
class CorrelationCongruence(Term):
  """Correlation congruence (Peng et al. 2019) between linear embeddings of both networks' pooled features."""

  needs_teacher = True

  def __init__(self, student_feature: str = "pre_logits", teacher_feature: str = "pre_logits", dim: int = 128,
               gamma: float = 0.4, order: int = 2):
    self.student_feature, self.teacher_feature = student_feature, teacher_feature
    self.embed = connectors.Embed(dim, normalize=False)
    self.gamma, self.order = gamma, order

  def init(self, rng, student, teacher):
    s_rng, t_rng = jax.random.split(rng)
    return {"student": init_connector(self.embed, s_rng, feature(student, self.student_feature, who="student"))[0],
            "teacher": init_connector(self.embed, t_rng, feature(teacher, self.teacher_feature, who="teacher"))[0]}, {}

  def __call__(self, student, teacher, batch, params, state, *, step):
    s = self.embed.apply({"params": params["student"]}, feature(student, self.student_feature, who="student"))
    t = self.embed.apply({"params": params["teacher"]},
                         jax.lax.stop_gradient(feature(teacher, self.teacher_feature, who="teacher")))
    return losses.correlation_congruence_loss(s, t, gamma=self.gamma, order=self.order), state
