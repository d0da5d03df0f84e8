"""XLA:CPU settings of the engine (convolutions to Eigen, everything else as XLA's default) and the explicit
convolution rewrites (`backend.ConvRewrites`, `backend.rewrite`): held inputs / outputs, phased input gradients."""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import models
from kd_jax.data import augment
from kd_jax.distill import Objective
from kd_jax.train import backend, engine
from kd_jax.train import mesh as mesh_lib

DN = ("NHWC", "HWIO", "NHWC")


def _fusion_kinds(hlo: str) -> list[str]:
  """The library fusions of a compiled module (e.g. ["__ynn_fusion", ...]), sorted."""
  return sorted(re.findall(r'"kind":"(__\w+)"', hlo))


def _ynn_convolutions(hlo: str) -> int:
  """How many YNNPACK fusions of a compiled module contain a convolution."""
  computations = dict(re.findall(r"^%([\w.\-]+) .*?\n(.*?)^}", hlo, re.M | re.S))
  called = re.findall(r'calls=%([\w.\-]+).*"kind":"__ynn_fusion"', hlo)
  return sum("convolution(" in computations.get(name, "") for name in called)


def _compiled(fn, *args, options):
  return jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def test_cpu_options_are_taken_here():
  assert jax.default_backend() == "cpu"
  assert backend.compiler_options() == backend.CPU_OPTIONS
  assert backend.compiler_options("gpu") is None and backend.compiler_options("tpu") is None


def test_a_user_choice_in_xla_flags_is_kept(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution")
  assert backend.compiler_options() is None


def test_only_convolutions_leave_xla_defaults():
  """Dots, reductions and elementwise work compile to the same fusions as XLA's default; convolutions (and
  their gradients) to no YNNPACK fusion. Fails if a jaxlib changes its default fusion types."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 32))  # YNNPACK takes convolutions from 32 channels
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 32))
  no_convs = lambda x, w: (jnp.tanh(x.reshape(-1, 32) @ w[0, 0]).sum(0), jnp.mean(jnp.square(x), (0, 1, 2)))
  assert _fusion_kinds(_compiled(no_convs, x, w, options=backend.CPU_OPTIONS)) == _fusion_kinds(
      _compiled(no_convs, x, w, options=None))
  conv_grads = jax.grad(lambda x, w: jnp.sum(_conv(x, w) ** 2), argnums=(0, 1))
  default, ours = (_compiled(conv_grads, x, w, options=o) for o in (None, backend.CPU_OPTIONS))
  assert _ynn_convolutions(default) > 0  # else this jaxlib no longer sends convolutions to YNNPACK
  assert _ynn_convolutions(ours) == 0 and "convolution(" in ours
  # Same weight gradient up to float32 summation order.
  ours_dw, default_dw = (np.asarray(jax.jit(conv_grads, compiler_options=o)(x, w)[1])
                         for o in (backend.CPU_OPTIONS, None))
  np.testing.assert_allclose(ours_dw, default_dw, rtol=1e-4, atol=1e-5 * np.abs(default_dw).max())


# A user's linen CNN: strided, padded, grouped and biased convolutions.
class _UserCnn(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    x = nn.Conv(8, (3, 3), feature_group_count=2, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Conv(16, (3, 3), strides=2, padding="VALID")(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


ALL_OFF = backend.ConvRewrites(hold_inputs=False, hold_outputs=False, phased_input_gradients=False)
HOLDS_ONLY = backend.ConvRewrites(phased_input_gradients=False)
NO_YNNPACK = {backend.YNN_FUSION_TYPES: ""}  # XLA's own kernels for everything: the same arithmetic either way


def _step(spec: engine.StepSpec):
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
  example = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  abstract = jax.eval_shape(lambda: engine.init_state(spec, jax.random.PRNGKey(0), {}, example))
  shardings = engine.state_shardings(mesh, abstract, spec)
  batch = {"image": jnp.zeros((1, 2, 8, 8, 3), jnp.uint8), "label": jnp.zeros((1, 2), jnp.int32),
           "index": jnp.zeros((1, 2), jnp.int32)}
  return engine.make_train_step(spec, mesh, shardings).lower(abstract, {}, batch).compile().as_text()


def test_the_engine_step_compiles_with_the_options_and_the_specs_rewrites():
  schedule = optax.constant_schedule(0.1)
  spec = engine.StepSpec(
      student=models.create("resnet8", num_classes=10), objective=Objective({"ce": {}}),
      optimizer=optax.sgd(schedule), schedule=schedule,
      normalize=lambda x: augment.normalize(x, scale=1 / 255, mean=(0.5,), std=(0.25,)),
      rewrites=backend.ConvRewrites.default())
  hlo = _step(spec)
  assert "convolution(" in hlo and _ynn_convolutions(hlo) == 0
  assert " conditional(" in hlo and "lhs_dilate=" not in hlo  # held inputs, phased input gradients
  plain = _step(dataclasses.replace(spec, rewrites=None))
  assert " conditional(" not in plain and "lhs_dilate=" in plain


def test_the_default_rewrites_are_on_for_cpu_only():
  assert backend.ConvRewrites.default() == backend.ConvRewrites.default("cpu") == backend.ConvRewrites()
  assert backend.ConvRewrites().enabled and HOLDS_ONLY.enabled and not ALL_OFF.enabled
  assert backend.ConvRewrites.default("gpu") == backend.ConvRewrites.default("tpu") == ALL_OFF
  assert backend.rewrite(nn.relu, None) is nn.relu


def test_hold_is_the_identity_with_the_identity_derivative():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  for fn in (backend.hold, backend.hold_if_differentiated, backend.hold_unless_differentiated):
    np.testing.assert_array_equal(jax.jit(fn)(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * w)))(x), w)
    np.testing.assert_array_equal(jax.jvp(fn, (x,), (w,))[1], w)
    np.testing.assert_array_equal(jax.vmap(fn)(x), x)
    np.testing.assert_array_equal(jax.jit(fn)(jnp.arange(5)), np.arange(5))  # any dtype
  # Undifferentiated, `hold_if_differentiated` is left out and `hold_unless_differentiated` held; under grad
  # the other way round.
  compiled = lambda f: jax.jit(f).lower(x).compile().as_text().count(" conditional(")
  assert compiled(backend.hold) == 1
  assert compiled(backend.hold_if_differentiated) == 0 and compiled(backend.hold_unless_differentiated) == 1
  assert compiled(jax.grad(lambda x: jnp.sum(backend.hold_if_differentiated(x) * w))) == 1  # the cotangent
  assert compiled(jax.grad(lambda x: jnp.sum(backend.hold_unless_differentiated(x) * w))) == 0


class _ConvBnRelu(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=False)(x) + x)
    return jnp.sum(nn.Conv(16, (3, 3))(x) ** 2)


def _fused_transposes(hlo: str) -> list[str]:
  """The bodies of the compiled module's computations that transpose."""
  return [body for body in re.findall(r"^%[\w.\-]+ .*?\n(.*?)^}", hlo, re.M | re.S) if "transpose(" in body]


def test_held_convolution_inputs_keep_their_producers_out_of_the_transposes():
  """Held differentiated conv inputs: no layout transpose recomputes the ReLU that made one (XLA's default,
  several times slower than reading the stored activation), and the same gradients."""
  net, x = _ConvBnRelu(), jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 16))
  variables = net.init(jax.random.PRNGKey(1), x)

  def loss(rewrites):
    apply = backend.rewrite(net.apply, rewrites)
    return lambda p: apply({"params": p, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])[0]

  grads, hlos = {}, {}
  for held in (False, True):
    step = backend.jit(jax.grad(loss(backend.ConvRewrites(hold_inputs=held))))
    hlos[held] = step.lower(variables["params"]).compile().as_text()
    grads[held] = step(variables["params"])
  assert any("maximum(" in body for body in _fused_transposes(hlos[False])), (
      "XLA no longer fuses the ReLU into the weight gradient's transpose: is holding still needed?")
  assert not any("maximum(" in body for body in _fused_transposes(hlos[True]))
  assert hlos[True].count(" conditional(") == 2  # the second conv's input and its cotangent (outputs: not held)
  jax.tree.map(np.testing.assert_array_equal, grads[True], grads[False])
  # Not differentiated, the inputs are left alone (the conditionals are the 2 held outputs: next test).
  forward = backend.jit(loss(backend.ConvRewrites()))
  assert forward.lower(variables["params"]).compile().as_text().count(" conditional(") == 2


class _ConvPoolDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(32, (3, 3))(x)))
    x = nn.relu(nn.Conv(32, (3, 3))(x) + x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_an_inference_forward_keeps_its_convolutions_off_ynnpack():
  """Unheld, XLA:CPU grows the YNNPACK fusion of the pooling and the classifier back over the convolution
  before them (YNNPACK's convolutions are slower here, BENCHMARKS.md); held conv outputs keep them on Eigen,
  the same logits."""
  net, x = _ConvPoolDense(), jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 32))
  variables = net.init(jax.random.PRNGKey(1), x)
  hlos, logits = {}, {}
  for held in (False, True):
    forward = backend.jit(backend.rewrite(net.apply, backend.ConvRewrites(hold_outputs=held)))
    hlos[held], logits[held] = forward.lower(variables, x).compile().as_text(), forward(variables, x)
  assert _ynn_convolutions(hlos[False]) > 0, "XLA no longer fuses convolutions into YNNPACK's reductions"
  assert _ynn_convolutions(hlos[True]) == 0 and hlos[True].count(" conditional(") == 2
  np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height,width,kernel,stride,pads", [
    (8, 8, 3, 2, ((1, 1), (1, 1))),  # a ResNet's strided 3x3
    (7, 6, 3, 2, ((1, 1), (1, 1))),  # odd sizes: phases of unequal length
    (8, 8, 1, 2, ((0, 0), (0, 0))),  # a 1x1 shortcut: odd rows get no tap
    (9, 7, 3, 2, ((0, 1), (1, 0))),  # flax's SAME for odd sizes
    (12, 12, 7, 2, ((3, 3), (3, 3))),  # an ImageNet stem
    (10, 10, 3, 3, ((1, 1), (1, 1))),  # stride 3
    (9, 9, 4, 2, ((1, 2), (2, 1))),  # an even kernel, uneven padding
])
def test_phased_input_gradient_is_xlas(height, width, kernel, stride, pads):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, height, width, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 3, 5))
  y, vjp = jax.vjp(lambda x: jax.lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=DN), x)
  g = jax.random.normal(jax.random.PRNGKey(2), y.shape)
  got = backend.phased_input_gradient(g, w, x.shape, (stride, stride), pads)
  np.testing.assert_allclose(got, vjp(g)[0], rtol=1e-5, atol=1e-5)


class _StridedConvs(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x)) + nn.Conv(16, (1, 1), strides=2)(x)
    return jnp.sum(nn.Conv(4, (3, 3), strides=2, padding="VALID")(x) ** 2)


def test_strided_flax_convolutions_take_phased_input_gradients():
  """Phased input gradients: no convolution of a dilated gradient left in the compiled step, the same
  gradients as XLA's rule."""
  net, x = _StridedConvs(), jax.random.normal(jax.random.PRNGKey(0), (2, 11, 11, 3))
  params = net.init(jax.random.PRNGKey(1), x)["params"]
  grads, hlos = {}, {}
  for phased in (False, True):
    apply = backend.rewrite(net.apply, backend.ConvRewrites(phased_input_gradients=phased))
    step = backend.jit(jax.grad(lambda p, x: apply({"params": p}, x), argnums=(0, 1)))
    hlos[phased], grads[phased] = step.lower(params, x).compile().as_text(), step(params, x)
  assert hlos[False].count("lhs_dilate=2x2") >= 2 and "lhs_dilate=" not in hlos[True]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
               grads[True], grads[False])


def _train_and_eval(model, variables, x, rewrites):
  """(loss, logits, batch-stat updates, grads) of a train forward under `backend.jit`, and the inference
  logits (compiled without YNNPACK, so that the plain forward's convolutions are XLA's too)."""
  apply = backend.rewrite(model.apply, rewrites)

  def loss(params):
    logits, updates = apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(logits)), (logits, updates)

  train = backend.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  inference = jax.jit(lambda v, x: apply(v, x, train=False), compiler_options=NO_YNNPACK)(variables, x)
  return train, inference


@pytest.mark.parametrize("name", ["resnet8", "user_cnn"])
def test_rewritten_forwards_give_the_plain_values_and_gradients(name):
  """Holding changes no bit of values or gradients; phased input gradients change only the input gradients'
  summation order (so the gradients of the layers below a strided convolution, within float32 rounding)."""
  model = models.create("resnet8", num_classes=10) if name == "resnet8" else _UserCnn()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  plain, held, phased, all_off = (_train_and_eval(model, variables, x, r)
                                  for r in (None, HOLDS_ONLY, backend.ConvRewrites(), ALL_OFF))
  jax.tree.map(np.testing.assert_array_equal, held, plain)
  jax.tree.map(np.testing.assert_array_equal, all_off, plain)
  (phased_values, phased_grads), phased_logits = phased
  (plain_values, plain_grads), plain_logits = plain
  jax.tree.map(np.testing.assert_array_equal, (phased_values, phased_logits), (plain_values, plain_logits))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max()),
               phased_grads, plain_grads)


def test_without_rewrites_the_rewritten_step_is_the_plain_one():
  """All off, `rewrite` gives XLA exactly the plain program (the same StableHLO, the same op names)."""
  model = models.create("resnet8", num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), x, train=False)

  def lowered(apply):
    loss = lambda p: jnp.sum(apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])[0])
    return jax.jit(jax.grad(loss)).lower(variables["params"])

  plain, rewritten = lowered(model.apply), lowered(backend.rewrite(model.apply, ALL_OFF))
  assert rewritten.as_text(debug_info=False) == plain.as_text(debug_info=False)
  op_names = lambda l: sorted(re.findall(r'op_name="([^"]*)"', l.compile().as_text()))
  assert op_names(rewritten) == op_names(plain) and any("conv" in n for n in op_names(plain))


def test_convolutions_inside_jit_and_checkpoint_bodies_and_nnx_models_are_rewritten():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4))
  strided = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN)
  inner = lambda x, w: jnp.sum(jnp.tanh(jax.jit(strided)(jax.checkpoint(_conv)(x, w), w)))
  conv = nnx.Conv(4, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
  graph, state = nnx.split(conv)
  nnx_forward = lambda state, x: jnp.sum(jnp.tanh(nnx.merge(graph, state)(x)))
  # Held: each differentiated conv input and its cotangent.
  for fn, args, held in ((inner, (x, w), 4), (nnx_forward, (state, x), 2)):
    grads = {}
    for rewrites in (None, backend.ConvRewrites()):
      step = backend.jit(jax.grad(backend.rewrite(fn, rewrites), argnums=(0, 1)))
      hlo, grads[rewrites] = step.lower(*args).compile().as_text(), step(*args)
      assert ("lhs_dilate=2x2" in hlo) == (rewrites is None)
      assert hlo.count(" conditional(") == (0 if rewrites is None else held)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), *grads.values())
