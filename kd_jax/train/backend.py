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


def _hold_convolutions(next_fun, args, kwargs, context):
  """A flax method interceptor for `nn.Conv` / `nn.ConvTranspose` calls: a differentiated input is held
  (see `hold`), and so is the output of an inference forward: else XLA:CPU grows the YNNPACK fusion of the
  global pooling's reduction and the classifier's dot back through the convolutions before them, onto
  YNNPACK's convolutions (1.2-2x Eigen's time here; resnet8x4's inference forward 1.6x: BENCHMARKS.md)."""
  if not (isinstance(context.module, (nn.Conv, nn.ConvTranspose)) and context.method_name == "__call__" and args):
    return next_fun(*args, **kwargs)
  x = hold_if_differentiated(args[0]) if HOLD_CONV_INPUTS else args[0]
  out = next_fun(x, *args[1:], **kwargs)
  return hold_unless_differentiated(out) if HOLD_CONV_OUTPUTS else out


def jit(fun: Callable, **kwargs) -> Callable:
  """`jax.jit(fun, **kwargs)` compiled with `compiler_options()` for the default backend; on CPU, the
  flax convolutions in `fun` held as `_hold_convolutions` says."""
  if jax.default_backend() == "cpu" and (HOLD_CONV_INPUTS or HOLD_CONV_OUTPUTS):
    inner = fun

    @functools.wraps(inner)
    def fun(*args, **kw):
      with nn.intercept_methods(_hold_convolutions):
        return inner(*args, **kw)
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
