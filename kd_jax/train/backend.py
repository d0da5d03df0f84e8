"""XLA compiler settings for the engine's jitted functions, per backend.

On CPU, XLA (jaxlib 0.10) hands convolutions to YNNPACK by default. Its
weight-gradient convolutions are slow on the CPUs we measured: 1.5x XLA's own
Eigen convolutions on an AVX-512 EPYC, and 25x on an AVX2 EPYC (Zen 3), where
they made a resnet8x4 train step 6x slower (BENCHMARKS.md). So the engine
compiles its steps with convolutions left to Eigen, and everything else
(YNNPACK's dots and reductions) as XLA's default.

`jit` is `jax.jit` with these options. A user who sets the same XLA option in
`XLA_FLAGS` (e.g. `--xla_cpu_experimental_ynn_fusion_type=+individual_convolution`
to keep YNNPACK's convolutions) keeps that choice: nothing is overridden then.
Other backends (GPU, TPU) get no options.

On CPU `jit` takes one more measure for the same convolutions, "holding"
values (`hold`) so that XLA does not fuse across them: a differentiated input,
so that the layout transposes feeding the weight gradients read stored
activations instead of recomputing them (a resnet32 train step takes about
0.6-0.65x the time with it), and an inference forward's output, so that
YNNPACK's reductions do not take the convolutions before them (resnet8x4's
inference forward: 0.6x). Figures in BENCHMARKS.md.

And it computes the input gradients of strided flax convolutions by phases (`phased_input_gradient`): XLA
convolves the output gradient dilated by the stride, multiplying the inserted zeros (a 3x3 stride-2
convolution's input gradient: 4x the multiplications, about 2x the time).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

YNN_FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10's default YNNPACK fusion types without LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION, i.e. what
# `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` gives (checked by
# tests/test_backend.py: the same fusions as the default for everything but convolutions).
CPU_OPTIONS = {YNN_FUSION_TYPES: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_options_supported() -> bool:
  """Whether this jaxlib knows the options (an older or newer one may not): one tiny compile."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.zeros(1, np.float32)).compile()
    return True
  except Exception as e:  # unknown option or enum value: compile as XLA's default
    log.info("XLA:CPU options %s not taken by this jaxlib (%s); using its defaults", CPU_OPTIONS, e)
    return False


def compiler_options(platform: str | None = None) -> dict[str, Any] | None:
  """The options for jitted functions on `platform` (default: jax's default backend), or None."""
  platform = platform or jax.default_backend()
  if platform != "cpu" or YNN_FUSION_TYPES in os.environ.get("XLA_FLAGS", ""):
    return None
  return dict(CPU_OPTIONS) if _cpu_options_supported() else None


# Whether `jit` holds convolutions' inputs and outputs on CPU (`_hold_convolutions`); switches for
# measuring them (experiments/benchmark.py figures are with both on).
HOLD_CONV_INPUTS = True
HOLD_CONV_OUTPUTS = True
# Whether `jit` on CPU computes the input gradients of strided flax convolutions by phases (`strided_conv`).
PHASED_INPUT_GRADIENTS = True

_NHWC = ("NHWC", "HWIO", "NHWC")


def hold(x: jax.Array) -> jax.Array:
  """`x`, as a value XLA keeps in one buffer instead of recomputing it inside each consumer's fusion.

  Why: XLA:CPU's weight-gradient convolution reads its input in another layout, through a transpose, and
  fuses the elementwise work that produced that input (BatchNorm, residual add, ReLU) into the transpose
  rather than reading the stored activation; such a fused transpose runs 5-10x slower than the plain one
  (BENCHMARKS.md, "Profile"). `jax.lax.optimization_barrier` does not stop it (XLA:CPU removes barriers
  before fusing); a conditional does: its result is one buffer. The predicate is a constant False that XLA
  cannot see through (behind an optimisation barrier), so `hold(x)` is exactly `x`; the branch never taken
  gives NaN (zeros for integers), so a compiler that took it would not go unnoticed. The derivative is the same conditional over
  the tangent (linear in it), so the cotangent is held too.
  """
  x = jnp.asarray(x)
  never = jax.lax.optimization_barrier(jnp.zeros((), bool))
  if jnp.issubdtype(x.dtype, jnp.inexact):
    untaken = lambda v: v * jnp.asarray(jnp.nan, v.dtype)
  else:  # integers and booleans have no NaN (and no derivative)
    untaken = jnp.zeros_like
  return jax.lax.cond(never, untaken, lambda v: v, x)


@jax.custom_jvp
def hold_if_differentiated(x: jax.Array) -> jax.Array:
  """`x`, held (`hold`) where it is differentiated: an inference forward (the teacher's) is left as is."""
  return x


@hold_if_differentiated.defjvp
def _hold_if_differentiated_jvp(primals, tangents):
  return hold(primals[0]), hold(tangents[0])


@jax.custom_jvp
def hold_unless_differentiated(x: jax.Array) -> jax.Array:
  """`x`, held (`hold`) where it is not differentiated (an inference forward), as is where it is."""
  return hold(x)


@hold_unless_differentiated.defjvp
def _hold_unless_differentiated_jvp(primals, tangents):
  return primals[0], tangents[0]


def phased_input_gradient(g: jax.Array, w: jax.Array, x_shape: tuple[int, ...], strides: tuple[int, int],
                          pads: tuple[tuple[int, int], tuple[int, int]], precision=None) -> jax.Array:
  """The input gradient of `y = conv(x, w)` (NHWC / HWIO, `strides`, explicit `pads`) for the cotangent `g` of
  `y`, without dilating `g`.

  Input row p = s·u + r (phase r < s) receives the kernel taps a ≡ r + pad_low (mod s) only, from output rows
  u + c − t (a = a0 + s·t, c = (r + pad_low − a0) / s): per phase pair a stride-1 correlation of `g` with those
  taps, flipped and with input and output channels swapped, then the s_h × s_w results interleaved. The same
  multiplications as the forward, where XLA's own rule convolves `g` dilated by the stride (s_h·s_w times as
  many, most of them by the inserted zeros).
  """
  batch, height, width, channels = x_shape
  kh, kw = w.shape[:2]
  (sh, sw), ((h_low, _), (w_low, _)) = strides, pads
  out_h, out_w = g.shape[1], g.shape[2]
  rows_h, rows_w = -(-height // sh), -(-width // sw)  # rows of the largest phase

  def phase(k, s, low, r):  # (first tap, number of taps, output offset c)
    first = (r + low) % s
    return first, len(range(first, k, s)), (r + low - first) // s

  phases = []
  for rh in range(sh):
    for rw in range(sw):
      (ah, th, ch), (aw, tw, cw) = phase(kh, sh, h_low, rh), phase(kw, sw, w_low, rw)
      uh, uw = len(range(rh, height, sh)), len(range(rw, width, sw))
      if th == 0 or tw == 0 or uh == 0 or uw == 0:  # no tap reaches this phase (e.g. a 1x1 kernel's odd rows)
        phases.append(jnp.zeros((batch, rows_h, rows_w, channels), g.dtype))
        continue
      taps = jnp.swapaxes(w[ah::sh][:th][::-1, aw::sw][:, :tw][:, ::-1], 2, 3)  # [th, tw, O, C]
      lh, lw = th - 1 - ch, tw - 1 - cw  # g's rows before output row 0 of the phase (negative: cropped)
      padded = jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (lh, uh + th - 1 - out_h - lh, 0),
                                                       (lw, uw + tw - 1 - out_w - lw, 0), (0, 0, 0)))
      part = jax.lax.conv_general_dilated(padded, taps.astype(g.dtype), (1, 1), "VALID", dimension_numbers=_NHWC,
                                          precision=precision)
      phases.append(jnp.pad(part, ((0, 0), (0, rows_h - uh), (0, rows_w - uw), (0, 0))))
  dx = jnp.stack(phases, 0).reshape(sh, sw, batch, rows_h, rows_w, channels)
  dx = dx.transpose(2, 3, 0, 4, 1, 5).reshape(batch, rows_h * sh, rows_w * sw, channels)
  return dx[:, :height, :width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _phased_conv(x, w, strides, pads, precision):
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


def _phased_conv_fwd(x, w, strides, pads, precision):
  return _phased_conv(x, w, strides, pads, precision), (x, w)


def _phased_conv_bwd(strides, pads, precision, residuals, g):
  x, w = residuals
  _, weight_vjp = jax.vjp(lambda w: jax.lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=_NHWC, precision=precision), w)
  return phased_input_gradient(g, w, x.shape, strides, pads, precision).astype(x.dtype), weight_vjp(g)[0]


_phased_conv.defvjp(_phased_conv_fwd, _phased_conv_bwd)


def strided_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, precision=None, **kwargs):
  """`jax.lax.conv_general_dilated`, with the input gradient of a strided 2-D NHWC / HWIO convolution (no
  dilation, one group: what flax's `nn.Conv` calls with `strides`) computed by `phased_input_gradient`."""
  strides = tuple(window_strides)
  phased = (lhs.ndim == 4 and rhs.ndim == 4 and max(strides) > 1 and feature_group_count == 1 and not kwargs
            and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
            and dimension_numbers is not None
            and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not phased:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  return _phased_conv(lhs, rhs, strides, tuple(tuple(int(p) for p in pair) for pair in padding), precision)


def _hold_convolutions(next_fun, args, kwargs, context):
  """A flax method interceptor for `nn.Conv` / `nn.ConvTranspose` calls: a differentiated input is held
  (see `hold`), and so is the output of an inference forward: else XLA:CPU grows the YNNPACK fusion of the
  global pooling's reduction and the classifier's dot back through the convolutions before them, onto
  YNNPACK's convolutions (1.2-2x Eigen's time here; resnet8x4's inference forward 1.6x: BENCHMARKS.md).
  An `nn.Conv` without a convolution function of its own gets `strided_conv` for the call (flax's
  `conv_general_dilated` hook): its input gradient by phases when strided."""
  if not (isinstance(context.module, (nn.Conv, nn.ConvTranspose)) and context.method_name == "__call__" and args):
    return next_fun(*args, **kwargs)
  x = hold_if_differentiated(args[0]) if HOLD_CONV_INPUTS else args[0]
  module = context.module
  phase = (PHASED_INPUT_GRADIENTS and type(module) is nn.Conv and module.conv_general_dilated is None
           and module.conv_general_dilated_cls is None)
  if phase:  # flax's hook for the convolution function, set for this call only
    object.__setattr__(module, "conv_general_dilated", strided_conv)
  try:
    out = next_fun(x, *args[1:], **kwargs)
  finally:
    if phase:
      object.__setattr__(module, "conv_general_dilated", None)
  return hold_unless_differentiated(out) if HOLD_CONV_OUTPUTS else out


def jit(fun: Callable, **kwargs) -> Callable:
  """`jax.jit(fun, **kwargs)` compiled with `compiler_options()` for the default backend; on CPU, the
  flax convolutions in `fun` held, and strided ones given phased input gradients, as `_hold_convolutions`
  says."""
  if jax.default_backend() == "cpu" and (HOLD_CONV_INPUTS or HOLD_CONV_OUTPUTS or PHASED_INPUT_GRADIENTS):
    inner = fun

    @functools.wraps(inner)
    def fun(*args, **kw):
      with nn.intercept_methods(_hold_convolutions):
        return inner(*args, **kw)
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
