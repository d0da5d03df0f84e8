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
from kd_jax.distill.core import Term, feature, register_term
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
  # A connector may have no params (AB's identity connector when the shapes already agree).
  return variables.get("params", {}), variables.get("batch_stats", {})


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
  """Attention transfer (Zagoruyko & Komodakis 2017), summed over matched stages.

  Maps of different spatial sizes (cross-architecture pairs) are matched by
  average-pooling the larger one, as RepDistiller's `Attention` does.
  """

  needs_teacher = True

  def __init__(self, student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
               teacher_features: Sequence[str] = ("stage1", "stage2", "stage3"), p: float = 2.0):
    self.pairs, self.p = _pairs(student_features, teacher_features, "at"), p

  def __call__(self, student, teacher, batch, params, state, *, step):
    total = 0.0
    for s_name, t_name in self.pairs:
      s, t = _match_spatial(feature(student, s_name, who="student"),
                            jax.lax.stop_gradient(feature(teacher, t_name, who="teacher")))
      total = total + losses.attention_transfer_loss(s, t, p=self.p)
    return total, state


@register_term("fsp")
class FSP(Term):
  """Flow of solution procedure (Yim et al. 2017) between consecutive named features.

  reduction: "sum" over the C1·C2 entries of each FSP matrix (the paper's
  formula, `losses.fsp_loss`) or their "mean", as RepDistiller's `FSP.py` computes
  it; RepDistiller's init stage (`helper/pretrain.py`) sums those means with no factor.
  """

  needs_teacher = True

  def __init__(self, student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
               teacher_features: Sequence[str] = ("stage1", "stage2", "stage3"), reduction: str = "sum"):
    if reduction not in ("sum", "mean"):
      raise ValueError(f"fsp: reduction must be 'sum' or 'mean', got {reduction!r}")
    self.pairs = _pairs(student_features, teacher_features, "fsp")
    self.reduction = reduction

  def __call__(self, student, teacher, batch, params, state, *, step):
    total = 0.0
    for (s1, t1), (s2, t2) in zip(self.pairs[:-1], self.pairs[1:]):
      first, second = feature(student, s1, who="student"), feature(student, s2, who="student")
      t_first = jax.lax.stop_gradient(feature(teacher, t1, who="teacher"))
      t_second = jax.lax.stop_gradient(feature(teacher, t2, who="teacher"))
      value = losses.fsp_loss(first, second, t_first, t_second)
      if self.reduction == "mean":
        value = value / (first.shape[-1] * second.shape[-1])
      total = total + value
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

  def pair_loss(self, i: int, connected, teacher_feature):
    """Pair i's loss; the same `loss` for every pair unless a term weights its pairs (AB)."""
    return self.loss(connected, teacher_feature)

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
      total = total + self.pair_loss(i, out, t)
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

  Usually an initialisation stage (AB's `_init` rows in crd_cifar100.py). Stage i of n
  is weighted 2^(i − n + 1) · 3 / 1000 (deepest 3/1000, then half as much per stage
  up), as the AB authors' `cifar10_AB_distillation.py` and RepDistiller's `ABLoss`:
  with the Objective's batch mean this is their Σ_i w_i · hinge_i / B · 3 / 1000.
  `stage_weights` overrides the per-stage factors (the 3/1000 included).
  """

  def __init__(self, student_features: Sequence[str] = ("stage1_preact", "stage2_preact", "stage3_preact"),
               teacher_features: Sequence[str] = ("stage1_preact", "stage2_preact", "stage3_preact"),
               margin: float = 1.0, stage_weights: Sequence[float] | None = None):
    super().__init__(student_features, teacher_features)
    n = len(self.pairs)
    self.stage_weights = ([2.0 ** (i - n + 1) * 3.0 / 1000.0 for i in range(n)] if stage_weights is None
                          else [float(w) for w in stage_weights])
    if len(self.stage_weights) != n:
      raise ValueError(f"ab: stage_weights has {len(self.stage_weights)} entries for {n} feature pairs")
    self.margin = margin

  def connector(self, s, t):
    return connectors.ABConnector(out_channels=t.shape[-1], out_hw=tuple(t.shape[1:3]))

  def pair_loss(self, i, connected, t):
    return self.stage_weights[i] * losses.activation_boundary_loss(connected, t, margin=self.margin)


@register_term("nst")
class NST(Term):
  """Neuron selectivity transfer (Huang & Wang 2017), summed over matched stages (the larger map
  average-pooled to the smaller's size, as RepDistiller's `NSTLoss`)."""

  needs_teacher = True

  def __init__(self, student_features: Sequence[str] = ("stage1", "stage2", "stage3"),
               teacher_features: Sequence[str] = ("stage1", "stage2", "stage3")):
    self.pairs = _pairs(student_features, teacher_features, "nst")

  def __call__(self, student, teacher, batch, params, state, *, step):
    total = 0.0
    for s_name, t_name in self.pairs:
      s, t = _match_spatial(feature(student, s_name, who="student"),
                            jax.lax.stop_gradient(feature(teacher, t_name, who="teacher")))
      total = total + losses.nst_loss(s, t)
    return total, state


@register_term("cc")
class CorrelationCongruence(Term):
  """Correlation congruence (Peng et al. 2019) between linear embeddings of both networks' pooled features.

  variant="paper": the paper's Taylor-expanded RBF correlation matrices
  (`losses.correlation_congruence_loss`, with `gamma` and `order`);
  variant="repdistiller": RepDistiller's `CC.py`, the loss behind the CRD table's CC
  figures and weight 0.02 (`losses.consecutive_correlation_loss`). Both embed with a
  trainable linear layer per network (RepDistiller's `LinearEmbed`, width `dim`).
  """

  needs_teacher = True

  def __init__(self, student_feature: str = "pre_logits", teacher_feature: str = "pre_logits", dim: int = 128,
               gamma: float = 0.4, order: int = 2, variant: str = "paper"):
    if variant not in ("paper", "repdistiller"):
      raise ValueError(f"cc: variant must be 'paper' or 'repdistiller', got {variant!r}")
    self.student_feature, self.teacher_feature = student_feature, teacher_feature
    self.embed = connectors.Embed(dim, normalize=False)
    self.gamma, self.order, self.variant = gamma, order, variant

  def init(self, rng, student, teacher):
    s_rng, t_rng = jax.random.split(rng)
    return {"student": init_connector(self.embed, s_rng, feature(student, self.student_feature, who="student"))[0],
            "teacher": init_connector(self.embed, t_rng, feature(teacher, self.teacher_feature, who="teacher"))[0]}, {}

  def __call__(self, student, teacher, batch, params, state, *, step):
    s = self.embed.apply({"params": params["student"]}, feature(student, self.student_feature, who="student"))
    t = self.embed.apply({"params": params["teacher"]},
                         jax.lax.stop_gradient(feature(teacher, self.teacher_feature, who="teacher")))
    if self.variant == "repdistiller":
      return losses.consecutive_correlation_loss(s, t), state
    return losses.correlation_congruence_loss(s, t, gamma=self.gamma, order=self.order), state


@register_term("ft")
class FactorTransfer(Term):
  """Factor transfer (Kim et al. 2018): the student's translated factor against the teacher's paraphrased one.

  Two stages, two config rows (crd_cifar100.py's `..._ft_init` and `..._ft`):
    stage="paraphraser": trains FT's paraphraser (connectors.Paraphraser, an
      autoencoder on the teacher's feature) on the reconstruction MSE of that
      feature; run it as a row with `freeze=["student"]` so only the paraphraser learns.
    stage="transfer": the FT loss between the translator's output on the
      student's feature (trained with the student) and the paraphraser's factor
      of the teacher's. The paraphraser is frozen (`frozen_params`): the row must
      start from the paraphraser stage (`init_from`), which hands over the term's
      params by name and shape.
  The larger factor map is average-pooled to the smaller's size. `factor="paper"`
  compares the L2-normalised flattened factors (losses.factor_transfer_loss);
  `factor="repdistiller"` first reduces each factor to the mean over channels of
  its square, as RepDistiller's `FactorTransfer` (p1=2) whose weight (200) and
  figures the CRD table uses.
  """

  needs_teacher = True
  STAGES = ("paraphraser", "transfer")
  FACTORS = ("paper", "repdistiller")

  def __init__(self, student_feature: str = "stage3", teacher_feature: str = "stage3", stage: str = "transfer",
               rate: float = 0.5, p: int = 1, factor: str = "paper", paraphraser_bn: bool = False,
               translator_bn: bool = True):
    if stage not in self.STAGES:
      raise ValueError(f"ft: unknown stage {stage!r}; known: {self.STAGES}")
    if factor not in self.FACTORS:
      raise ValueError(f"ft: unknown factor {factor!r}; known: {self.FACTORS}")
    self.student_feature, self.teacher_feature, self.stage = student_feature, teacher_feature, stage
    self.rate, self.p, self.factor = rate, p, factor
    self.paraphraser = connectors.Paraphraser(rate=rate, use_bn=paraphraser_bn)
    self.translator_bn = translator_bn
    # Term params the optimizer must leave alone; the engine requires them from init_from.
    self.frozen_params = ("paraphraser",) if stage == "transfer" else ()

  def _translator(self, teacher_map):
    return connectors.Translator(teacher_channels=teacher_map.shape[-1], rate=self.rate, use_bn=self.translator_bn)

  def _teacher_map(self, teacher):
    t = jax.lax.stop_gradient(feature(teacher, self.teacher_feature, who="teacher"))
    if t.ndim != 4:
      raise ValueError(f"ft: teacher feature {self.teacher_feature!r} must be a map [B, H, W, C], got {t.shape}")
    return t

  def init(self, rng, student, teacher):
    t = self._teacher_map(teacher)
    p_rng, t_rng = jax.random.split(rng)
    params, state = {}, {}
    params["paraphraser"], stats = init_connector(self.paraphraser, p_rng, t)
    if stats:
      state["paraphraser"] = stats
    if self.stage == "transfer":
      s = feature(student, self.student_feature, who="student")
      params["translator"], stats = init_connector(self._translator(t), t_rng, s)
      if stats:
        state["translator"] = stats
    return params, state

  def __call__(self, student, teacher, batch, params, state, *, step):
    t = self._teacher_map(teacher)
    new_state = dict(state)
    if self.stage == "paraphraser":
      (_, reconstruction), stats = apply_connector(self.paraphraser, params["paraphraser"],
                                                   state.get("paraphraser", {}), t)
      if stats:
        new_state["paraphraser"] = stats
      diff = reconstruction.astype(jnp.float32) - t.astype(jnp.float32)
      return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=1), new_state
    # The frozen paraphraser runs in inference mode (RepDistiller puts it in eval()).
    frozen = jax.lax.stop_gradient({"params": params["paraphraser"],
                                    **({"batch_stats": state["paraphraser"]} if "paraphraser" in state else {})})
    teacher_factor, _ = self.paraphraser.apply(frozen, t, train=False)
    student_factor, stats = apply_connector(self._translator(t), params["translator"], state.get("translator", {}),
                                            feature(student, self.student_feature, who="student"))
    if stats:
      new_state["translator"] = stats
    student_factor, teacher_factor = _match_spatial(student_factor, jax.lax.stop_gradient(teacher_factor))
    if self.factor == "repdistiller":
      reduce = lambda f: jnp.mean(jnp.square(f.astype(jnp.float32)), axis=-1)  # [B, H, W]
      student_factor, teacher_factor = reduce(student_factor), reduce(teacher_factor)
    return losses.factor_transfer_loss(student_factor, teacher_factor, p=self.p), new_state


@register_term("reviewkd")
class ReviewKD(Term):
  """Knowledge review (Chen et al. 2021): the student's levels fused deep to shallow, against the teacher's.

  The student's features (shallow to deep, the pooled embedding last) go through
  ReviewKD's attention-based fusion (connectors.ReviewKDFusion, the term's params;
  its BatchNorm statistics the term's state), which maps level i to the teacher's
  feature i's channels and size; the loss is the hierarchical context loss
  (losses.hierarchical_context_loss). As in the authors' code and mdistiller, the
  teacher's maps are taken before their final ReLU (`stageK_preact`), the
  student's after it (on CIFAR). Warm the weight up with `warmup_epochs` (20).
  """

  needs_teacher = True

  def __init__(self, student_features: Sequence[str] = ("stage1", "stage2", "stage3", "pre_logits"),
               teacher_features: Sequence[str] = ("stage1_preact", "stage2_preact", "stage3_preact", "pre_logits"),
               levels: Sequence[int] = (4, 2, 1), max_mid_channels: int = 512):
    self.pairs = _pairs(student_features, teacher_features, "reviewkd")
    self.levels, self.max_mid_channels = tuple(levels), max_mid_channels

  def _features(self, student, teacher):
    s = [feature(student, name, who="student") for name, _ in self.pairs]
    t = [jax.lax.stop_gradient(feature(teacher, name, who="teacher")) for _, name in self.pairs]
    return s, [x[:, None, None, :] if x.ndim == 2 else x for x in t]  # the pooled level as a 1x1 map

  def _fusion(self, s, t):
    return connectors.ReviewKDFusion(
        out_channels=tuple(int(x.shape[-1]) for x in t),
        mid_channels=min(self.max_mid_channels, int(s[-1].shape[-1])),
        out_hw=tuple(tuple(int(d) for d in x.shape[1:3]) for x in t))

  def init(self, rng, student, teacher):
    s, t = self._features(student, teacher)
    return init_connector(self._fusion(s, t), rng, s)

  def __call__(self, student, teacher, batch, params, state, *, step):
    s, t = self._features(student, teacher)
    fused, state = apply_connector(self._fusion(s, t), params, state, s)
    return losses.hierarchical_context_loss(fused, t, levels=self.levels), state
