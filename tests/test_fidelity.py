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
