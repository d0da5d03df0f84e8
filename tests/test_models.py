"""The model zoo: registry, exact parameter counts, feature names and shapes, one
sharded train step and eval per model on 8 fake CPU devices, feature capture."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kd_jax import models

# Trainable parameters of the reference implementations (RepDistiller / CRD at
# 100 classes, torchvision at 1000; MobileNetV1: mdistiller's DKD student).
PARAM_COUNTS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "ResNet50": 23_705_252, "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "MobileNetV1": 4_231_976,
}
IMAGENET = {"resnet18", "resnet34", "resnet50", "MobileNetV1"}


def _shapes(stem, stages, pre_logits):
  out = {"stem": stem, "pre_logits": pre_logits}
  out.update({f"stage{i}": s for i, s in enumerate(stages, start=1)})
  return out


_RESNET_S = _shapes((32, 32, 16), [(32, 32, 16), (16, 16, 32), (8, 8, 64)], (64,))
_VGG = _shapes((32, 32, 64), [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)], (512,))
_TV_BASIC = _shapes((112, 112, 64), [(56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)], (512,))


def _wrn(k):
  return _shapes((32, 32, 16), [(32, 32, 16 * k), (16, 16, 32 * k), (8, 8, 64 * k)], (64 * k,))


# The documented feature shapes (one example, no batch axis); every stage also
# has `stageK_preact` (and the stem `stem_preact`) of the same shape.
FEATURE_SHAPES = {
    **{f"resnet{d}": _RESNET_S for d in (8, 14, 20, 32, 44, 56, 110)},
    **{n: _shapes((32, 32, 32), [(32, 32, 64), (16, 16, 128), (8, 8, 256)], (256,)) for n in ("resnet8x4", "resnet32x4")},
    "wrn_16_1": _wrn(1), "wrn_40_1": _wrn(1), "wrn_16_2": _wrn(2), "wrn_40_2": _wrn(2),
    **{f"vgg{d}": _VGG for d in (8, 11, 13, 16, 19)},
    "ResNet50": _shapes((32, 32, 64), [(32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 2048)], (2048,)),
    "MobileNetV2": _shapes((16, 16, 16), [(16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)], (1280,)),
    "ShuffleV1": _shapes((32, 32, 24), [(16, 16, 240), (8, 8, 480), (4, 4, 960)], (960,)),
    "ShuffleV2": _shapes((32, 32, 24), [(16, 16, 116), (8, 8, 232), (4, 4, 464)], (1024,)),
    "resnet18": _TV_BASIC, "resnet34": _TV_BASIC,
    "resnet50": _shapes((112, 112, 64), [(56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)], (2048,)),
    "MobileNetV1": _shapes((112, 112, 32), [(56, 56, 128), (28, 28, 256), (14, 14, 512), (7, 7, 1024)], (1024,)),
}


def num_classes(name):
  return 1000 if name in IMAGENET else 100


@functools.lru_cache(maxsize=None)
def abstract(name):
  """(feature shapes, variables) of `name` at its registered input size, by abstract evaluation."""
  model = models.create(name, num_classes=num_classes(name))
  x = jax.ShapeDtypeStruct((2, *models.input_shape(name)), jnp.float32)
  (logits, feats), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False, return_features=True), x)
  assert logits.shape == (2, num_classes(name))
  return {k: v.shape[1:] for k, v in feats.items()}, variables


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_registry_has_the_paper_models_and_input_shapes():
  assert set(PARAM_COUNTS) <= set(models.names())
  for name in PARAM_COUNTS:
    assert models.input_shape(name) == ((224, 224, 3) if name in IMAGENET else (32, 32, 3))
  # The CIFAR bottleneck teacher and torchvision's ImageNet resnet50 are different models.
  assert models.create("ResNet50", num_classes=100) != models.create("resnet50", num_classes=100)


def test_unknown_model_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*Known models: .*resnet8x4.*wrn_40_2"):
    models.create("resnet9", num_classes=10)


def test_parameter_counts_match_the_reference_implementations():
  got = {name: count(abstract(name)[1]["params"]) for name in PARAM_COUNTS}
  assert got == PARAM_COUNTS


def test_crd_table_names_each_students_classifier():
  """The AB / FSP init stages freeze the student's classifier by name: it must be the module of the logits."""
  from experiments.configs import crd_cifar100

  for student in sorted({s for _, s in crd_cifar100.PAIRS}):
    params = abstract(student)[1]["params"]
    heads = [k for k, v in params.items() if "kernel" in v and v["kernel"].shape[-1] == num_classes(student)]
    assert heads == [crd_cifar100.classifier(student)], (student, heads)


def test_batch_norm_statistics_live_in_batch_stats():
  _, variables = abstract("resnet8")
  assert set(variables) == {"params", "batch_stats"}
  stats = jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
  assert len(stats) == 2 * 9  # mean and var of the stem BN, 2 per block, 2 shortcut BNs
  for path, _ in stats:
    keys = [p.key for p in path]
    assert keys[-1] in ("mean", "var")
    assert "scale" in functools.reduce(lambda d, k: d[k], keys[:-1], variables["params"])


@pytest.mark.parametrize("name", sorted(FEATURE_SHAPES))
def test_feature_names_and_shapes(name):
  feats, _ = abstract(name)
  expected = dict(FEATURE_SHAPES[name])
  expected.update({f"{k}_preact": v for k, v in FEATURE_SHAPES[name].items() if k != "pre_logits"})
  assert feats == expected


def test_asking_for_a_missing_feature_lists_the_available_ones():
  feats, _ = abstract("resnet8")
  with pytest.raises(KeyError, match=r"resnet8 has no feature\(s\) \['stage4'\].*stage3_preact"):
    models.select_features(feats, ["stage1", "stage4"], model="resnet8")


# ------------------------------------------------------------------ train step

# Default run: one model per family (CIFAR ResNet, WRN, VGG, MobileNetV2,
# ShuffleNet, ImageNet MobileNetV1; the ImageNet ResNets share the CIFAR ResNets'
# code and are checked against torchvision in test_models_torch.py); the rest
# with -m slow. ImageNet models train at 32x32 here (global pooling makes them
# resolution-agnostic) and also at 224x224 in the slow run.
DEFAULT_TRAIN = {"resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2", "MobileNetV1"}
BATCH = 8
# Tests compile many networks on 2 CPU cores: skip XLA's slow backend optimisations
# (same results, far shorter compiles) and use the cheap RBG key for parameter init.

def init_key(seed=0):
  return jax.random.key(seed, impl="rbg")


def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


@functools.lru_cache(maxsize=None)
def compiled(name, **kwargs):
  """(model, init, train_step, eval_step, optimizer) for a zoo model, jitted once per test session."""
  model = models.create(name, num_classes=num_classes(name), **dict(kwargs))
  optimizer = optax.sgd(0.05, momentum=0.9)

  def train_step(variables, opt_state, x, y, rng):
    def loss_fn(params):
      logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    step, opt_state = optimizer.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], step)
    return {**variables, **updates, "params": params}, opt_state, loss, optax.tree.norm(grads)

  def eval_step(variables, x):
    return model.apply(variables, x, train=False, return_features=True)

  # Init keeps XLA's optimisations: unoptimised code is slow to generate millions of random numbers.
  return model, jax.jit(lambda rng, x: model.init(rng, x, train=False)), jax.jit(train_step), jax.jit(eval_step), optimizer


# Models whose pooled embedding is the plain average of their last stage.
_POOLS_LAST_STAGE = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
                     "resnet32x4", "ResNet50", "resnet18", "resnet34", "resnet50", "vgg8", "vgg11", "vgg13", "vgg16",
                     "vgg19", "ShuffleV1", "MobileNetV1"}


def run_one_train_step(name, size=None):
  model, init, train_step, eval_step, optimizer = compiled(name)
  shape = models.input_shape(name) if size is None else (size, size, 3)
  m = mesh()
  batch = NamedSharding(m, P("data"))
  replicated = NamedSharding(m, P())
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.normal(size=(BATCH, *shape)).astype(np.float32), batch)
  y = jax.device_put(rng.integers(0, num_classes(name), size=(BATCH,)), batch)
  variables = jax.device_put(init(init_key(), x[:1]), replicated)
  opt_state = jax.device_put(optimizer.init(variables["params"]), replicated)
  new_vars, opt_state, loss, grad_norm = train_step(variables, opt_state, x, y, jax.random.key(1))
  assert np.isfinite(float(loss)) and float(grad_norm) > 0
  assert jax.tree.structure(new_vars) == jax.tree.structure(variables)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_vars["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed)), "every BatchNorm's running statistics move in a train step"
  logits, feats = eval_step(new_vars, x)
  logits, feats = np.asarray(logits), jax.tree.map(np.asarray, feats)
  assert logits.shape == (BATCH, num_classes(name)) and np.all(np.isfinite(logits))
  if size is None:
    assert {k: v.shape[1:] for k, v in feats.items()} == abstract(name)[0]
  last = max(k for k in feats if k.startswith("stage") and not k.endswith("_preact"))
  if name in _POOLS_LAST_STAGE:
    # (Deep nets fresh from init reach large eval activations: compare relatively too.)
    np.testing.assert_allclose(feats["pre_logits"], feats[last].mean((1, 2)), rtol=1e-5, atol=1e-5)
  # `stageK_preact` is what the next ReLU reads: relu of it gives the stage output,
  # except for pre-activation WRNs (the next BN's output) and MobileNetV2 (no ReLU).
  for k in [k for k in feats if k.endswith("_preact")]:
    if name.startswith("wrn"):
      continue
    if name == "MobileNetV2" and k != "stem_preact":
      np.testing.assert_array_equal(feats[k], feats[k[: -len("_preact")]])
      continue
    np.testing.assert_allclose(np.maximum(feats[k], 0), feats[k[: -len("_preact")]], atol=1e-6)
    assert np.any(feats[k] < 0), k
  if name.startswith("wrn"):
    np.testing.assert_allclose(feats["pre_logits"], np.maximum(feats["stage3_preact"], 0).mean((1, 2)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize(
    "name", [n if n in DEFAULT_TRAIN else pytest.param(n, marks=pytest.mark.slow) for n in sorted(PARAM_COUNTS)])
def test_one_sharded_train_step_and_eval(name):
  run_one_train_step(name, size=32 if name in IMAGENET else None)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_models_train_at_224(name):
  run_one_train_step(name)


def test_batch_norm_uses_the_global_batch_under_sharding():
  """Sharding the batch over 8 devices gives the same BN statistics and outputs as one device."""
  model, init, _, _, _ = compiled("resnet8")
  x = np.random.default_rng(0).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
  variables = init(init_key(), x[:1])
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  single = fwd(variables, x)
  m = mesh()
  sharded = fwd(jax.device_put(variables, NamedSharding(m, P())), jax.device_put(x, NamedSharding(m, P("data"))))
  assert len(sharded[0].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(single[0]), atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), sharded[1], single[1])
  # ... whereas one device's shard alone has other statistics.
  shard = fwd(variables, x[: BATCH // 8])
  assert not np.allclose(np.asarray(shard[1]["batch_stats"]["bn1"]["mean"]),
                         np.asarray(single[1]["batch_stats"]["bn1"]["mean"]))


def test_dropout_uses_the_dropout_rng():
  model = models.create("wrn_16_1", num_classes=10, drop_rate=0.3)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(model.init)(init_key(), x)
  fwd = jax.jit(lambda v, x, r: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": r})[0])
  a, b, c = (np.asarray(fwd(variables, x, jax.random.key(s))) for s in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True, mutable=["batch_stats"])  # no rng given


# ------------------------------------------------------------------ capture


class UserNet(nn.Module):
  """A model written without the zoo's protocol: it only returns logits."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    h = nn.Dense(16, name="hidden")(x.mean((1, 2)))
    return nn.Dense(10, name="head")(nn.relu(h))


def test_capture_by_module_path_under_jit():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  net = UserNet()
  variables = net.init(jax.random.key(0), x)
  (logits, updates), feats = jax.jit(
      lambda v, x: models.capture(net, v, x, ["bn", "hidden"], train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (4, 10) and set(updates) == {"batch_stats"}
  assert feats["bn"].shape == (4, 8, 8, 8) and feats["hidden"].shape == (4, 16)
  # Gradients flow through captured features.
  g = jax.jit(jax.grad(lambda p: jnp.sum(models.capture(net, {**variables, "params": p}, x, ["hidden"])[1]["hidden"] ** 2)))(
      variables["params"])
  assert float(jnp.abs(g["hidden"]["kernel"]).sum()) > 0
  assert models.module_paths(net, variables, x) == {
      "bn": (4, 8, 8, 8), "conv": (4, 8, 8, 8), "head": (4, 10), "hidden": (4, 16)}


def test_capture_on_a_zoo_model_reaches_inside_blocks():
  model = models.create("resnet8", num_classes=10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  _, feats = jax.eval_shape(lambda v, x: models.capture(model, v, x, ["layer2_0/conv1", "layer3_0"]), variables, x)
  assert feats["layer2_0/conv1"].shape == (2, 16, 16, 32)
  assert isinstance(feats["layer3_0"], tuple)  # the block returns (out, preact)


def test_capture_unknown_path_lists_the_available_ones():
  net = UserNet()
  x = jnp.ones((1, 8, 8, 3))
  variables = net.init(jax.random.key(0), x)
  with pytest.raises(KeyError, match=r"no submodule\(s\) \['layer9'\].*available module paths: \['bn', 'conv', 'head', 'hidden'\]"):
    models.capture(net, variables, x, ["layer9"])


def test_with_features_makes_a_user_model_follow_the_protocol():
  model = models.WithFeatures(UserNet(), {"stage1": "bn", "pre_logits": "hidden"})
  x = jnp.ones((8, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"module"}
  logits = model.apply(variables, x)
  assert logits.shape == (8, 10)
  (logits, feats), updates = jax.jit(lambda v, x: model.apply(v, x, train=True, return_features=True,
                                                              mutable=["batch_stats"]))(variables, x)
  assert {k: v.shape for k, v in feats.items()} == {"stage1": (8, 8, 8, 8), "pre_logits": (8, 16)}
  assert set(updates["batch_stats"]) == {"module"}
  bad = models.WithFeatures(UserNet(), {"stage1": "nope"})
  with pytest.raises(KeyError, match="available module paths"):
    bad.apply(variables, x, return_features=True)


def test_feature_shapes_helper():
  shapes = models.feature_shapes(models.create("resnet8x4", num_classes=100), (32, 32, 3), batch=8)
  assert shapes["stage3"] == (8, 8, 8, 256) and shapes["pre_logits"] == (8, 256)
