"""Losses and recipes against numpy ports of the reference code that produced the papers' figures (issue 24)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.distill import Objective, Outputs

RNG = np.random.default_rng(24)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _authors_normalize(z):
  """sunshangquan/logit-standardization-KD `normalize`: (z − mean) / (1e-7 + torch.std), torch.std unbiased."""
  return (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, ddof=1, keepdims=True))


def _authors_kd(s, t, temperature):
  """Their kd_loss with logit_stand=True, per example (before the batch mean)."""
  log_p_s = _log_softmax(_authors_normalize(s) / temperature)
  log_p_t = _log_softmax(_authors_normalize(t) / temperature)
  return (np.exp(log_p_t) * (log_p_t - log_p_s)).sum(1) * temperature ** 2


def _authors_dkd(s, t, labels, alpha, beta, temperature):
  """Their dkd_loss with logit_stand=True (mdistiller's DKD on z-scored logits), per example."""
  s, t = _authors_normalize(s) / temperature, _authors_normalize(t) / temperature
  gt = np.eye(s.shape[1], dtype=bool)[labels]
  softmax = lambda z: np.exp(_log_softmax(z))
  p_s, p_t = softmax(s), softmax(t)
  b_s = np.stack([p_s[gt], p_s[~gt].reshape(len(s), -1).sum(1)], 1)
  b_t = np.stack([p_t[gt], p_t[~gt].reshape(len(t), -1).sum(1)], 1)
  tckd = (b_t * (np.log(b_t) - np.log(b_s))).sum(1)
  log_q_s, log_q_t = _log_softmax(s - 1000.0 * gt), _log_softmax(t - 1000.0 * gt)
  nckd = (np.exp(log_q_t) * (log_q_t - log_q_s)).sum(1)
  return (alpha * tckd + beta * nckd) * temperature ** 2


def test_logit_standardization_is_the_authors_normalize():
  z = RNG.normal(size=(6, 100)) * 5 + 3
  np.testing.assert_allclose(losses.standardize_logits(jnp.asarray(z, jnp.float32)), _authors_normalize(z),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="at least 2 classes"):
    losses.standardize_logits(jnp.zeros((2, 1)))


def test_standardized_kd_and_dkd_are_the_authors_losses():
  s, t = RNG.normal(size=(16, 100)) * 3, RNG.normal(size=(16, 100)) * 8 + 1
  labels = RNG.integers(0, 100, 16)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(losses.kd_loss(f32(s), f32(t), temperature=2.0, standardize=True),
                             _authors_kd(s, t, 2.0), rtol=1e-4)
  np.testing.assert_allclose(losses.dkd_loss(f32(s), f32(t), jnp.asarray(labels), alpha=9.0, beta=81.0,
                                             temperature=4.0, standardize=True),
                             _authors_dkd(s, t, labels, 9.0, 81.0, 4.0), rtol=1e-4)
  # Invariant to each row's shift and scale (what the method is for); plain KD is not.
  shifted = f32(3.0 * t + 7.0)
  np.testing.assert_allclose(losses.kd_loss(f32(s), shifted, temperature=2.0, standardize=True),
                             _authors_kd(s, t, 2.0), rtol=1e-4)
  # Through the terms: the option reaches the loss.
  batch = {"label": jnp.asarray(labels)}
  objective = Objective({"kd": {"temperature": 2.0, "standardize": True},
                         "dkd": {"alpha": 9.0, "beta": 81.0, "temperature": 4.0, "standardize": True}})
  _, metrics, _ = objective({}, {}, Outputs(f32(s)), Outputs(f32(t)), batch, step=jnp.int32(0))
  np.testing.assert_allclose(metrics["loss/kd"], _authors_kd(s, t, 2.0).mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss/dkd"], _authors_dkd(s, t, labels, 9.0, 81.0, 4.0).mean(), rtol=1e-4)
  with pytest.raises(ValueError, match="'kd': standardize must be True or False, got 'yes'"):
    Objective({"kd": {"standardize": "yes"}})


def test_dkd_epoch_warmup_is_mdistillers_staircase():
  """mdistiller: min(epoch / WARMUP, 1) with epochs counted from 1; WARMUP=1 is full weight from the start."""
  cifar = Objective({"dkd": {"weight": 1.0, "warmup_epochs": 20, "warmup_shape": "epoch"}}, steps_per_epoch=10)
  for step, epoch in ((0, 1), (9, 1), (10, 2), (195, 20), (500, 51)):
    assert float(cifar.weight("dkd", jnp.int32(step))) == pytest.approx(min(epoch / 20, 1.0))
  imagenet = Objective({"dkd": {"weight": 1.0, "warmup_epochs": 1, "warmup_shape": "epoch"}}, steps_per_epoch=10)
  assert float(imagenet.weight("dkd", jnp.int32(0))) == 1.0
  linear = Objective({"dkd": {"weight": 1.0, "warmup_epochs": 1}}, steps_per_epoch=10)
  assert float(linear.weight("dkd", jnp.int32(5))) == 0.5
  with pytest.raises(ValueError, match="warmup_shape must be 'linear' or 'epoch', got 'cosine'"):
    Objective({"dkd": {"warmup_shape": "cosine"}})


def _repdistiller_cc(f_s, f_t):
  """RepDistiller distiller_zoo/CC.py `Correlation.forward`."""
  delta = np.abs(f_s - f_t)
  return np.mean((delta[:-1] * delta[1:]).sum(1))


def test_repdistiller_cc_is_its_correlation_and_the_crd_table_uses_it():
  from experiments.configs import crd_cifar100

  f_s, f_t = RNG.normal(size=(64, 128)), RNG.normal(size=(64, 128))
  np.testing.assert_allclose(losses.consecutive_correlation_loss(jnp.asarray(f_s, jnp.float32),
                                                                 jnp.asarray(f_t, jnp.float32)),
                             _repdistiller_cc(f_s, f_t), rtol=1e-5)
  # The table's CC row on pooled features: both LinearEmbed layers (x Wᵀ + b, torch layout) then CC.py.
  terms = crd_cifar100.method_terms("cc", "resnet32x4", "resnet8x4")
  assert terms["cc"] == {"weight": 0.02, "variant": "repdistiller"}
  student = Outputs(jnp.zeros((64, 100)), {"pre_logits": jnp.asarray(np.abs(RNG.normal(size=(64, 256))), jnp.float32)})
  teacher = Outputs(jnp.zeros((64, 100)), {"pre_logits": jnp.asarray(np.abs(RNG.normal(size=(64, 256))), jnp.float32)})
  objective = Objective(terms)
  params, state = objective.init(jax.random.PRNGKey(0), student, teacher)
  _, metrics, _ = objective(params, state, student, teacher, {"label": jnp.zeros(64, jnp.int32)}, step=jnp.int32(0))
  embed = lambda x, p: np.asarray(x, np.float64) @ np.asarray(p["linear"]["kernel"]) + np.asarray(p["linear"]["bias"])
  expected = _repdistiller_cc(embed(student.features["pre_logits"], params["cc"]["student"]),
                              embed(teacher.features["pre_logits"], params["cc"]["teacher"]))
  np.testing.assert_allclose(metrics["loss/cc"], expected, rtol=1e-4)
  # The paper's formula stays available, and is a much smaller quantity on the same embeddings.
  paper = Objective({"cc": {"weight": 0.02}})
  _, paper_metrics, _ = paper(params, state, student, teacher, {}, step=jnp.int32(0))
  assert float(paper_metrics["loss/cc"]) < 1e-3 * float(metrics["loss/cc"])
  with pytest.raises(ValueError, match="variant must be 'paper' or 'repdistiller', got 'rbf'"):
    Objective({"cc": {"variant": "rbf"}})


def _ab_hinge(source, target, margin=1.0):
  """RepDistiller AB.py `criterion_alternative_l2` (summed over the batch)."""
  loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0))
          + (source - margin) ** 2 * ((source <= margin) & (target > 0)))
  return np.abs(loss).sum()


def test_ab_weights_its_stages_as_repdistiller_and_the_authors():
  """ABLoss: stage i of n weighted 2^(i−n+1), divided by the batch size, times 3/1000."""
  from kd_jax.distill import features as distill_features

  shapes = [(4, 8, 8, 4), (4, 4, 4, 6), (4, 2, 2, 8)]
  names = ["stage1_preact", "stage2_preact", "stage3_preact"]
  maps = lambda: {n: jnp.asarray(RNG.normal(size=s), jnp.float32) for n, s in zip(names, shapes)}
  student, teacher = Outputs(jnp.zeros((4, 10)), maps()), Outputs(jnp.zeros((4, 10)), maps())
  objective = Objective({"ab": {"weight": 1.0}})
  params, state = objective.init(jax.random.PRNGKey(0), student, teacher)
  total, _, _ = objective(params, state, student, teacher, {}, step=jnp.int32(0))
  term = objective.terms["ab"]
  expected = 0.0
  for i, name in enumerate(names):
    s, t = student.features[name], teacher.features[name]
    out, _ = distill_features.apply_connector(term.connector(s, t), params["ab"][f"pair{i}"],
                                              state["ab"][f"pair{i}"], s)
    expected += 2.0 ** (i - 3 + 1) * _ab_hinge(np.asarray(out, np.float64), np.asarray(t, np.float64)) / 4 / 1000 * 3
  np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_fsp_init_stage_sums_the_per_pair_means_with_no_factor():
  """RepDistiller helper/pretrain.py: loss = sum(FSP(feat_s[:-1], feat_t[:-1])); its -b 50 never reaches it."""
  from experiments.configs import crd_cifar100

  terms = crd_cifar100.method_terms("fsp_init", "resnet32x4", "resnet8x4")
  assert terms["fsp"]["weight"] == 1.0 and terms["fsp"]["reduction"] == "mean"


def test_at_table_kd_is_the_2017_code_s_kl_div_average():
  """szagoruyko/attention-transfer before "fix KL" (4133ac5): kl_div averaged over B·K, times T²·2α, + (1−α)·CE."""
  from experiments.configs import at_cifar10

  s, t = RNG.normal(size=(32, 10)) * 2, RNG.normal(size=(32, 10)) * 4
  labels = RNG.integers(0, 10, 32)
  T, alpha = 4.0, 0.9
  log_p_s, log_p_t = _log_softmax(s / T), _log_softmax(t / T)
  kl_div_mean = np.mean(np.exp(log_p_t) * (log_p_t - log_p_s))  # F.kl_div's size_average over every element
  ce = -np.mean(_log_softmax(s)[np.arange(32), labels])
  expected = kl_div_mean * (T * T * 2.0 * alpha) + ce * (1.0 - alpha)
  objective = Objective(at_cifar10.method_terms("kd"))
  total, _, _ = objective({}, {}, Outputs(jnp.asarray(s, jnp.float32)), Outputs(jnp.asarray(t, jnp.float32)),
                          {"label": jnp.asarray(labels)}, step=jnp.int32(0))
  np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_mnist_self_paper_figures_are_accuracies():
  """The table's metric is test accuracy (%): Hinton et al.'s 146 test errors are 98.54%."""
  from experiments.configs import mnist_self

  config = mnist_self.get_config()
  assert config.paper_metric == "test_accuracy"
  assert float(config.rows.student.paper) == 98.54
  assert all(r.paper == "" or 0 < float(r.paper) <= 100 for r in config.rows.values())


def test_cskd_batch_mean_is_the_mean_over_the_paired_rows():
  """alinlab/cs-kd pairs every example (PairBatchSampler); kd_jax's batch mean is the mean over rows with a partner."""
  labels = jnp.array([0, 1, 0, 2, 1, 3, 0, 4])  # classes 2, 3, 4 have a single member
  logits = jnp.asarray(RNG.normal(size=(8, 5)), jnp.float32)
  batch = {"label": labels, "rng": jax.random.PRNGKey(1)}
  paired, _, _ = Objective({"cskd": {"temperature": 4.0}})({}, {}, Outputs(logits), None, batch, step=jnp.int32(0))
  term = Objective({"cskd": {"temperature": 4.0, "mean_over": "batch"}}).terms["cskd"]
  values, _ = term(Outputs(logits), None, batch, {}, {}, step=jnp.int32(0))
  has_partner = np.array([1, 1, 1, 0, 1, 0, 1, 0], bool)
  # Each paired row's KL against a same-class partner, numpy: T² Σ p_partner (log p_partner − log p_row).
  z, lab = np.asarray(logits, np.float64) / 4.0, np.asarray(labels)
  kls = []
  for i in np.flatnonzero(has_partner):
    j = [k for k in range(8) if k != i and lab[k] == lab[i] and np.isclose(values[i], _kl(z[k], z[i]), rtol=1e-4)]
    assert j, i  # the term's value is the KL to one of the row's class mates
    kls.append(_kl(z[j[0]], z[i]))
  np.testing.assert_allclose(paired, np.mean(kls), rtol=1e-4)
  np.testing.assert_allclose(np.mean(np.asarray(values)), np.sum(kls) / 8, rtol=1e-4)  # the old, 5/8 as large
  with pytest.raises(ValueError, match="mean_over must be 'paired' or 'batch', got 'all'"):
    Objective({"cskd": {"mean_over": "all"}})


def _kl(z_target, z):
  log_p, log_q = _log_softmax(z_target), _log_softmax(z)
  return 16.0 * np.sum(np.exp(log_p) * (log_p - log_q))


def _authors_multi_exit(logits_list, y, C, T):
  """mary-phuong/multiexit-distillation main.py DistillationBasedLoss.__call__: (loss, next T) for maxprob 0.5."""
  n = len(y)
  ce = lambda z: -np.mean(_log_softmax(z)[np.arange(n), y])
  loss = (1.0 - C) * ce(logits_list[-1])
  prob_t = np.exp(_log_softmax(logits_list[-1] / T))
  for z in logits_list[:-1]:
    dist = -np.mean((prob_t * _log_softmax(z / T)).sum(1))
    loss += (1.0 - C) * ce(z) + T ** 2 * C * dist
  return loss, T * 1.05 if prob_t.max(1).mean() > 0.5 else T


def test_multi_exit_is_the_authors_distillation_based_loss_with_adaptive_temperature():
  from experiments.configs import mnist_self

  terms = mnist_self.get_config().rows.multi_exit_adaptive.terms.to_dict()
  objective = Objective(terms)
  n, temperature, state = 16, 1.0, None
  for step in range(4):
    y = RNG.integers(0, 10, n)
    logits_list = [RNG.normal(size=(n, 10)), RNG.normal(size=(n, 10)) * 2, RNG.normal(size=(n, 10)) * (3 + step)]
    exits = {"exit_stage1_logits": jnp.asarray(logits_list[0], jnp.float32),
             "exit_stage2_logits": jnp.asarray(logits_list[1], jnp.float32)}
    student = Outputs(jnp.asarray(logits_list[2], jnp.float32), exits)
    if state is None:
      _, state = objective.init(jax.random.PRNGKey(0), student, None)
    total, metrics, state = objective({}, state, student, None, {"label": jnp.asarray(y)}, step=jnp.int32(step))
    expected, next_temperature = _authors_multi_exit(logits_list, y, 0.5, temperature)
    # Their distillation term is the cross-entropy against the final exit: the KL plus its entropy.
    p_t = np.exp(_log_softmax(logits_list[-1] / temperature))
    entropy = -np.mean((p_t * np.log(p_t)).sum(1))
    np.testing.assert_allclose(float(total) + 2 * temperature ** 2 * 0.5 * entropy, expected, rtol=1e-4)
    np.testing.assert_allclose(metrics["temperature/multi_exit"], temperature, rtol=1e-6)
    temperature = next_temperature
    np.testing.assert_allclose(state["multi_exit"]["temperature"], temperature, rtol=1e-6)
  assert temperature > 1.0  # the confident final exit raised it


def _torch_bilinear(pixels, height, width):
  """torchvision's tensor Resize: F.interpolate(bilinear, antialias=True), an implementation independent of PIL."""
  import torch

  x = torch.tensor(np.asarray(pixels, np.float32)).permute(2, 0, 1)[None]
  y = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
  return y[0].permute(1, 2, 0).numpy()


def _smooth_pixels(height, width):
  yy, xx = np.mgrid[0:height, 0:width]
  return np.stack([127 + 120 * np.sin(xx / 9.0), 127 + 120 * np.cos(yy / 7.0), 40 + (xx + yy) / 4], -1).astype(np.uint8)


def test_imagenet_resizing_is_torchvisions_bilinear():
  """Eval: Resize(256) + CenterCrop(224); train: a box cropped then resized bilinearly (torchvision's defaults)."""
  from kd_jax.data import imagenet

  pixels = _smooth_pixels(300, 400)
  resized = _torch_bilinear(pixels, 256, int(256 * 400 / 300))  # shorter side 256, as torchvision's Resize
  top, left = int(round((256 - 224) / 2.0)), int(round((resized.shape[1] - 224) / 2.0))
  expected = resized[top:top + 224, left:left + 224]
  got = imagenet.resize_center_crop(pixels, 256, 224).astype(np.float32)
  assert got.shape == (224, 224, 3)
  assert np.abs(got - expected).max() <= 2.0 and np.abs(got - expected).mean() < 0.24  # bicubic: 0.42
  source = imagenet.ImageNetSource([{"image": b"", "label": 0}], [{"image": b"", "label": 0}], num_classes=1)
  np.testing.assert_array_equal(source.eval_image(pixels), got)
  box = (30, 50, 180, 240)  # (top, left, height, width)
  crop = imagenet.crop_resize(pixels, lambda h, w: box, 224, draft=False).astype(np.float32)
  reference = _torch_bilinear(pixels[30:210, 50:290], 224, 224)
  assert np.abs(crop - reference).max() <= 2.0 and np.abs(crop - reference).mean() < 0.24  # bicubic: 0.27
  # Bilinear never overshoots a step edge (bicubic rings below 50 and above 200 next to it).
  step = np.full((300, 400, 3), 50, np.uint8)
  step[:, 200:] = 200
  for out in (imagenet.resize_center_crop(step, 256, 224), source.eval_image(step),
              imagenet.crop_resize(step, lambda h, w: (0, 150, 100, 100), 224, draft=False)):
    assert out.min() == 50 and out.max() == 200


def _authors_okddip(branches, hidden, query, key, labels, temperature, weight):
  """DefangChen/OKDDip train_GL.py's loss on resnet_GL's outputs, in jnp (no detach, as the code), batch mean.

  `branches` [M, B, K]: the leader first here (the code's last branch), then the peers; kernels in x @ W form.
  """
  log_softmax = jax.nn.log_softmax
  peers, leader = branches[1:], branches[0]
  pro = jnp.transpose(peers, (1, 2, 0))  # B x K x peers, the code's `pro`
  q, k = jnp.einsum("pbc,cd->bpd", hidden[1:], query), jnp.einsum("pbc,cd->bpd", hidden[1:], key)
  attention = jax.nn.softmax(jnp.einsum("bid,bjd->bij", q, k), axis=-1)
  x_m = jnp.einsum("bkj,bij->bki", pro, attention)  # torch.bmm(pro, attention.permute(0, 2, 1))

  def kl(z, target):  # KL_Loss: T² · KLDivLoss(batchmean)(log_softmax(z/T), softmax(target/T) [+1e-7])
    p = jax.nn.softmax(target / temperature, axis=-1)
    return temperature ** 2 * jnp.sum(p * (jnp.log(p) - log_softmax(z / temperature, axis=-1))) / z.shape[0]

  ce = lambda z: -jnp.mean(jnp.take_along_axis(log_softmax(z, axis=-1), labels[:, None], axis=-1))
  loss_true = sum(ce(peers[i]) for i in range(len(peers)))
  loss_group = sum(kl(peers[i], x_m[:, :, i]) for i in range(len(peers)))
  return loss_true + ce(leader) + weight * (loss_group + kl(leader, jnp.mean(pro, axis=2)))


def test_okddip_is_the_authors_code_gradients_included():
  m, b, k, c = 4, 6, 10, 16
  branches = jnp.asarray(RNG.normal(size=(m, b, k)) * 2, jnp.float32)
  hidden = jnp.asarray(RNG.normal(size=(m, b, c)), jnp.float32)
  labels = jnp.asarray(RNG.integers(0, k, b))
  outputs = lambda z, h: Outputs(z[0], {**{f"branch_{i}_logits": z[i] for i in range(m)},
                                        **{f"branch_{i}_pre_logits": h[i] for i in range(m)}})
  objective = Objective({"okddip": {"temperature": 3.0}}, steps_per_epoch=10)
  params, _ = objective.init(jax.random.PRNGKey(0), outputs(branches, hidden), None)
  assert params["okddip"]["query"]["kernel"].shape == (c, c // 8)  # the authors' input_channel // 8
  ramp = lambda epoch: float(np.exp(-5.0 * (1.0 - min(epoch, 80) / 80) ** 2))  # get_current_consistency_weight
  for step, epoch in ((0, 0), (255, 25), (2000, 200)):
    ours = lambda z, h, p: objective(p, {}, outputs(z, h), None, {"label": labels}, step=jnp.int32(step))[0]
    theirs = lambda z, h, p: _authors_okddip(z, h, p["okddip"]["query"]["kernel"], p["okddip"]["key"]["kernel"],
                                             labels, 3.0, ramp(epoch))
    np.testing.assert_allclose(ours(branches, hidden, params), theirs(branches, hidden, params), rtol=1e-5)
    grads = jax.grad(ours, argnums=(0, 1, 2))(branches, hidden, params)
    expected = jax.grad(theirs, argnums=(0, 1, 2))(branches, hidden, params)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(grads[1]).max()) > 1e-4  # the features get a gradient through the attention


def test_logit_standardization_rows_are_the_authors_losses():
  """dkd_cifar100's kd_ls / dkd_ls rows against the authors' loss with tools/train.py's settings of 2024-03-01."""
  from experiments.configs import dkd_cifar100

  s, t = RNG.normal(size=(16, 100)) * 3, RNG.normal(size=(16, 100)) * 8
  labels = RNG.integers(0, 100, 16)
  ce = -np.mean(_log_softmax(s)[np.arange(16), labels])
  args = (Outputs(jnp.asarray(s, jnp.float32)), Outputs(jnp.asarray(t, jnp.float32)), {"label": jnp.asarray(labels)})
  kd_row = Objective(dkd_cifar100.method_terms("kd_ls"), steps_per_epoch=10)
  np.testing.assert_allclose(kd_row({}, {}, *args, step=jnp.int32(0))[0],
                             1.0 * ce + 9.0 * _authors_kd(s, t, 2.0).mean(), rtol=1e-4)
  dkd_row = Objective(dkd_cifar100.method_terms("dkd_ls", beta=8.0), steps_per_epoch=10)
  # Epoch 20 (steps 190..199): warm-up weight min(20 / 20, 1) = 1.
  np.testing.assert_allclose(dkd_row({}, {}, *args, step=jnp.int32(195))[0],
                             ce + _authors_dkd(s, t, labels, 9.0, 81.0, 4.0).mean(), rtol=1e-4)


def test_logit_standardization_reaches_the_online_and_self_terms():
  """dml, codistill and cskd with standardize=True: their loss on the authors' z-scored logits."""
  z = RNG.normal(size=(8, 10)) * 4
  peers = RNG.normal(size=(2, 8, 10)) * 2 + 1
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  normalized = lambda x: f32(_authors_normalize(x))
  for name, loss in (("dml", losses.mutual_learning_loss), ("codistill", losses.codistillation_loss)):
    objective = Objective({name: {"temperature": 2.0, "standardize": True}})
    _, metrics, _ = objective({}, {}, Outputs(f32(z)), Outputs(f32(peers)), {}, step=jnp.int32(0))
    np.testing.assert_allclose(metrics[f"loss/{name}"],
                               jnp.mean(loss(normalized(z), normalized(peers), temperature=2.0)), rtol=1e-4)
    with pytest.raises(ValueError, match=f"{name}: standardize must be True or False, got 1"):
      Objective({name: {"standardize": 1}})
  labels = jnp.array([0, 1, 0, 1, 2, 2, 3, 3])
  batch = {"label": labels, "rng": jax.random.PRNGKey(2)}
  plain = Objective({"cskd": {"temperature": 2.0}}).terms["cskd"]
  standard = Objective({"cskd": {"temperature": 2.0, "standardize": True}}).terms["cskd"]
  np.testing.assert_allclose(standard(Outputs(f32(z)), None, batch, {}, {}, step=jnp.int32(0))[0],
                             plain(Outputs(normalized(z)), None, batch, {}, {}, step=jnp.int32(0))[0], rtol=1e-4)
