"""Connectors: output shapes, parameter counts of the reference modules, and joint training with a student."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import models
from kd_jax.models import connectors as C


def init(module, *args, **kwargs):
  return module.init(jax.random.key(0), *args, **kwargs)


def n_params(variables):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))


def abstract(module, *args, **kwargs):
  """(output shapes, number of parameters), by abstract evaluation."""
  out, variables = jax.eval_shape(lambda *a: module.init_with_output(jax.random.key(0), *a, **kwargs), *args)
  return jax.tree.map(lambda s: s.shape, out), n_params(variables)


def x(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


@pytest.mark.parametrize("s_hw, t_hw, kernel, params", [
    (8, 8, 1, 16 * 32 + 32 + 64),  # FitNets' 1x1 regressor (+ BN scale and bias)
    (8, 8, 3, 9 * 16 * 32 + 32 + 64),  # the 3x3 variant
    (16, 8, 1, 9 * 16 * 32 + 32 + 64),  # student twice the teacher's size: 3x3 stride 2
    (8, 16, 1, 16 * 16 * 32 + 32 + 64),  # half: 4x4 transposed conv, stride 2
    (10, 8, 1, 9 * 16 * 32 + 32 + 64),  # larger: valid 3x3
])
def test_conv_regressor_shapes_and_parameters(s_hw, t_hw, kernel, params):
  # Counts equal RepDistiller's ConvReg(s_shape, t_shape) for the same shapes.
  shape, n = abstract(C.ConvReg(32, (t_hw, t_hw), kernel_size=kernel), x(2, s_hw, s_hw, 16))
  assert shape == (2, t_hw, t_hw, 32) and n == params


def test_conv_regressor_rejects_unmappable_sizes():
  with pytest.raises(ValueError, match="cannot map student size"):
    abstract(C.ConvReg(32, (16, 16)), x(2, 5, 5, 16))


def test_regressor_relu_and_ab_connector():
  features = jax.random.normal(jax.random.key(1), (4, 8, 8, 16))
  fitnet = C.ConvReg(32)
  assert float(fitnet.apply(init(fitnet, features), features).min()) >= 0
  ab = C.ABConnector(32)
  out = ab.apply(init(ab, features), features)
  assert out.shape == (4, 8, 8, 32) and float(out.min()) < 0  # no ReLU: AB matches pre-activations
  same = C.ABConnector(16)
  variables = init(same, features)
  assert not variables  # identity: nothing to train
  np.testing.assert_array_equal(np.asarray(same.apply(variables, features)), np.asarray(features))


def test_ofd_connector():
  shape, n = abstract(C.OFDConnector(64), x(2, 8, 8, 16))
  assert shape == (2, 8, 8, 64) and n == 16 * 64 + 2 * 64  # 1x1 conv without bias, BN


def test_crd_embedding_is_unit_norm():
  embed = C.Embed(128)
  feats = jax.random.normal(jax.random.key(1), (4, 256))
  variables = init(embed, feats)
  assert n_params(variables) == 256 * 128 + 128
  out = embed.apply(variables, feats)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, rtol=1e-5)
  assert C.Embed(128).apply(init(C.Embed(128), jnp.ones((2, 4, 4, 8))), jnp.ones((2, 4, 4, 8))).shape == (2, 128)


def test_factor_transfer_paraphraser_and_translator():
  (factor, rec), n = abstract(C.Paraphraser(rate=0.5), x(2, 8, 8, 64))
  assert factor == (2, 8, 8, 32) and rec == (2, 8, 8, 64)
  assert n == 129_312  # RepDistiller's Paraphraser(t_shape=(., 64, 8, 8), k=0.5)
  assert abstract(C.Paraphraser(use_bn=True), x(2, 8, 8, 64))[1] == 129_888
  shape, n = abstract(C.Translator(teacher_channels=64), x(2, 8, 8, 16))
  assert shape == (2, 8, 8, 32)
  assert n == (9 * 16 * 16 + 16) + (9 * 16 * 32 + 32) + (9 * 32 * 32 + 32) + 2 * (16 + 32 + 32)


def test_vid_regressor_starts_at_the_initial_variance():
  vid = C.VIDRegressor(64, init_pred_var=5.0)
  feats = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
  variables = init(vid, feats)
  mean, var = vid.apply(variables, feats)
  assert mean.shape == (2, 8, 8, 64) and var.shape == (64,)
  np.testing.assert_allclose(np.asarray(var), 5.0, rtol=1e-5)
  assert n_params(variables) == 16 * 64 + 64 * 64 + 64 * 64 + 64  # three 1x1 convs without bias, log_scale


def test_reviewkd_fusion_maps_student_levels_to_teacher_levels():
  # resnet8x4 student -> resnet32x4 teacher, mdistiller's CIFAR configuration.
  student = [x(2, 32, 32, 64), x(2, 16, 16, 128), x(2, 8, 8, 256), x(2, 256)]
  fusion = C.ReviewKDFusion(out_channels=(64, 128, 256, 256), out_hw=(32, 16, 8, 1))
  shapes, n = abstract(fusion, student)
  assert shapes == [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 1, 1, 256)]
  assert n == 1_808_774  # mdistiller's four ABFs for this pair
  # Teacher at other sizes: levels are resized (nearest) before the 3x3 conv.
  shapes, _ = abstract(C.ReviewKDFusion(out_channels=(8, 8), out_hw=(16, 4)), [x(2, 8, 8, 4), x(2, 4, 4, 4)])
  assert shapes == [(2, 16, 16, 8), (2, 4, 4, 8)]
  with pytest.raises(ValueError, match="2 student features for 3 teacher levels"):
    abstract(C.ReviewKDFusion(out_channels=(8, 8, 8)), [x(2, 8, 8, 4), x(2, 4, 4, 4)])


def test_resize_and_adaptive_pool_follow_pytorch():
  a = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
  # adaptive_avg_pool2d(5 -> 2) bins rows/cols [0, 3) and [2, 5).
  pooled = np.asarray(C.adaptive_avg_pool(a, (2, 2)))
  np.testing.assert_allclose(pooled[0, 0, 0, 0], np.asarray(a)[0, 0:3, 0:3, 0].mean())
  np.testing.assert_allclose(pooled[1, 1, 1, 0], np.asarray(a)[1, 2:5, 2:5, 0].mean())
  np.testing.assert_allclose(np.asarray(C.adaptive_avg_pool(a[:, :4, :4], (2, 2)))[0, 0, 0, 0],
                             np.asarray(a)[0, 0:2, 0:2, 0].mean())
  up = np.asarray(C.resize_nearest(a[:, :2, :2], (4, 4)))
  np.testing.assert_array_equal(up[0, :, :, 0], np.repeat(np.repeat(np.asarray(a)[0, :2, :2, 0], 2, 0), 2, 1))
  down = np.asarray(C.resize_nearest(a, (2, 2)))  # floor(i * 5 / 2) = 0, 2
  np.testing.assert_array_equal(down[0, :, :, 0], np.asarray(a)[0][np.ix_([0, 2], [0, 2])][..., 0])


def test_connector_trains_with_the_student():
  """FitNets: student and regressor in one params tree; one step moves both and the regressor's BN statistics."""
  student = models.create("resnet8", num_classes=10)
  regressor = C.ConvReg(128)  # resnet8 stage2 [16, 16, 32] -> resnet8x4 stage2 [16, 16, 128]
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  hint = jax.random.normal(jax.random.key(2), (8, 16, 16, 128))
  s_vars = jax.jit(student.init)(jax.random.key(0, impl="rbg"), images)
  r_vars = regressor.init(jax.random.key(3), jnp.zeros((1, 16, 16, 32)))
  params = {"student": s_vars["params"], "connector": r_vars["params"]}
  stats = {"student": s_vars["batch_stats"], "connector": r_vars["batch_stats"]}
  optimizer = optax.sgd(0.1)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(params):
      (_, feats), s_upd = student.apply({"params": params["student"], "batch_stats": stats["student"]}, images,
                                        train=True, return_features=True, mutable=["batch_stats"])
      pred, r_upd = regressor.apply({"params": params["connector"], "batch_stats": stats["connector"]},
                                    feats["stage2"], train=True, mutable=["batch_stats"])
      return jnp.mean((pred - hint) ** 2), {"student": s_upd["batch_stats"], "connector": r_upd["batch_stats"]}

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  new_params, new_stats, _, loss = step(params, stats, optimizer.init(params))
  assert np.isfinite(float(loss))
  for part in ("student", "connector"):
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_params[part], params[part])
    assert any(jax.tree.leaves(moved)), part
  assert bool(jnp.any(new_stats["connector"]["bn"]["mean"] != stats["connector"]["bn"]["mean"]))
  # The student's head gets no gradient from a hint loss on stage2: only what lies below moves.
  assert not bool(jnp.any(new_params["student"]["fc"]["kernel"] != params["student"]["fc"]["kernel"]))
