"""The loss library against independent numpy implementations of the formulas, plus JAX-transform safety."""
import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses

RNG = np.random.default_rng(0)
B, K, H, W = 8, 10, 4, 4


def rand(*shape, scale=1.0):
  return (scale * RNG.normal(size=shape)).astype(np.float32)


# ---------------------------------------------------------------- numpy references
def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_kd(s, t, T):
  ps, pt = np_softmax(s / T), np_softmax(t / T)
  return T * T * np.sum(pt * (np.log(pt) - np.log(ps)), -1)


def np_dkd(s, t, y, alpha, beta, T):
  out = []
  for i in range(s.shape[0]):
    ps, pt = np_softmax(s[i] / T), np_softmax(t[i] / T)
    bs, bt = np.array([ps[y[i]], 1 - ps[y[i]]]), np.array([pt[y[i]], 1 - pt[y[i]]])
    rest = [k for k in range(s.shape[1]) if k != y[i]]
    qs, qt = np_softmax(s[i, rest] / T), np_softmax(t[i, rest] / T)
    out.append(alpha * T * T * np.sum(bt * np.log(bt / bs)) + beta * T * T * np.sum(qt * np.log(qt / qs)))
  return np.array(out)


def np_dist(s, t, beta, gamma, T):
  ys, yt = np_softmax(s / T), np_softmax(t / T)
  inter = np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(s.shape[0])])
  intra = np.mean([np.corrcoef(ys[:, k], yt[:, k])[0, 1] for k in range(s.shape[1])])
  return T * T * (beta * (1 - inter) + gamma * (1 - intra))


def np_at(s, t, p=2):
  def a(f):
    m = (np.abs(f) ** p).mean(-1).reshape(f.shape[0], -1)
    return m / np.linalg.norm(m, axis=1, keepdims=True)
  return ((a(s) - a(t)) ** 2).mean(1)


def np_fsp(s1, s2, t1, t2):
  g = lambda a, b: np.einsum("bhwi,bhwj->bij", a, b) / (a.shape[1] * a.shape[2])
  return ((g(s1, s2) - g(t1, t2)) ** 2).sum((1, 2))


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


S_LOGITS, T_LOGITS = rand(B, K, scale=2.0), rand(B, K, scale=3.0)
LABELS = RNG.integers(0, K, B).astype(np.int32)
S_MAP, T_MAP = rand(B, H, W, 6), rand(B, H, W, 12)
S_MAP2, T_MAP2 = rand(B, H, W, 5), rand(B, H, W, 5)
S_EMB, T_EMB = rand(B, 16), rand(B, 32)

PINNED = {
    "kd": (lambda: losses.kd_loss(S_LOGITS, T_LOGITS, temperature=4.0), lambda: np_kd(S_LOGITS, T_LOGITS, 4.0)),
    "dkd": (lambda: losses.dkd_loss(S_LOGITS, T_LOGITS, LABELS, alpha=1.0, beta=8.0, temperature=4.0),
            lambda: np_dkd(S_LOGITS, T_LOGITS, LABELS, 1.0, 8.0, 4.0)),
    "dist": (lambda: losses.dist_loss(S_LOGITS, T_LOGITS, beta=1.0, gamma=2.0, temperature=4.0),
             lambda: np_dist(S_LOGITS, T_LOGITS, 1.0, 2.0, 4.0)),
    "hint": (lambda: losses.hint_loss(S_MAP, rand_same := T_MAP[..., :6]),
             lambda: ((S_MAP - T_MAP[..., :6]) ** 2).mean((1, 2, 3))),
    "at": (lambda: losses.attention_transfer_loss(S_MAP, T_MAP), lambda: np_at(S_MAP, T_MAP)),
    "fsp": (lambda: losses.fsp_loss(S_MAP, S_MAP2, T_MAP[..., :6], T_MAP2),
            lambda: np_fsp(S_MAP, S_MAP2, T_MAP[..., :6], T_MAP2)),
    "sp": (lambda: losses.similarity_preserving_loss(S_MAP, T_MAP), lambda: np_sp(S_MAP, T_MAP)),
    "rkd": (lambda: losses.rkd_loss(S_EMB, T_EMB), lambda: np_rkd(S_EMB, T_EMB, 25.0, 50.0)),
    "pkt": (lambda: losses.pkt_loss(S_EMB, T_EMB), lambda: np_pkt(S_EMB, T_EMB)),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_pinned_loss_matches_numpy(name):
  ours, reference = PINNED[name]
  np.testing.assert_allclose(np.asarray(ours()), reference(), rtol=1e-5, atol=1e-6)


BF16 = {
    "kd": lambda c: losses.kd_loss(c(S_LOGITS), c(T_LOGITS)),
    "dkd": lambda c: losses.dkd_loss(c(S_LOGITS), c(T_LOGITS), LABELS),
    "dist": lambda c: losses.dist_loss(c(S_LOGITS), c(T_LOGITS)),
    "hint": lambda c: losses.hint_loss(c(S_MAP), c(T_MAP[..., :6])),
    "at": lambda c: losses.attention_transfer_loss(c(S_MAP), c(T_MAP)),
    "fsp": lambda c: losses.fsp_loss(c(S_MAP), c(S_MAP2), c(T_MAP[..., :6]), c(T_MAP2)),
    "sp": lambda c: losses.similarity_preserving_loss(c(S_MAP), c(T_MAP)),
    "rkd": lambda c: losses.rkd_loss(c(S_EMB), c(T_EMB)),
    "pkt": lambda c: losses.pkt_loss(c(S_EMB), c(T_EMB)),
}


@pytest.mark.parametrize("name", list(BF16))
def test_bf16_inputs_compute_in_float32(name):
  """bf16 inputs: float32 results within 2e-2 of the float32 computation on the same (rounded) values."""
  rounded = lambda x: jnp.asarray(x, jnp.bfloat16)
  out = BF16[name](rounded)
  assert out.dtype == jnp.float32
  reference = BF16[name](lambda x: jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32))
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=2e-2, atol=1e-6)
  full = BF16[name](jnp.asarray)
  np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=2e-2, atol=2e-2)


# Every public loss as a function of the student-side input only (teacher-side fixed), for grads/finiteness.
bank = losses.crd_init_bank(jax.random.PRNGKey(0), 32, 16)
from kd_jax.losses._checks import l2_normalize as unit  # zero-safe, as CRD's embedding heads use
# A bank whose NCE normaliser Z is already fixed (the first call sets it from the batch, as a constant).
settled_bank = losses.crd_loss(unit(jnp.asarray(S_EMB)), unit(jnp.asarray(T_EMB[:, :16])), jnp.arange(B),
                               jnp.arange(B * 3).reshape(B, 3) % 32, bank)[1]
ALL = {
    "cross_entropy": (lambda s: losses.cross_entropy(s, LABELS, label_smoothing=0.1), S_LOGITS),
    "kd": (lambda s: losses.kd_loss(s, T_LOGITS, temperature=20.0), S_LOGITS),
    "logit_mse": (lambda s: losses.logit_mse_loss(s, T_LOGITS), S_LOGITS),
    "dkd": (lambda s: losses.dkd_loss(s, T_LOGITS, LABELS), S_LOGITS),
    "dist": (lambda s: losses.dist_loss(s, T_LOGITS), S_LOGITS),
    "hint": (lambda s: losses.hint_loss(s, T_MAP[..., :6]), S_MAP),
    "at": (lambda s: losses.attention_transfer_loss(s, T_MAP), S_MAP),
    "fsp": (lambda s: losses.fsp_loss(s, S_MAP2, T_MAP[..., :6], T_MAP2), S_MAP),
    "nst": (lambda s: losses.nst_loss(s, T_MAP), S_MAP),
    "ft": (lambda s: losses.factor_transfer_loss(s, T_MAP[..., :6]), S_MAP),
    "ab": (lambda s: losses.activation_boundary_loss(s, T_MAP[..., :6], margin=1.0), S_MAP),
    "vid": (lambda s: losses.vid_loss(s, T_MAP[..., :6], jnp.full((6,), 2.0)), S_MAP),
    "sp": (lambda s: losses.similarity_preserving_loss(s, T_MAP), S_MAP),
    "rkd": (lambda s: losses.rkd_loss(s, T_EMB), S_EMB),
    "pkt": (lambda s: losses.pkt_loss(s, T_EMB), S_EMB),
    "cc": (lambda s: losses.correlation_congruence_loss(s, T_EMB[:, :16]), S_EMB),
    "crd": (lambda s: losses.crd_loss(unit(s), unit(T_EMB[:, :16]), jnp.arange(B), jnp.arange(B * 3).reshape(B, 3) % 32,
                                      settled_bank)[0], S_EMB),
    "dml": (lambda s: losses.mutual_learning_loss(s, jnp.stack([T_LOGITS, -T_LOGITS])), S_LOGITS),
    "codistill": (lambda s: losses.codistillation_loss(s, jnp.stack([T_LOGITS, -T_LOGITS]), temperature=2.0),
                  S_LOGITS),
    "one": (lambda s: losses.kd_loss(s, losses.gated_ensemble_logits(jnp.stack([T_LOGITS, -T_LOGITS]),
                                                                     jnp.ones((B, 2)))), S_LOGITS),
}


@pytest.mark.parametrize("name", list(ALL))
def test_gradients_match_finite_differences(name):
  fn, x = ALL[name]
  x = jnp.asarray(x, jnp.float64) if jax.config.jax_enable_x64 else jnp.asarray(x)
  check_grads(lambda v: jnp.sum(fn(v)), (x,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("name", list(ALL))
def test_jit_vmap_grad_and_finiteness_on_degenerate_inputs(name):
  fn, x = ALL[name]
  x = jnp.asarray(x)
  eager = fn(x)
  # (KD at T=20 multiplies rounding differences between compiled and eager code by T² = 400.)
  np.testing.assert_allclose(jax.jit(fn)(x), eager, rtol=1e-4, atol=1e-5)
  # vmap over a leading axis of two copies gives the value twice.
  np.testing.assert_allclose(jax.vmap(fn)(jnp.stack([x, x]))[1], eager, rtol=1e-4, atol=1e-5)
  for degenerate in (jnp.zeros_like(x), jnp.full_like(x, 3.0), 1e4 * jnp.sign(x)):
    value = jax.jit(fn)(degenerate)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(fn(v))))(degenerate)
    assert np.all(np.isfinite(value)), (name, value)
    assert np.all(np.isfinite(grad)), name


def test_per_example_and_scalar_conventions():
  assert losses.kd_loss(S_LOGITS, T_LOGITS).shape == (B,)
  assert losses.attention_transfer_loss(S_MAP, T_MAP).shape == (B,)
  assert losses.rkd_loss(S_EMB, T_EMB).shape == ()
  assert losses.dist_loss(S_LOGITS, T_LOGITS).shape == ()


def test_kd_has_no_gradient_into_the_teacher():
  grad = jax.grad(lambda t: jnp.sum(losses.kd_loss(S_LOGITS, t)))(jnp.asarray(T_LOGITS))
  assert np.all(np.asarray(grad) == 0)


def test_huge_logits_at_t20_do_not_overflow():
  big = 1e4 * jnp.asarray(np.sign(S_LOGITS))
  assert np.all(np.isfinite(losses.kd_loss(big, -big, temperature=20.0)))


@pytest.mark.parametrize("call, message", [
    (lambda: losses.kd_loss(np.zeros((4, 10)), np.zeros((4, 9))), r"student shape \(4, 10\) and teacher shape \(4, 9\)"),
    (lambda: losses.kd_loss(np.zeros((4, 10)), np.zeros((4, 10)), temperature=0.0), r"temperature must be > 0, got 0"),
    (lambda: losses.dkd_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 3])), r"labels must lie in \[0, 3\)"),
    (lambda: losses.cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0])), r"labels must be integers"),
    (lambda: losses.attention_transfer_loss(np.zeros((2, 4, 4, 3)), np.zeros((2, 8, 8, 3))),
     r"must agree in batch and spatial size"),
    (lambda: losses.hint_loss(np.zeros((2, 4)), np.zeros((2, 5))), r"student shape \(2, 4\) and teacher shape \(2, 5\)"),
    (lambda: losses.fsp_loss(*[np.zeros((2, 4, 4, 3))] * 3, np.zeros((2, 4, 4, 5))), r"FSP matrices"),
    (lambda: losses.rkd_loss(np.zeros((4, 3)), np.zeros((5, 3))), r"same batch size"),
    (lambda: losses.vid_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(4)), r"variance shape \(4,\)"),
    (lambda: losses.mutual_learning_loss(np.zeros((2, 3)), np.zeros((2, 3))), r"peer_logits \[P, B, K\]"),
    (lambda: losses.kd_loss(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32)), r"floating-point"),
])
def test_bad_inputs_name_the_problem(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


def test_crd_bank_update_and_normaliser():
  s, t = unit(jnp.asarray(S_EMB)), unit(jnp.asarray(T_EMB[:, :16]))
  idx, neg = jnp.arange(B), (jnp.arange(B * 4).reshape(B, 4) + 9) % 32
  loss, new = losses.crd_loss(s, t, idx, neg, bank, momentum=0.5)
  moved = np.asarray(bank.student)[:B] * 0.5 + np.asarray(s) * 0.5
  np.testing.assert_allclose(new.student[:B], moved / np.linalg.norm(moved, axis=1, keepdims=True), rtol=1e-5)
  np.testing.assert_array_equal(new.student[B:], bank.student[B:])
  # Z is set once, then kept.
  scores = np.exp(np.einsum("bkd,bd->bk", np.asarray(bank.teacher)[np.concatenate([idx[:, None], neg], 1)], s) / 0.07)
  np.testing.assert_allclose(new.z_student, scores.mean() * 32, rtol=1e-5)
  _, newer = losses.crd_loss(s, t, idx, neg, new)
  assert float(newer.z_student) == float(new.z_student)
  assert np.isfinite(float(loss))


def test_crd_bank_sharded_over_devices_gives_the_same_loss():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(bank, jax.tree.map(lambda x: NamedSharding(mesh, P("data") if x.ndim else P()), bank))
  assert sharded.student.addressable_shards[0].data.shape == (4, 16)  # 32 rows over 8 devices
  s, t = unit(jnp.asarray(S_EMB)), unit(jnp.asarray(T_EMB[:, :16]))
  idx, neg = jnp.arange(B), (jnp.arange(B * 4).reshape(B, 4) + 9) % 32
  fn = jax.jit(lambda s, t, b: losses.crd_loss(s, t, idx, neg, b))
  (a, bank_a), (b, bank_b) = fn(s, t, bank), fn(s, t, sharded)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(bank_a.student, bank_b.student, rtol=1e-6)


@pytest.mark.parametrize("module", ["logits", "features", "relations", "contrastive", "online"])
def test_docstring_examples_run(module):
  mod = importlib.import_module(f"kd_jax.losses.{module}")
  result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_every_public_loss_documents_shapes_and_references():
  for name in losses.__all__:
    obj = getattr(losses, name)
    if callable(obj) and not isinstance(obj, type):
      doc = obj.__doc__ or ""
      assert "References:" in doc or name == "crd_init_bank", name
      assert "Example:" in doc, name


def test_nst_matches_numpy():
  """torchdistill has no NST: an independent numpy MMD with the (xᵀy)² kernel instead."""
  def vectors(f):
    v = np.transpose(f.reshape(f.shape[0], -1, f.shape[-1]), (0, 2, 1))
    return v / np.linalg.norm(v, axis=2, keepdims=True)

  s, t = vectors(S_MAP), vectors(T_MAP)
  k = lambda a, b: np.mean(np.einsum("bid,bjd->bij", a, b) ** 2, axis=(1, 2))
  np.testing.assert_allclose(losses.nst_loss(S_MAP, T_MAP), k(s, s) + k(t, t) - 2 * k(s, t), rtol=1e-5, atol=1e-6)
