"""The loss library against independent numpy implementations of the formulas, plus JAX-transform safety."""
import doctest
import importlib
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses
from kd_jax.losses._checks import l2_normalize as unit  # zero-safe, as CRD's embedding heads normalise

RNG = np.random.default_rng(0)
B, K, H, W = 8, 10, 4, 4


def rand(*shape, scale=1.0):
  return (scale * RNG.normal(size=shape)).astype(np.float32)


# ---------------------------------------------------------------- numpy references (float64)
def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd(s, t, T):
  log_p_t, log_p_s = np_log_softmax(t / T), np_log_softmax(s / T)  # log space: saturated softmaxes stay exact
  return T * T * np.sum(np.exp(log_p_t) * (log_p_t - log_p_s), -1)


def np_ce(z, y, eps=0.0):
  target = np.full(z.shape, eps / z.shape[-1])
  target[np.arange(len(y)), y] += 1 - eps
  return -np.sum(target * np.log(np_softmax(z)), -1)


def np_dkd(s, t, y, alpha, beta, T):
  out = []
  for i in range(s.shape[0]):
    ps, pt = np_softmax(s[i] / T), np_softmax(t[i] / T)
    bs, bt = np.array([ps[y[i]], 1 - ps[y[i]]]), np.array([pt[y[i]], 1 - pt[y[i]]])
    rest = [k for k in range(s.shape[1]) if k != y[i]]
    qs, qt = np_softmax(s[i, rest] / T), np_softmax(t[i, rest] / T)
    out.append(alpha * T * T * np_kl(bt, bs) + beta * T * T * np_kl(qt, qs))
  return np.array(out)


def np_dist(s, t, beta, gamma, T):
  ys, yt = np_softmax(s / T), np_softmax(t / T)
  inter = np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(s.shape[0])])
  intra = np.mean([np.corrcoef(ys[:, k], yt[:, k])[0, 1] for k in range(s.shape[1])])
  return T * T * (beta * (1 - inter) + gamma * (1 - intra))


def np_tfkd(s, y, correct, T):
  u = np.full(s.shape, (1 - correct) / (s.shape[1] - 1))
  u[np.arange(len(y)), y] = correct
  return np_kl(np_softmax(u / T), np_softmax(s))


def np_at(s, t, p=2):
  def a(f):
    m = (np.abs(f) ** p).mean(-1).reshape(f.shape[0], -1)
    return m / np.linalg.norm(m, axis=1, keepdims=True)
  return ((a(s) - a(t)) ** 2).mean(1)


def np_fsp(s1, s2, t1, t2):
  g = lambda a, b: np.einsum("bhwi,bhwj->bij", a, b) / (a.shape[1] * a.shape[2])
  return ((g(s1, s2) - g(t1, t2)) ** 2).sum((1, 2))


def np_adaptive_pool(x, out):
  """PyTorch's adaptive_avg_pool2d windows, written with loops, on NHWC."""
  b, h, w, c = x.shape
  y = np.zeros((b, out, out, c))
  for i in range(out):
    for j in range(out):
      h0, h1 = math.floor(i * h / out), math.ceil((i + 1) * h / out)
      w0, w1 = math.floor(j * w / out), math.ceil((j + 1) * w / out)
      y[:, i, j] = x[:, h0:h1, w0:w1].mean((1, 2))
  return y


def np_hcl(students, teachers, levels=(4, 2, 1)):
  total = 0
  for s, t in zip(students, teachers):
    mse = lambda a, b: ((a - b) ** 2).reshape(len(a), -1).mean(1)
    loss, weight, weights = mse(s, t), 1.0, 1.0
    for level in levels:
      if level < s.shape[1]:
        weight /= 2
        loss = loss + weight * mse(np_adaptive_pool(s, level), np_adaptive_pool(t, level))
        weights += weight
    total = total + loss / weights
  return total


def np_nst(s, t):
  def vectors(f):
    v = np.transpose(f.reshape(f.shape[0], -1, f.shape[-1]), (0, 2, 1))
    return v / np.linalg.norm(v, axis=2, keepdims=True)
  s, t = vectors(s), vectors(t)
  k = lambda a, b: np.mean(np.einsum("bid,bjd->bij", a, b) ** 2, axis=(1, 2))
  return k(s, s) + k(t, t) - 2 * k(s, t)


def np_ft(s, t, p):
  n = lambda x: x.reshape(len(x), -1) / np.linalg.norm(x.reshape(len(x), -1), axis=1, keepdims=True)
  return (np.abs(n(s) - n(t)) ** p).mean(1)


def np_ab(s, t, m):
  loss = np.where((s > -m) & (t <= 0), (s + m) ** 2, 0) + np.where((s <= m) & (t > 0), (s - m) ** 2, 0)
  return loss.reshape(len(s), -1).sum(1)


def np_vid(mu, t, var):
  return (0.5 * ((t - mu) ** 2 / var + np.log(var))).reshape(len(t), -1).mean(1)


def np_sp(s, t):
  def g(f):
    f = f.reshape(f.shape[0], -1)
    m = f @ f.T
    return m / np.linalg.norm(m, axis=1, keepdims=True)
  return np.sum((g(t) - g(s)) ** 2) / s.shape[0] ** 2


def np_rkd(s, t, dw, aw):
  def huber(x):
    return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)

  def dist(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return d / d[d > 0].mean()

  def angle(x):
    diff = x[None] - x[:, None]
    n = np.linalg.norm(diff, axis=-1, keepdims=True)
    unit = np.where(n > 0, diff / np.where(n > 0, n, 1), 0)
    return np.einsum("ijd,ikd->ijk", unit, unit)

  return dw * huber(dist(s) - dist(t)).mean() + aw * huber(angle(s) - angle(t)).mean()


def np_pkt(s, t, eps=1e-7):
  def p(x):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = (x @ x.T + 1) / 2
    return c / c.sum(1, keepdims=True)
  ps, pt = p(s), p(t)
  return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def np_cc_exact_rbf(s, t, gamma):
  """The kernel CC's Taylor series approximates: exp(−γ‖xi − xj‖²) on unit rows."""
  def c(x):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.exp(-gamma * ((x[:, None] - x[None]) ** 2).sum(-1))
  return np.sum((c(s) - c(t)) ** 2) / len(s) ** 2


S_LOGITS, T_LOGITS = rand(B, K, scale=2.0), rand(B, K, scale=3.0)
LABELS = RNG.integers(0, K, B).astype(np.int32)
S_MAP, T_MAP = rand(B, H, W, 6), rand(B, H, W, 12)
S_MAP2, T_MAP2 = rand(B, H, W, 5), rand(B, H, W, 5)
S_EMB, T_EMB = rand(B, 16), rand(B, 32)
VARIANCE = np.exp(rand(6)).astype(np.float32)
PEERS = np.stack([T_LOGITS, rand(B, K, scale=2.0)])
S_BIG, T_BIG = rand(B, 7, 7, 3), rand(B, 7, 7, 3)  # 7×7: ReviewKD's pyramid pools with overlapping windows

# name: (loss as a function of a cast applied to every float input, numpy reference on the float32 inputs)
PINNED = {
    "kd": (lambda c: losses.kd_loss(c(S_LOGITS), c(T_LOGITS), temperature=4.0),
           lambda: np_kd(S_LOGITS, T_LOGITS, 4.0)),
    "dkd": (lambda c: losses.dkd_loss(c(S_LOGITS), c(T_LOGITS), LABELS, alpha=1.0, beta=8.0, temperature=4.0),
            lambda: np_dkd(S_LOGITS, T_LOGITS, LABELS, 1.0, 8.0, 4.0)),
    "dist": (lambda c: losses.dist_loss(c(S_LOGITS), c(T_LOGITS), beta=1.0, gamma=2.0, temperature=4.0),
             lambda: np_dist(S_LOGITS, T_LOGITS, 1.0, 2.0, 4.0)),
    # High τ and small logits: tiny variances, where an additive eps in ρ's denominator would show.
    "dist_flat": (lambda c: losses.dist_loss(c(0.1 * S_LOGITS), c(0.1 * T_LOGITS), temperature=8.0),
                  lambda: np_dist(0.1 * S_LOGITS.astype(np.float64), 0.1 * T_LOGITS, 1.0, 1.0, 8.0)),
    "hint": (lambda c: losses.hint_loss(c(S_MAP), c(T_MAP[..., :6])),
             lambda: ((S_MAP - T_MAP[..., :6]) ** 2).mean((1, 2, 3))),
    "at": (lambda c: losses.attention_transfer_loss(c(S_MAP), c(T_MAP)), lambda: np_at(S_MAP, T_MAP)),
    "fsp": (lambda c: losses.fsp_loss(c(S_MAP), c(S_MAP2), c(T_MAP[..., :6]), c(T_MAP2)),
            lambda: np_fsp(S_MAP, S_MAP2, T_MAP[..., :6], T_MAP2)),
    "sp": (lambda c: losses.similarity_preserving_loss(c(S_MAP), c(T_MAP)), lambda: np_sp(S_MAP, T_MAP)),
    "rkd": (lambda c: losses.rkd_loss(c(S_EMB), c(T_EMB)), lambda: np_rkd(S_EMB, T_EMB, 25.0, 50.0)),
    # Duplicate rows: zero distances are excluded from the mean and zero differences give zero angles.
    "rkd_duplicates": (lambda c: losses.rkd_loss(c(S_EMB[[0, 0, 1, 2, 2, 3, 4, 5]]), c(T_EMB), distance_weight=2.0),
                       lambda: np_rkd(S_EMB[[0, 0, 1, 2, 2, 3, 4, 5]], T_EMB, 2.0, 50.0)),
    "pkt": (lambda c: losses.pkt_loss(c(S_EMB), c(T_EMB)), lambda: np_pkt(S_EMB, T_EMB)),
}

OTHERS = {
    "cross_entropy": (lambda: losses.cross_entropy(S_LOGITS, LABELS), lambda: np_ce(S_LOGITS, LABELS)),
    "label_smoothing": (lambda: losses.cross_entropy(S_LOGITS, LABELS, label_smoothing=0.1),
                        lambda: np_ce(S_LOGITS, LABELS, 0.1)),
    "logit_mse": (lambda: losses.logit_mse_loss(S_LOGITS, T_LOGITS), lambda: ((S_LOGITS - T_LOGITS) ** 2).mean(1)),
    "tfkd": (lambda: losses.teacher_free_kd_loss(S_LOGITS, LABELS, correct_probability=0.9, temperature=20.0),
             lambda: np_tfkd(S_LOGITS, LABELS, 0.9, 20.0)),
    "virtual_teacher": (lambda: jax.nn.softmax(losses.virtual_teacher_logits(LABELS, K, correct_probability=0.9)),
                        lambda: np.where(np.eye(K)[LABELS] > 0, 0.9, 0.1 / (K - 1))),
    "cskd": (lambda: losses.class_wise_kd_loss(S_LOGITS, S_LOGITS[::-1], temperature=4.0),
             lambda: np_kd(S_LOGITS, S_LOGITS[::-1], 4.0)),
    "nst": (lambda: losses.nst_loss(S_MAP, T_MAP), lambda: np_nst(S_MAP, T_MAP)),
    "nst_pooled": (lambda: losses.nst_loss(S_BIG, S_MAP), lambda: np_nst(np_adaptive_pool(S_BIG, 4), S_MAP)),
    "ft_l1": (lambda: losses.factor_transfer_loss(S_MAP, T_MAP[..., :6], p=1), lambda: np_ft(S_MAP, T_MAP[..., :6], 1)),
    "ft_l2": (lambda: losses.factor_transfer_loss(S_MAP, T_MAP[..., :6], p=2), lambda: np_ft(S_MAP, T_MAP[..., :6], 2)),
    "ab": (lambda: losses.activation_boundary_loss(S_MAP, T_MAP[..., :6], margin=0.5),
           lambda: np_ab(S_MAP, T_MAP[..., :6], 0.5)),
    "vid": (lambda: losses.vid_loss(S_MAP, T_MAP[..., :6], VARIANCE), lambda: np_vid(S_MAP, T_MAP[..., :6], VARIANCE)),
    "vid_full_variance": (lambda: losses.vid_loss(S_MAP, T_MAP[..., :6], np.abs(S_MAP2[..., :1]) + VARIANCE),
                          lambda: np_vid(S_MAP, T_MAP[..., :6], np.abs(S_MAP2[..., :1]) + VARIANCE)),
    "hcl": (lambda: losses.hierarchical_context_loss([S_BIG, S_MAP, S_EMB], [T_BIG, T_MAP[..., :6], T_EMB[:, :16]]),
            lambda: np_hcl([S_BIG, S_MAP, S_EMB[:, None, None]], [T_BIG, T_MAP[..., :6], T_EMB[:, None, None, :16]])),
    "cc_is_the_rbf_at_high_order": (
        lambda: losses.correlation_congruence_loss(S_EMB, T_EMB, gamma=0.4, order=12),
        lambda: np_cc_exact_rbf(S_EMB, T_EMB, 0.4)),
    "dml": (lambda: losses.mutual_learning_loss(S_LOGITS, PEERS, temperature=2.0),
            lambda: np.mean([np_kd(S_LOGITS, p, 2.0) for p in PEERS], 0)),
    "codistillation": (lambda: losses.codistillation_loss(S_LOGITS, PEERS, temperature=2.0),
                       lambda: 4.0 * np_kl(np.mean([np_softmax(p / 2.0) for p in PEERS], 0), np_softmax(S_LOGITS / 2.0))),
    "one": (lambda: losses.gated_ensemble_logits(PEERS, S_LOGITS[:, :2]),
            lambda: np.einsum("bm,mbk->bk", np_softmax(S_LOGITS[:, :2].astype(np.float64)), PEERS)),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_pinned_loss_matches_numpy(name):
  ours, reference = PINNED[name]
  out = ours(lambda x: x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), reference(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_losses_match_numpy(name):
  ours, reference = OTHERS[name]
  np.testing.assert_allclose(np.asarray(ours()), reference(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(PINNED))
def test_pinned_loss_on_bf16_inputs(name):
  """bf16 in, float32 out: within 2e-2 of the numpy reference on the unrounded float32 inputs, and
  equal (1e-5) to the float32 computation on the bf16-rounded values (so the computation itself is float32)."""
  ours, reference = PINNED[name]
  out = ours(lambda x: jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), reference(), rtol=2e-2, atol=1e-6)
  rounded = ours(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32))
  np.testing.assert_allclose(np.asarray(out), np.asarray(rounded), rtol=1e-5, atol=1e-7)


# Every public loss as fn(student_side, teacher_side) -> array, for gradients, transforms and degenerate inputs.
_BANK = losses.crd_init_bank(jax.random.PRNGKey(0), 32, 16)
_NEG = (jnp.arange(B * 3).reshape(B, 3) + 9) % 32
# A bank whose NCE normaliser Z is already fixed (the first call sets it from the batch, as a constant).
_SETTLED = losses.crd_loss(unit(jnp.asarray(S_EMB)), unit(jnp.asarray(T_EMB[:, :16])), jnp.arange(B), _NEG, _BANK)[1]
ALL = {
    "cross_entropy": (lambda s, t: losses.cross_entropy(s, LABELS, label_smoothing=0.1), S_LOGITS, T_LOGITS),
    "kd": (lambda s, t: losses.kd_loss(s, t, temperature=20.0), S_LOGITS, T_LOGITS),
    "logit_mse": (losses.logit_mse_loss, S_LOGITS, T_LOGITS),
    "dkd": (lambda s, t: losses.dkd_loss(s, t, LABELS), S_LOGITS, T_LOGITS),
    "dist": (lambda s, t: losses.dist_loss(s, t, temperature=4.0), S_LOGITS, T_LOGITS),
    "tfkd": (lambda s, t: losses.teacher_free_kd_loss(s, LABELS), S_LOGITS, T_LOGITS),
    "cskd": (lambda s, t: losses.class_wise_kd_loss(s, t), S_LOGITS, T_LOGITS),
    "hint": (losses.hint_loss, S_MAP, T_MAP[..., :6]),
    "at": (losses.attention_transfer_loss, S_MAP, T_MAP),
    "fsp": (lambda s, t: losses.fsp_loss(s, s[..., :5], t, t[..., :5]), S_MAP, T_MAP[..., :6]),
    "nst": (losses.nst_loss, S_MAP, T_MAP),
    "ft": (losses.factor_transfer_loss, S_MAP, T_MAP[..., :6]),
    "ab": (lambda s, t: losses.activation_boundary_loss(s, t, margin=1.0), S_MAP, T_MAP[..., :6]),
    "vid": (lambda s, t: losses.vid_loss(s, t, jnp.asarray(VARIANCE)), S_MAP, T_MAP[..., :6]),
    "hcl": (lambda s, t: losses.hierarchical_context_loss([s, s[:, :2, :2]], [t, t[:, :2, :2]]), S_MAP,
            T_MAP[..., :6]),
    "sp": (losses.similarity_preserving_loss, S_MAP, T_MAP),
    "rkd": (losses.rkd_loss, S_EMB, T_EMB),
    "pkt": (losses.pkt_loss, S_EMB, T_EMB),
    "cc": (losses.correlation_congruence_loss, S_EMB, T_EMB),
    "crd": (lambda s, t: losses.crd_loss(unit(s), unit(t), jnp.arange(B), _NEG, _SETTLED)[0], S_EMB, T_EMB[:, :16]),
    "dml": (lambda s, t: losses.mutual_learning_loss(s, jnp.stack([t, -t])), S_LOGITS, T_LOGITS),
    "codistill": (lambda s, t: losses.codistillation_loss(s, jnp.stack([t, -t]), temperature=2.0), S_LOGITS,
                  T_LOGITS),
    "one": (lambda s, t: losses.kd_loss(s, losses.gated_ensemble_logits(jnp.stack([t, -t]), t[:, :2])), S_LOGITS,
            T_LOGITS),
    # The gate is trained through the ensemble (by its cross-entropy): gradients reach it.
    "one_gate": (lambda s, t: losses.cross_entropy(losses.gated_ensemble_logits(jnp.stack([t, -t]), s[:, :2]),
                                                   LABELS), S_LOGITS, T_LOGITS),
}


@pytest.mark.parametrize("name", list(ALL))
def test_gradients_match_finite_differences(name):
  fn, s, t = ALL[name]
  check_grads(lambda v: jnp.sum(fn(v, t)), (jnp.asarray(s),), order=1, modes=("rev",), atol=1e-2, rtol=1e-2,
              eps=1e-2)


@pytest.mark.parametrize("name", list(ALL))
def test_jit_vmap_grad_and_finiteness_on_degenerate_inputs(name):
  """One compiled jit(vmap(value_and_grad)) over the random inputs and zero / constant / ±1e4 ones."""
  fn, s, t = ALL[name]
  s, t = jnp.asarray(s), jnp.asarray(t)
  eager = jnp.sum(fn(s, t))
  value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b)))))
  huge = lambda x: 1e4 * jnp.sign(x)
  stack = lambda *xs: jnp.stack(xs)
  values, grads = value_and_grad(stack(s, jnp.zeros_like(s), jnp.full_like(s, 3.0), huge(s), s),
                                 stack(t, jnp.zeros_like(t), jnp.full_like(t, 3.0), huge(t), jnp.zeros_like(t)))
  # (KD at T=20 multiplies rounding differences between compiled and eager code by T² = 400.)
  np.testing.assert_allclose(values[0], eager, rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(values)), values
  assert np.all(np.isfinite(grads)), name
  np.testing.assert_allclose(grads[0], jax.grad(lambda a: jnp.sum(fn(a, t)))(s), rtol=1e-4, atol=1e-5)


TEACHER_CONSTANT = ["kd", "logit_mse", "dkd", "dist", "cskd", "hint", "at", "fsp", "nst", "ft", "ab", "vid", "hcl",
                    "sp", "rkd", "pkt", "cc", "dml", "codistill"]


@pytest.mark.parametrize("name", TEACHER_CONSTANT)
def test_no_gradient_flows_into_the_teacher(name):
  fn, s, t = ALL[name]
  grad = jax.grad(lambda b: jnp.sum(fn(jnp.asarray(s), b)))(jnp.asarray(t))
  assert np.all(np.asarray(grad) == 0)


def test_traced_labels_and_temperature_under_jit():
  dkd = jax.jit(lambda s, t, y, temp: losses.dkd_loss(s, t, y, temperature=temp))
  np.testing.assert_allclose(dkd(S_LOGITS, T_LOGITS, LABELS, 4.0), np_dkd(S_LOGITS, T_LOGITS, LABELS, 1.0, 8.0, 4.0),
                             rtol=1e-5)
  # A learned temperature: the gradient with respect to T is finite.
  d_temperature = jax.grad(lambda temp: jnp.sum(losses.kd_loss(S_LOGITS, T_LOGITS, temperature=temp)))(4.0)
  assert np.isfinite(d_temperature)


def test_per_example_and_scalar_conventions():
  assert losses.kd_loss(S_LOGITS, T_LOGITS).shape == (B,)
  assert losses.attention_transfer_loss(S_MAP, T_MAP).shape == (B,)
  assert losses.hierarchical_context_loss([S_MAP], [T_MAP[..., :6]]).shape == (B,)
  assert losses.rkd_loss(S_EMB, T_EMB).shape == ()
  assert losses.dist_loss(S_LOGITS, T_LOGITS).shape == ()


def test_huge_logits_at_t20_do_not_overflow():
  big = 1e4 * jnp.asarray(np.sign(S_LOGITS))
  for value in (losses.kd_loss(big, -big, temperature=20.0), losses.dkd_loss(big, -big, LABELS, temperature=20.0),
                losses.dist_loss(big, -big, temperature=20.0)):
    assert np.all(np.isfinite(value))
  # Saturated even at T=20 (logits/T = ±500): the value is T² · (log-space KL), about 400 · 1000.
  np.testing.assert_allclose(losses.kd_loss(big, -big, temperature=20.0), np_kd(np.asarray(big, np.float64),
                                                                                 -np.asarray(big, np.float64), 20.0),
                             rtol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: losses.kd_loss(np.zeros((4, 10)), np.zeros((4, 9))), r"student shape \(4, 10\) and teacher shape \(4, 9\)"),
    (lambda: losses.kd_loss(np.zeros((4, 10)), np.zeros((4, 10)), temperature=0.0), r"temperature must be > 0, got 0"),
    (lambda: losses.kd_loss(np.zeros((4, 10)), np.zeros((4, 10)), temperature=np.float32(-1)), r"temperature must"),
    (lambda: losses.dkd_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 3])), r"labels must lie in \[0, 3\)"),
    (lambda: losses.dkd_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 1, 2])), r"labels shape \(3,\)"),
    (lambda: losses.cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0])), r"labels must be integers"),
    (lambda: losses.attention_transfer_loss(np.zeros((2, 4, 4, 3)), np.zeros((2, 8, 8, 3))),
     r"student shape \(2, 4, 4, 3\) and teacher shape \(2, 8, 8, 3\)"),
    (lambda: losses.hint_loss(np.zeros((2, 4)), np.zeros((2, 5))), r"student shape \(2, 4\) and teacher shape \(2, 5\)"),
    (lambda: losses.fsp_loss(*[np.zeros((2, 4, 4, 3))] * 3, np.zeros((2, 4, 4, 5))), r"FSP matrices"),
    (lambda: losses.nst_loss(np.zeros((2, 4, 4, 3)), np.zeros((3, 4, 4, 3))), r"same batch size"),
    (lambda: losses.rkd_loss(np.zeros((4, 3)), np.zeros((5, 3))),
     r"student shape \(4, 3\) and teacher shape \(5, 3\) must have the same batch size"),
    (lambda: losses.vid_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(4)), r"variance shape \(4,\)"),
    (lambda: losses.hierarchical_context_loss([np.zeros((2, 4, 4, 3))], [np.zeros((2, 2, 2, 3))]),
     r"stage 0.*\(2, 4, 4, 3\).*\(2, 2, 2, 3\)"),
    (lambda: losses.class_wise_kd_loss(np.zeros((2, 3)), np.zeros((3, 3))), r"partner_logits shape \(3, 3\)"),
    (lambda: losses.mutual_learning_loss(np.zeros((2, 3)), np.zeros((2, 3))), r"peer_logits \[P, B, K\]"),
    (lambda: losses.gated_ensemble_logits(np.zeros((2, 4, 3)), np.zeros((2, 4))), r"gate_logits shape \(2, 4\)"),
    (lambda: losses.crd_loss(np.zeros((2, 16)), np.zeros((2, 16)), np.arange(3), np.zeros((2, 4), int), _BANK),
     r"indices shape \(3,\)"),
    (lambda: losses.crd_loss(np.zeros((2, 8)), np.zeros((2, 8)), np.arange(2), np.zeros((2, 4), int), _BANK),
     r"bank shapes .*\(32, 16\)"),
    (lambda: losses.kd_loss(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32)), r"floating-point"),
])
def test_bad_inputs_name_the_problem(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


def np_nce(scores, n, eps=1e-7):
  noise = (scores.shape[1] - 1) / n
  return -np.mean(np.log(scores[:, 0] / (scores[:, 0] + noise + eps))
                  + np.sum(np.log(noise / (scores[:, 1:] + noise + eps)), 1))


def test_crd_loss_bank_update_and_normaliser():
  s, t = unit(jnp.asarray(S_EMB)), unit(jnp.asarray(T_EMB[:, :16]))
  idx, neg = jnp.arange(B), (jnp.arange(B * 4).reshape(B, 4) + 9) % 32
  loss, new = losses.crd_loss(s, t, idx, neg, _BANK, temperature=0.07, momentum=0.5)
  rows = np.concatenate([np.asarray(idx)[:, None], neg], 1)
  scores_s = np.exp(np.einsum("bkd,bd->bk", np.asarray(_BANK.teacher, np.float64)[rows], s) / 0.07)
  scores_t = np.exp(np.einsum("bkd,bd->bk", np.asarray(_BANK.student, np.float64)[rows], t) / 0.07)
  z_s, z_t = scores_s.mean() * 32, scores_t.mean() * 32  # Z fixed from the first batch
  np.testing.assert_allclose(new.z_student, z_s, rtol=1e-5)
  np.testing.assert_allclose(loss, np_nce(scores_s / z_s, 32) + np_nce(scores_t / z_t, 32), rtol=1e-5)
  moved = np.asarray(_BANK.student)[:B] * 0.5 + np.asarray(s) * 0.5
  np.testing.assert_allclose(new.student[:B], moved / np.linalg.norm(moved, axis=1, keepdims=True), rtol=1e-5)
  np.testing.assert_array_equal(new.student[B:], _BANK.student[B:])
  _, newer = losses.crd_loss(s, t, idx, neg, new)
  assert float(newer.z_student) == float(new.z_student)  # then kept


def test_crd_sample_negatives_skip_the_positive():
  idx = jnp.arange(B) * 3
  neg = losses.crd_sample_negatives(jax.random.PRNGKey(1), idx, 32, 500)
  assert neg.shape == (B, 500) and neg.dtype == jnp.int32
  assert np.all(np.asarray(neg) != np.asarray(idx)[:, None])
  assert np.asarray(neg).min() >= 0 and np.asarray(neg).max() == 31
  assert len(np.unique(np.asarray(neg[0]))) == 31  # all the other 31 examples appear


def test_crd_bank_sharded_over_devices_gives_the_same_loss():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, P("data") if x.ndim else P()), _BANK)
  sharded = jax.device_put(_BANK, shardings)
  assert sharded.student.addressable_shards[0].data.shape == (4, 16)  # 32 rows over 8 devices
  s, t = unit(jnp.asarray(S_EMB)), unit(jnp.asarray(T_EMB[:, :16]))
  idx, neg = jnp.arange(B), (jnp.arange(B * 4).reshape(B, 4) + 9) % 32
  fn = jax.jit(lambda s, t, b: losses.crd_loss(s, t, idx, neg, b), out_shardings=(None, shardings))
  (a, bank_a), (b, bank_b) = fn(s, t, _BANK), fn(s, t, sharded)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(bank_a.student, bank_b.student, rtol=1e-6)
  np.testing.assert_allclose(bank_a.teacher, bank_b.teacher, rtol=1e-6)
  assert bank_b.student.sharding.is_equivalent_to(shardings.student, 2)  # the bank stays sharded


@pytest.mark.parametrize("module", ["logits", "features", "relations", "contrastive", "online"])
def test_docstring_examples_run(module):
  mod = importlib.import_module(f"kd_jax.losses.{module}")
  result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_every_public_function_documents_shapes_references_and_keyword_only_hyperparameters():
  for name in losses.__all__:
    obj = getattr(losses, name)
    doc = obj.__doc__ or ""
    if isinstance(obj, type):
      assert "[N, D]" in doc, name
      continue
    for section in ("Args:", "Returns:", "Example:", "References:"):
      assert section in doc, (name, section)
    for parameter in inspect.signature(obj).parameters.values():
      if parameter.default is not inspect.Parameter.empty:
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, (name, parameter.name)
