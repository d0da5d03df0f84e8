"""XLA compiler settings per backend, and the CPU rewrites of a model's convolutions.

`jit` is `jax.jit` compiled with `compiler_options()`: on CPU, convolutions are left to XLA's own Eigen
convolutions instead of YNNPACK (whose weight-gradient convolutions are several times slower on the CPUs
measured, BENCHMARKS.md), everything else as XLA's default. A user who sets the same option in `XLA_FLAGS`
keeps that choice. Other backends get no options.

`rewrite(fn, rewrites)` wraps a function (a model's forward) so that its convolutions run as `ConvRewrites`
says; the engine applies it to every model forward when the plan's rewrites are enabled (by default on CPU
only, `ConvRewrites.default`). Each rewrite keeps the values and only changes what XLA:CPU compiles:
  - hold_inputs: a differentiated convolution input is held (`hold`), so the layout transposes feeding the
    weight gradient read the stored activation instead of recomputing BatchNorm / add / ReLU inside them;
  - hold_outputs: an inference forward's convolution outputs are held, so YNNPACK's reduction fusions
    (pooling, classifier) do not grow back over the convolutions;
  - phased_input_gradients: a strided 2-D convolution's input gradient is computed by phases
    (`phased_input_gradient`) instead of convolving the stride-dilated output gradient (mostly zeros).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.extend.core as jex_core
import jax.extend.source_info_util as source_info
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


def jit(fun: Callable, **kwargs) -> Callable:
  """`jax.jit(fun, **kwargs)` compiled with `compiler_options()` for the default backend."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


@dataclasses.dataclass(frozen=True)
class ConvRewrites:
  """Which convolution rewrites `rewrite` applies (module docstring); none changes a value."""

  hold_inputs: bool = True
  hold_outputs: bool = True
  phased_input_gradients: bool = True

  @classmethod
  def default(cls, platform: str | None = None) -> "ConvRewrites":
    """All on for CPU (default: jax's default backend), all off elsewhere (XLA:GPU/TPU need none)."""
    on = (platform or jax.default_backend()) == "cpu"
    return cls(hold_inputs=on, hold_outputs=on, phased_input_gradients=on)

  @property
  def enabled(self) -> bool:
    return self.hold_inputs or self.hold_outputs or self.phased_input_gradients


_NHWC = ("NHWC", "HWIO", "NHWC")


def hold(x: jax.Array) -> jax.Array:
  """`x`, as a value XLA keeps in one buffer instead of recomputing it inside each consumer's fusion.

  Why: XLA:CPU's weight-gradient convolution reads its input in another layout, through a transpose, and
  fuses the elementwise work that produced that input (BatchNorm, residual add, ReLU) into the transpose
  rather than reading the stored activation, which is several times slower (BENCHMARKS.md, "Profile").
  `jax.lax.optimization_barrier` does not stop it (XLA:CPU removes barriers before fusing); a conditional
  does: its result is one buffer. The predicate is a constant False that XLA cannot see through (behind an
  optimisation barrier), so `hold(x)` is exactly `x`; the branch never taken gives NaN (zeros for
  integers), so a compiler that took it would not go unnoticed. The derivative is the same conditional over
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


def _phaseable(lhs, rhs, params) -> bool:
  """Whether a `conv_general_dilated` equation is a strided 2-D NHWC / HWIO convolution without dilation,
  groups or a preferred output type (what flax's `nn.Conv` with `strides` gives): `phased_input_gradient`'s
  case."""
  return (lhs.ndim == 4 and rhs.ndim == 4 and max(params["window_strides"]) > 1
          and params["feature_group_count"] == 1 and params["batch_group_count"] == 1
          and all(d == 1 for d in tuple(params["lhs_dilation"]) + tuple(params["rhs_dilation"]))
          and params["preferred_element_type"] is None and params.get("out_sharding") is None
          and params["dimension_numbers"] == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def _convolution(primitive, lhs, rhs, params, rewrites: ConvRewrites):
  """One `conv_general_dilated` equation, rewritten as `rewrites` says."""
  if rewrites.hold_inputs:
    lhs = hold_if_differentiated(lhs)
  if rewrites.phased_input_gradients and _phaseable(lhs, rhs, params):
    pads = tuple((int(low), int(high)) for low, high in params["padding"])
    out = _phased_conv(lhs, rhs, tuple(params["window_strides"]), pads, params["precision"])
  else:
    out = primitive.bind(lhs, rhs, **primitive.get_bind_params(params))
  return hold_unless_differentiated(out) if rewrites.hold_outputs else out


_CONV = "conv_general_dilated"
# Source lines in this file are left out of tracebacks (as jax's own are): a rewritten model's HLO metadata
# names the same lines as the plain one.
source_info.register_exclusion(__file__)
# Call primitives whose body is evaluated in line when it holds a convolution: {name: param of the body}.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_REMATS = ("remat2", "checkpoint")  # `jax.checkpoint`'s primitive ("remat2" in jax 0.10)


def _has_convolution(jaxpr) -> bool:
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's
  return any(eqn.primitive.name == _CONV or any(map(_has_convolution, jex_core.jaxprs_in_params(eqn.params)))
             for eqn in jaxpr.eqns)


def _bind(eqn, invals, rewrites: ConvRewrites):
  """The equation's outputs for `invals` (a list where the primitive has multiple results)."""
  name, params = eqn.primitive.name, eqn.params
  if name == _CONV:
    return _convolution(eqn.primitive, *invals, params, rewrites)
  if name in _CALLS and _has_convolution(params[_CALLS[name]]):
    body = params[_CALLS[name]]
    return _evaluate(getattr(body, "jaxpr", body), getattr(body, "consts", ()), invals, rewrites)
  if name in _REMATS and _has_convolution(params["jaxpr"]):  # kept a remat, with its policy
    body = lambda *xs: _evaluate(params["jaxpr"], (), xs, rewrites)
    return jax.checkpoint(body, prevent_cse=params["prevent_cse"], policy=params["policy"])(*invals)
  return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))


def _evaluate(jaxpr, consts, args, rewrites: ConvRewrites) -> list:
  """`jaxpr`'s outputs for `args`, each equation bound as it is but the convolutions (`_convolution`), in
  the calling trace: under `jax.grad` the holds see which convolutions are differentiated."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    # The equation's source line and module path, as `jax.core.eval_jaxpr` keeps them: profiles and the HLO's
    # metadata name the model's code, not this loop.
    name_stack = source_info.current_name_stack() + eqn.source_info.name_stack
    with source_info.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
      outs = _bind(eqn, [read(v) for v in eqn.invars], rewrites)
    env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
  return [read(v) for v in jaxpr.outvars]


def rewrite(fn: Callable, rewrites: ConvRewrites | None) -> Callable:
  """`fn` with its convolutions rewritten as `rewrites` says (None: `fn` itself).

  The wrapper traces `fn` to a jaxpr (array leaves of the arguments traced, other leaves such as `train=True`
  or `mutable=[...]` fixed) and evaluates it equation by equation in the caller's trace, each
  `conv_general_dilated` replaced (convolutions inside `jax.jit`, `closed_call` and `jax.checkpoint` bodies
  too; not inside control flow or custom derivatives). So it works for any model (zoo, user linen, NNX);
  wrap the forward, not a differentiated function, so the holds see what is differentiated.
  """
  if rewrites is None:
    return fn

  @functools.wraps(fn)
  def rewritten(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray, np.generic))]

    def traced(*arrays):
      full = list(leaves)
      for i, array in zip(traced_at, arrays):
        full[i] = array
      inner_args, inner_kwargs = jax.tree.unflatten(treedef, full)
      return fn(*inner_args, **inner_kwargs)

    arrays = [leaves[i] for i in traced_at]
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(*arrays)
    outs = _evaluate(closed.jaxpr, closed.consts, arrays, rewrites)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return rewritten
