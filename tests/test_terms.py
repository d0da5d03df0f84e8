"""Every registered loss term against the `kd_jax.losses` call it stands for, with its defaults written out.

For each term in `kd_jax.distill.term_names()` the table below holds a reference: the loss
functions called with the paper's hyper-parameters as literals (so a changed default of a
term fails here, though the loss function itself is unchanged) and the method's targets
wrapped in `stop_gradient` explicitly. The term, built with no options, must give the
reference's value and the reference's gradients with respect to the student's outputs,
the source's outputs and the term's params, and a gradient of exactly zero wherever the
method says the target is a constant: the teacher or the other peers, a model's own
deepest exit or ensemble, a frozen connector. A term without a table entry fails.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import distill, losses
from kd_jax.distill import Objective, Outputs
from kd_jax.distill.adversarial import FeatureDiscriminator
from kd_jax.models import connectors

sg = jax.lax.stop_gradient
B, CLASSES, NUM_TRAIN = 6, 5, 12
# Classes 0 and 1 have two examples each (CS-KD's partners are then fixed), 2 and 3 one (no partner).
LABELS = np.array([0, 1, 2, 0, 1, 3], np.int32)
STAGES = ("stage1", "stage2", "stage3")
S_CHANNELS, T_CHANNELS, SIZES = (4, 8, 8), (6, 12, 12), (8, 4, 2)


def _normal(rng, shape, scale=1.0):
  return scale * jax.random.normal(rng, shape, jnp.float32)


def _attention(rng, shape):
  return jax.nn.softmax(_normal(rng, shape, 2.0), axis=-1)


def _student() -> Outputs:
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  f = {}
  for stage, c, hw in zip(STAGES, S_CHANNELS, SIZES):
    f[f"{stage}_preact"] = _normal(next(keys), (B, hw, hw, c))
    f[stage] = jax.nn.relu(f[f"{stage}_preact"])
  f["pre_logits"] = jax.nn.relu(_normal(next(keys), (B, 8)))
  for stage in ("stage1", "stage2"):  # a `with_exits` model's early exits
    f[f"exit_{stage}_logits"] = _normal(next(keys), (B, CLASSES), 2.0)
    f[f"exit_{stage}"] = _normal(next(keys), (B, 8))
  f["gate_logits"] = _normal(next(keys), (B, 3))  # a `one` model's branches
  for m in range(3):
    f[f"branch_{m}_logits"] = _normal(next(keys), (B, CLASSES), 2.0)
    f[f"branch_{m}_pre_logits"] = _normal(next(keys), (B, 8))
  for m in range(2):  # a `group` model's members, with a fusion classifier
    f[f"member_{m}_logits"] = _normal(next(keys), (B, CLASSES), 2.0)
  f["fused_logits"] = _normal(next(keys), (B, CLASSES), 2.0)
  f["joint_logits"] = _normal(next(keys), (B, 4, CLASSES * 4), 2.0)  # an `sla` model, 4 rotations
  f["sd_logits"] = _normal(next(keys), (B, CLASSES), 2.0)
  f["aggregated_logits"] = _normal(next(keys), (B, CLASSES), 2.0)
  f["assistant_logits"] = _normal(next(keys), (B, CLASSES))  # a `residual` model
  f["student_logits"] = _normal(next(keys), (B, CLASSES), 2.0)
  for kind in ("encoder", "decoder_self", "decoder_cross"):  # a Transformer, one layer
    f[f"{kind}_attention_0"] = _attention(next(keys), (B, 2, 4, 4))
  f["decoder_self_attention_mask"] = jnp.tril(jnp.ones((4, 4), jnp.float32))[None, None]
  return Outputs(_normal(next(keys), (B, CLASSES), 2.0), f)


def _teacher(channels=T_CHANNELS) -> Outputs:
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 32))
  f = {}
  for stage, c, hw in zip(STAGES, channels, SIZES):
    f[f"{stage}_preact"] = _normal(next(keys), (B, hw, hw, c))
    f[stage] = jax.nn.relu(f[f"{stage}_preact"])
  f["pre_logits"] = jax.nn.relu(_normal(next(keys), (B, 12)))
  for kind in ("encoder", "decoder_self", "decoder_cross"):  # two layers
    for layer in range(2):
      f[f"{kind}_attention_{layer}"] = _attention(next(keys), (B, 2, 4, 4))
  return Outputs(_normal(next(keys), (B, CLASSES), 2.0), f)


def _peers() -> Outputs:
  """Two other peers' logits and features, stacked [2, B, ...] (exchange="predictions")."""
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  return Outputs(_normal(keys[0], (2, B, CLASSES), 2.0), {"pre_logits": _normal(keys[1], (2, B, 8))})


def _batch():
  return {"label": jnp.asarray(LABELS), "index": jnp.arange(B, dtype=jnp.int32) * 2,
          "rng": jax.random.PRNGKey(7)}


def _apply(module, params, state, x, **kwargs):
  """A connector in training mode: (output, new BatchNorm statistics)."""
  if state:
    out, updates = module.apply({"params": params, "batch_stats": state}, x, train=True, mutable=["batch_stats"],
                                **kwargs)
    return out, updates["batch_stats"]
  return module.apply({"params": params}, x, train=True, **kwargs), state


def _kd(z, target, temperature):
  return losses.kd_loss(z, sg(target), temperature=temperature)


def _ce(z, labels):
  return losses.cross_entropy(z, labels)


@dataclasses.dataclass(frozen=True)
class Case:
  """reference(student, source, batch, params, state) -> value (or (value, expected new state));
  constant_features: student features (or "logits") that are only ever targets; constant_params: term
  params no gradient may reach."""

  reference: Callable[..., Any]
  constant_features: tuple[str, ...] = ()
  constant_params: tuple[str, ...] = ()
  teacher: Callable[[], Outputs] = _teacher


def _feature_pairs(s, t, names=STAGES):
  return [(s.features[n], sg(t.features[n])) for n in names]


def _hint(s, t, batch, params, state):
  # FitNets: the regressor (conv + BN + ReLU) maps stage2 to the teacher's [4, 4, 12].
  out, _ = _apply(connectors.ConvReg(out_channels=12, out_hw=(4, 4)), params, state, s.features["stage2"])
  return losses.hint_loss(out, sg(t.features["stage2"]))


def _vid(s, t, batch, params, state):
  total = 0.0
  for i, (x, y) in enumerate(_feature_pairs(s, t)):
    (mean, variance), _ = _apply(connectors.VIDRegressor(out_channels=y.shape[-1], init_pred_var=5.0),
                                 params[f"pair{i}"], state.get(f"pair{i}", {}), x)
    total = total + losses.vid_loss(mean, y, variance)
  return total


def _ab(s, t, batch, params, state):
  total = 0.0
  pairs = _feature_pairs(s, t, [f"{n}_preact" for n in STAGES])
  for i, (x, y) in enumerate(pairs):
    out, _ = _apply(connectors.ABConnector(out_channels=y.shape[-1], out_hw=y.shape[1:3]), params[f"pair{i}"],
                    state.get(f"pair{i}", {}), x)
    # RepDistiller's ABLoss / Heo et al.'s code: stage i of n weighted 2^(i-n+1), the sum scaled by 3/1000.
    weight = 2.0 ** (i - len(pairs) + 1) * 3.0 / 1000.0
    total = total + weight * losses.activation_boundary_loss(out, y, margin=1.0)
  return total


def _cc(s, t, batch, params, state):
  embed = connectors.Embed(128, normalize=False)
  es = embed.apply({"params": params["student"]}, s.features["pre_logits"])
  et = embed.apply({"params": params["teacher"]}, sg(t.features["pre_logits"]))
  return losses.correlation_congruence_loss(es, et, gamma=0.4, order=2)


def _ft(s, t, batch, params, state):
  # Transfer stage: the paraphraser (rate 0.5, no BN) frozen, in inference mode; the translator (BN) trained.
  teacher_map = sg(t.features["stage3"])
  factor_t, _ = connectors.Paraphraser(rate=0.5, use_bn=False).apply({"params": sg(params["paraphraser"])},
                                                                       teacher_map, train=False)
  factor_s, _ = _apply(connectors.Translator(teacher_channels=12, rate=0.5, use_bn=True), params["translator"],
                       state.get("translator", {}), s.features["stage3"])
  return losses.factor_transfer_loss(factor_s, sg(factor_t), p=1)


def _reviewkd(s, t, batch, params, state):
  student_levels = [s.features[n] for n in ("stage1", "stage2", "stage3", "pre_logits")]
  teacher_levels = [sg(t.features[n]) for n in ("stage1_preact", "stage2_preact", "stage3_preact")]
  teacher_levels.append(sg(t.features["pre_logits"])[:, None, None, :])
  fusion = connectors.ReviewKDFusion(out_channels=(6, 12, 12, 12), mid_channels=min(512, 8),
                                     out_hw=((8, 8), (4, 4), (2, 2), (1, 1)))
  fused, _ = _apply(fusion, params, state, student_levels)
  return losses.hierarchical_context_loss(fused, teacher_levels, levels=(4, 2, 1))


def _crd(s, t, batch, params, state):
  # Tian et al. 2020: 128-d heads, 16384 negatives, tau 0.07, momentum 0.5.
  embed = connectors.Embed(128)
  es = embed.apply({"params": params["student"]}, s.features["pre_logits"])
  et = embed.apply({"params": params["teacher"]}, sg(t.features["pre_logits"]))
  negatives = losses.crd_sample_negatives(jax.random.fold_in(batch["rng"], 7), batch["index"], NUM_TRAIN, 16384)
  value, bank = losses.crd_loss(es, et, batch["index"], negatives, state, temperature=0.07, momentum=0.5)
  return value, bank


def _byot(s, t, batch, params, state):
  total = 0.0
  for stage in ("stage1", "stage2"):  # Zhang et al. 2019: alpha 0.3, beta 0.03, T 3
    z = s.features[f"exit_{stage}_logits"]
    total = total + 0.7 * _ce(z, batch["label"]) + 0.3 * _kd(z, s.logits, 3.0)
    total = total + 0.03 * jnp.sum(jnp.square(s.features[f"exit_{stage}"] - sg(s.features["pre_logits"])), -1)
  return total


def _cskd(s, t, batch, params, state):
  partner = jnp.array([3, 4, 0, 0, 1, 0])  # the other example of the same class (2 and 5 have none)
  value = losses.class_wise_kd_loss(s.logits, sg(s.logits[partner]), temperature=4.0)
  # The mean over the 4 paired rows (the authors' sampler pairs every example): B / 4 on each paired row.
  return jnp.where(jnp.array([True, True, False, True, True, False]), value, 0.0) * 6 / 4


def _one(s, t, batch, params, state):
  branches = jnp.stack([s.features[f"branch_{m}_logits"] for m in range(3)])
  ensemble = losses.gated_ensemble_logits(branches, s.features["gate_logits"])
  ce = sum(_ce(z, batch["label"]) for z in branches) + _ce(ensemble, batch["label"])
  return ce + 1.0 * sum(_kd(z, ensemble, 3.0) for z in branches)  # Lan et al. 2018: T 3


def _okddip(s, t, batch, params, state):
  # DefangChen/OKDDip: nothing detached, projections C / 8 wide, the KD weight ramped by exp(-5 (1 - e / 80)^2)
  # (epoch e = 0 here), T 3.
  logits = jnp.stack([s.features[f"branch_{m}_logits"] for m in range(3)])
  h = jnp.stack([s.features[f"branch_{m}_pre_logits"] for m in range(1, 3)])
  width = h.shape[-1]
  assert params["query"]["kernel"].shape == params["key"]["kernel"].shape == (width, max(width // 8, 1))
  weights = losses.peer_attention_weights(h @ params["query"]["kernel"], h @ params["key"]["kernel"])
  targets = losses.peer_attention_logits(weights, logits[1:])
  peer_kd = sum(losses.soft_kl_loss(z, y, temperature=3.0) for z, y in zip(logits[1:], targets))
  leader_kd = losses.soft_kl_loss(logits[0], jnp.mean(logits[1:], axis=0), temperature=3.0)
  return sum(_ce(z, batch["label"]) for z in logits) + 1.0 * np.exp(-5.0) * (peer_kd + leader_kd)


def _ffl(s, t, batch, params, state):
  members = [s.features[f"member_{m}_logits"] for m in range(2)]
  fused = s.features["fused_logits"]
  ce = sum(_ce(z, batch["label"]) for z in members) + _ce(fused, batch["label"])
  return ce + 1.0 * (sum(_kd(z, fused, 3.0) for z in members) + _kd(fused, sum(members) / 2, 3.0))


def _sla(s, t, batch, params, state):
  f = s.features
  return (losses.sla_loss(f["joint_logits"], batch["label"]) + _kd(f["sd_logits"], f["aggregated_logits"], 1.0)
          + 1.0 * _ce(f["sd_logits"], batch["label"]))


def _kdcl(s, t, batch, params, state):
  members = jnp.concatenate([s.logits[None], t.logits])
  return _kd(s.logits, losses.kdcl_ensemble_logits(members, labels=batch["label"], kind="mean"), 2.0)


def _afd(s, t, batch, params, state):
  # Chung et al. 2020: an LSGAN discriminator (one hidden layer of 64), Adam lr 1e-4, betas (0.5, 0.999).
  discriminator = FeatureDiscriminator(hidden=(64,))
  own, peers = s.features["pre_logits"], sg(t.features["pre_logits"])
  value = losses.adversarial_generator_loss(discriminator.apply({"params": sg(state["discriminator"])}, own),
                                            kind="lsgan")

  def discriminator_loss(d):
    real = jax.vmap(lambda p: discriminator.apply({"params": d}, p))(peers)
    return jnp.mean(losses.adversarial_discriminator_loss(real, discriminator.apply({"params": d}, sg(own)),
                                                          kind="lsgan"))

  d_loss, grads = jax.value_and_grad(discriminator_loss)(state["discriminator"])
  optimizer = optax.adam(1e-4, b1=0.5, b2=0.999)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["discriminator"])
  return value, {"discriminator": optax.apply_updates(state["discriminator"], updates), "opt_state": opt_state,
                 "discriminator_loss": d_loss}


def _attention_distillation(s, t, batch, params, state):
  # MiniLM's KL over heads, TinyBERT's uniform layer map: 1 student layer <- teacher layer 1 of 2.
  mask = s.features["decoder_self_attention_mask"]
  parts = [losses.attention_map_loss(s.features[f"{kind}_attention_0"], sg(t.features[f"{kind}_attention_1"]),
                                     mask=mask if kind == "decoder_self" else None, kind="kl", heads="equal")
           for kind in ("encoder", "decoder_self", "decoder_cross")]
  return 1.0 * sum(parts) / 3


CASES: dict[str, Case] = {
    "ce": Case(lambda s, t, b, p, st: _ce(s.logits, b["label"])),
    "kd": Case(lambda s, t, b, p, st: _kd(s.logits, t.logits, 4.0)),  # Hinton et al. 2015 (CRD's T = 4)
    "logit_mse": Case(lambda s, t, b, p, st: losses.logit_mse_loss(s.logits, sg(t.logits))),
    # Zhao et al. 2022: alpha 1, beta 8, T 4 (CIFAR-100).
    "dkd": Case(lambda s, t, b, p, st: losses.dkd_loss(s.logits, sg(t.logits), b["label"], alpha=1.0, beta=8.0,
                                                       temperature=4.0)),
    "dist": Case(lambda s, t, b, p, st: losses.dist_loss(s.logits, sg(t.logits), beta=1.0, gamma=1.0,
                                                         temperature=1.0)),
    "tfkd": Case(lambda s, t, b, p, st: losses.teacher_free_kd_loss(s.logits, b["label"], correct_probability=0.99,
                                                                    temperature=20.0)),
    "pseudo_label": Case(lambda s, t, b, p, st: losses.pseudo_label_loss(s.logits, sg(t.logits), hard=False,
                                                                         temperature=1.0)),
    "residual": Case(lambda s, t, b, p, st: losses.residual_error_loss(
        s.features["assistant_logits"], sg(t.logits), sg(s.features["student_logits"])),
        constant_features=("student_logits",)),
    "hint": Case(_hint),
    # Zagoruyko & Komodakis 2017: p = 2 on stages 1-3.
    "at": Case(lambda s, t, b, p, st: sum(losses.attention_transfer_loss(x, y, p=2.0)
                                          for x, y in _feature_pairs(s, t))),
    "fsp": Case(lambda s, t, b, p, st: sum(
        losses.fsp_loss(s.features[a], s.features[c], sg(t.features[a]), sg(t.features[c]))
        for a, c in (("stage1", "stage2"), ("stage2", "stage3"))),
        teacher=lambda: _teacher(channels=S_CHANNELS)),  # FSP matrices compare networks of equal widths
    "sp": Case(lambda s, t, b, p, st: losses.similarity_preserving_loss(s.features["stage3"],
                                                                        sg(t.features["stage3"]))),
    # Park et al. 2019: distance 25, angle 50.
    "rkd": Case(lambda s, t, b, p, st: losses.rkd_loss(s.features["pre_logits"], sg(t.features["pre_logits"]),
                                                       distance_weight=25.0, angle_weight=50.0)),
    "pkt": Case(lambda s, t, b, p, st: losses.pkt_loss(s.features["pre_logits"], sg(t.features["pre_logits"]))),
    "nst": Case(lambda s, t, b, p, st: sum(losses.nst_loss(x, y) for x, y in _feature_pairs(s, t))),
    "vid": Case(_vid),
    "ab": Case(_ab),
    "cc": Case(_cc),
    "ft": Case(_ft, constant_params=("paraphraser",)),
    "reviewkd": Case(_reviewkd),
    "crd": Case(_crd),
    "byot": Case(_byot, constant_features=("logits", "pre_logits")),
    "cskd": Case(_cskd),
    # Phuong & Lampert 2019: T 4, alpha 0.5, the final exit as every exit's teacher.
    "multi_exit": Case(lambda s, t, b, p, st: losses.multi_exit_kd_loss(
        [s.features["exit_stage1_logits"], s.features["exit_stage2_logits"], s.logits], b["label"],
        temperature=4.0, alpha=0.5, teachers="final"), constant_features=("logits",)),
    "sla": Case(_sla, constant_features=("aggregated_logits",)),
    "one": Case(_one),
    "okddip": Case(_okddip),
    "ffl": Case(_ffl),
    "dml": Case(lambda s, t, b, p, st: losses.mutual_learning_loss(s.logits, sg(t.logits), temperature=1.0)),
    "codistill": Case(lambda s, t, b, p, st: losses.codistillation_loss(s.logits, sg(t.logits), temperature=1.0)),
    "kdcl": Case(_kdcl),
    "afd": Case(_afd),
    "attention": Case(_attention_distillation),
}


def test_every_registered_term_has_a_reference():
  # kd_jax's own terms (other tests register throwaway ones in the same process).
  ours = [n for n in distill.term_names() if distill.core._TERMS[n].__module__.startswith("kd_jax.")]
  assert sorted(CASES) == ours, "add the new term's reference to CASES"


def _source(term, case):
  if term.needs_peers:
    return _peers()
  if term.needs_teacher:
    return case.teacher()
  return None


def _mean(value):
  return jnp.mean(value.astype(jnp.float32))


@pytest.mark.parametrize("name", sorted(CASES))
def test_term_equals_its_reference_and_treats_targets_as_constants(name):
  objective = Objective({name: {}}, steps_per_epoch=1, num_train=NUM_TRAIN)
  term, case = objective.terms[name], CASES[name]
  student, source, batch = _student(), _source(term, case), _batch()
  params, state = objective.init(jax.random.PRNGKey(4), student, source)
  params, state = params.get(name, {}), state.get(name, {})

  def term_value(s, t, p):
    value, new_state = term(s, t, batch, p, state, step=jnp.zeros((), jnp.int32))
    return _mean(value), (value, new_state)

  def reference_value(s, t, p):
    out = case.reference(s, t, batch, p, state)
    value, new_state = out if isinstance(out, tuple) else (out, None)
    return _mean(value), (value, new_state)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(student, source, params)
  (_, (value, new_state)), grads = grad(term_value)
  (_, (expected, expected_state)), expected_grads = grad(reference_value)
  assert value.shape == expected.shape
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, expected_grads)
  if expected_state is not None:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_state, expected_state)

  student_grads, source_grads, param_grads = grads
  for leaf in jax.tree.leaves(source_grads):  # the teacher or the other peers
    np.testing.assert_array_equal(leaf, 0.0)
  named = {"logits": student_grads.logits, **student_grads.features}
  for feature_name in case.constant_features:
    np.testing.assert_array_equal(named[feature_name], 0.0, err_msg=feature_name)
  for param_name in case.constant_params:
    for leaf in jax.tree.leaves(param_grads[param_name]):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=param_name)
  trained = [leaf for key, tree in (param_grads.items() if isinstance(param_grads, dict) else ())
             if key not in case.constant_params for leaf in jax.tree.leaves(tree)]
  if trained:  # the term's connectors learn from it
    assert any(np.any(np.asarray(leaf) != 0) for leaf in trained)
