"""Attention distillation for Transformers (MiniLM, TinyBERT): the attention module's parity with flax's, the
losses vs numpy with masks respected, the term on the zoo Transformer's features; slow: `reverse`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses, models
from kd_jax.data import sequences
from kd_jax.distill import Objective
from kd_jax.distill.attention import layer_pairs
from kd_jax.models.transformer import Attention


def test_attention_module_matches_flax_multi_head_attention():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  kv = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 8))
  reference = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=8)
  ours = Attention(heads=2)
  causal = nn.make_causal_mask(jnp.ones((2, 5)))

  @jax.jit
  def both():
    params = reference.init(jax.random.PRNGKey(2), x, kv)
    ours_params = ours.init(jax.random.PRNGKey(2), x, kv)
    return (params, ours_params, ours.apply(params, x, kv), reference.apply(params, x, kv),
            ours.apply(params, x, x, mask=causal), reference.apply(params, x, x, mask=causal))

  params, ours_params, (out, probabilities, values), expected, masked, expected_masked = both()
  # The same param tree, initialised to the same values (flax derives each param's key from its path).
  jax.tree.map(np.testing.assert_array_equal, ours_params, params)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  assert probabilities.shape == (2, 2, 5, 7) and values.shape == (2, 2, 7, 4)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
  out, probabilities, _ = masked
  np.testing.assert_allclose(out, expected_masked, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.where(causal == 0, probabilities, 0.0))) == 0.0  # nothing attends to the future


def random_probs(rng, shape, valid):
  logits = rng.normal(size=shape) * 2
  e = np.exp(logits) * valid
  return e / np.maximum(e.sum(-1, keepdims=True), 1e-30)


def np_kl(s, t, valid):
  """Mean over (head, query) rows with a valid key of Σ_k t log(t / s), per example."""
  out = []
  for b in range(s.shape[0]):
    rows = []
    for h in range(s.shape[1]):
      for q in range(s.shape[2]):
        keys = valid[b, h, q] > 0
        if keys.any():
          rows.append(np.sum(t[b, h, q, keys] * (np.log(t[b, h, q, keys]) - np.log(s[b, h, q, keys]))))
    out.append(np.mean(rows))
  return np.array(out)


@pytest.fixture(scope="module")
def masked_case():
  rng = np.random.default_rng(0)
  b, h, t = 3, 2, 5
  causal = np.tril(np.ones((t, t)))
  padding = np.ones((b, 1, t, t))
  padding[1, :, 3:, :] = 0  # example 1: queries 3, 4 are padding
  padding[1, :, :, 3:] = 0  # ... and so are those keys
  valid = np.broadcast_to(causal[None, None] * padding, (b, h, t, t))
  student = random_probs(rng, (b, h, t, t), valid)
  teacher = random_probs(rng, (b, h, t, t), valid)
  return student, teacher, causal[None, None] * padding, valid


def test_attention_kl_matches_numpy_and_ignores_masked_positions(masked_case):
  student, teacher, mask, valid = masked_case
  # Garbage where the mask is 0 (future keys, padded queries and keys) must change nothing.
  garbage = np.random.default_rng(1).uniform(size=student.shape)
  noisy = lambda p: np.where(valid > 0, p, garbage)
  kl = lambda s, t: losses.attention_map_loss(s, t, mask=mask)

  @jax.jit
  def values(s, t, noisy_s, noisy_t):
    return kl(s, t), kl(noisy_s, noisy_t), kl(t, t), jax.grad(lambda x: jnp.sum(kl(x, t)))(s)

  loss, noisy_loss, self_loss, grad = values(student, teacher, noisy(student), noisy(teacher))
  np.testing.assert_allclose(loss, np_kl(student, teacher, valid), rtol=1e-5)
  np.testing.assert_allclose(noisy_loss, loss, rtol=1e-6)
  assert float(self_loss.max()) < 1e-6
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(jnp.where(valid > 0, 0.0, grad)))) == 0.0


def test_attention_mse_and_head_mean_match_numpy(masked_case):
  student, teacher, mask, valid = masked_case
  # Different head counts: each side averaged over its heads first.
  teacher3 = random_probs(np.random.default_rng(2), (3, 3, 5, 5), np.broadcast_to(mask, (3, 3, 5, 5)))
  mse, mean_heads = jax.jit(lambda s, t, t3: (losses.attention_map_loss(s, t, mask=mask, kind="mse"),
                                              losses.attention_map_loss(s, t3, mask=mask, heads="mean")))(
      student, teacher, teacher3)
  expected = np.array([np.sum(((student[b] - teacher[b]) ** 2)[valid[b] > 0]) / np.sum(valid[b] > 0)
                       for b in range(3)])
  np.testing.assert_allclose(mse, expected, rtol=1e-5)
  expected = np_kl(student.mean(1, keepdims=True), teacher3.mean(1, keepdims=True), valid[:, :1])
  np.testing.assert_allclose(mean_heads, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="2 heads and the teacher 3: use heads='mean'"):
    losses.attention_map_loss(jnp.asarray(student), jnp.asarray(teacher3))


def test_value_relation_loss_matches_numpy(masked_case):
  _, _, mask, valid = masked_case
  rng = np.random.default_rng(3)
  vs, vt = rng.normal(size=(3, 2, 5, 4)), rng.normal(size=(3, 2, 5, 6))  # head dims may differ

  def relation(v, d):
    scores = np.einsum("bhqd,bhkd->bhqk", v, v) / np.sqrt(d)
    e = np.exp(scores - scores.max(-1, keepdims=True)) * valid
    return e / np.maximum(e.sum(-1, keepdims=True), 1e-30)

  expected = np_kl(relation(vs, 4), relation(vt, 6), valid)
  np.testing.assert_allclose(jax.jit(lambda a, b: losses.value_relation_loss(a, b, mask=mask))(vs, vt), expected,
                             rtol=1e-4)


def test_layer_mappings():
  assert layer_pairs("uniform", 6, 2) == [(2, 0), (5, 1)]  # TinyBERT: student m <- teacher 3m (1-indexed)
  assert layer_pairs("uniform", 4, 3) == [(1, 0), (2, 1), (3, 2)]
  assert layer_pairs("last", 6, 2) == [(5, 1)]
  assert layer_pairs([[0, 1]], 6, 2) == [(0, 1)]
  with pytest.raises(ValueError, match=r"layer pair \[6, 0\]"):
    layer_pairs([[6, 0]], 6, 2)
  with pytest.raises(ValueError, match="attention: heads must be one of"):
    Objective({"attention": {"heads": "max"}})
  with pytest.raises(ValueError, match="attention: kinds must be"):
    Objective({"attention": {"kinds": ["decoder"]}})


@pytest.fixture(scope="module")
def transformer_pair():
  x = jnp.asarray(sequences.make(num_train=8, num_test=1, length=6, vocab=8).train_images[:4])
  teacher = models.create("transformer", num_classes=8, layers=4, decoder_layers=2, width=16, heads=2, ffn=32)
  student = models.create("transformer", num_classes=8, layers=2, width=8, heads=2, ffn=16)
  run = lambda model, seed: jax.jit(lambda: model.apply(model.init(jax.random.PRNGKey(seed), x), x,
                                                        return_features=True))()
  from kd_jax.distill import Outputs
  return Outputs(*run(student, 0)), Outputs(*run(teacher, 1))


def test_transformer_exposes_attention_features(transformer_pair):
  student, teacher = transformer_pair
  f = teacher.features
  assert f["encoder_attention_3"].shape == (4, 2, 6, 6) and f["encoder_values_3"].shape == (4, 2, 6, 8)
  assert f["decoder_self_attention_1"].shape == f["decoder_cross_attention_1"].shape == (4, 2, 6, 6)
  assert "encoder_attention_4" not in f and "decoder_self_attention_2" not in f
  causal = np.tril(np.ones((6, 6)))
  np.testing.assert_array_equal(f["decoder_self_attention_mask"], np.broadcast_to(causal, (4, 1, 6, 6)))
  assert float(jnp.max(f["decoder_self_attention_0"] * (1 - causal)[None, None])) == 0.0


def test_attention_term_is_the_mean_over_mapped_layers(transformer_pair):
  student, teacher = transformer_pair
  objective = Objective({"attention": {"layers": "uniform", "value_weight": 0.5}})
  _, metrics, _ = jax.jit(lambda s, t: objective({}, {}, s, t, {}, step=jnp.zeros((), jnp.int32)))(student, teacher)
  s, t = student.features, teacher.features
  mask = np.asarray(s["decoder_self_attention_mask"])
  np64 = lambda x: np.asarray(x, np.float64)
  ones = np.ones((4, 2, 6, 6))
  # Encoder 4 -> 2 layers: teacher layers 1, 3; decoder 2 -> 2: layers 0, 1.
  pairs = [("encoder", 1, 0, ones), ("encoder", 3, 1, ones), ("decoder_self", 0, 0, mask), ("decoder_self", 1, 1, mask),
           ("decoder_cross", 0, 0, ones), ("decoder_cross", 1, 1, ones)]
  attention = np.mean([np_kl(np64(s[f"{k}_attention_{j}"]), np64(t[f"{k}_attention_{i}"]),
                             np.broadcast_to(m, (4, 2, 6, 6))) for k, i, j, m in pairs], axis=0)
  relations = jax.jit(lambda s, t: [losses.value_relation_loss(s[f"{k}_values_{j}"], t[f"{k}_values_{i}"],
                                                              mask=None if k == "encoder" else mask)
                                    for k, i, j, m in pairs if k != "decoder_cross"])(s, t)
  values = np.mean(relations, axis=0)
  np.testing.assert_allclose(metrics["loss/attention"], np.mean(attention + 0.5 * values), rtol=1e-4)


@pytest.mark.slow
def test_attention_distilled_student_matches_or_beats_kd_on_reverse(tmp_path):
  from experiments.configs import attention_transformer
  from kd_jax import train

  config = attention_transformer.get_config("kd,attention")
  config.mesh.data = 1
  config.progress = False
  results = train.run(config, str(tmp_path))
  for name in ("teacher", "kd", "attention"):
    print(f"{name}: per-token test accuracy {results[name]['test_accuracy']:.4f}, {results[name]['wall_time_s']} s")
  assert results["attention"]["test_accuracy"] >= results["kd"]["test_accuracy"] - 0.005
  assert results["attention"]["test_accuracy"] > 0.9


def test_attention_transformer_config_is_valid():
  from experiments.configs import attention_transformer
  from kd_jax.train import config as config_lib

  config = config_lib.validate(attention_transformer.get_config())
  assert [r for r in config.rows if "attention" in config.rows[r].terms] == ["attention", "minilm", "tinybert_attn"]
  assert all(config.rows[r].teacher.row == "teacher" for r in config.rows if r != "teacher")
