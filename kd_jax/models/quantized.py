"""Quantised zoo models for quantized distillation (Polino, Pascanu & Alistarh 2018, "Model compression via
distillation and quantization", ICLR).

`quantized` wraps any zoo model: its weights are stored in full precision (the
"master" weights the optimizer updates) and fake-quantised to `bits` bits in
every forward pass, in training and in evaluation, so the reported accuracy is
the quantised network's. Gradients pass straight through the rounding to the
full-precision weights (STE), as in the paper's quantized distillation, which
trains the quantised student with the distillation loss from the teacher.

The quantiser is the paper's uniform one with min-max scaling: per tensor (or
per output channel, the last axis of a kernel),
  α = max(w) − min(w),  β = min(w),  s = 2^bits − 1,
  Q(w) = α · round(s · (w − β) / α) / s + β,
so every quantised tensor (channel) takes at most 2^bits distinct values, the
extremes included. Deterministic rounding (the paper also has a stochastic
variant), no bucketing (the paper's buckets of d consecutive weights are the
scaling groups; here the group is the tensor or the channel).

Quantised: every `kernel` (Dense and conv weights). Kept in float: biases,
BatchNorm scales/offsets and statistics (per-channel affine terms, cheap to
keep at full precision and folded into the next layer's scaling in practice).

  model = kd_jax.models.create("quantized", num_classes=10, base="mlp_800", bits=4)

Params live under "base" with the base model's names; features are the base's.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models import create, register

SCALINGS = ("tensor", "channel")


def quantize(w: jax.Array, bits: int, *, scaling: str = "tensor") -> jax.Array:
  """Uniform min-max quantisation of `w` to 2^bits levels (see the module docstring), float32 like `w`.

  scaling: "tensor" (one α, β for the whole tensor) or "channel" (one per entry of the
  last axis, the output channel of a kernel). A constant tensor (α = 0) is returned unchanged.
  """
  if scaling not in SCALINGS:
    raise ValueError(f"quantize: scaling must be one of {SCALINGS}, got {scaling!r}")
  axes = tuple(range(w.ndim)) if scaling == "tensor" else tuple(range(w.ndim - 1))
  low = jnp.min(w, axis=axes, keepdims=True)
  span = jnp.max(w, axis=axes, keepdims=True) - low
  levels = 2.0 ** bits - 1.0
  safe = jnp.where(span > 0, span, 1.0)
  q = jnp.round((w - low) / safe * levels) / levels * safe + low
  return jnp.where(span > 0, q, w)


def straight_through(w: jax.Array, bits: int, *, scaling: str = "tensor") -> jax.Array:
  """Q(w) in the forward pass, exactly; the identity in the backward pass (d out / d w = 1)."""
  q = jax.lax.stop_gradient(quantize(w, bits, scaling=scaling))
  return q + (w - jax.lax.stop_gradient(w))  # w − w = 0 exactly: the value is Q(w) to the bit


def quantize_params(params: Any, bits: int, *, scaling: str = "tensor") -> Any:
  """`params` with every `kernel` leaf fake-quantised (straight-through), the other leaves unchanged."""

  def leaf(path, w):
    if getattr(path[-1], "key", None) == "kernel" and w.ndim >= 2:
      return straight_through(w, bits, scaling=scaling)
    return w

  return jax.tree_util.tree_map_with_path(leaf, params)


class Quantized(nn.Module):
  """`base` applied with its kernels quantised to `bits` bits (float master weights under "base")."""

  base: nn.Module
  bits: int
  scaling: str = "tensor"

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    apply = nn.map_variables(
        lambda module, x: module(x, train=train, return_features=return_features), "params",
        trans_in_fn=lambda p: quantize_params(p, self.bits, scaling=self.scaling), init=self.is_initializing())
    return apply(self.base, x)


@register("quantized", input_shape=None)
def quantized(*, num_classes: int, base: str, bits: int, scaling: str = "tensor",
              base_kwargs: Mapping[str, Any] | None = None) -> Quantized:
  """The zoo model `base` with `bits`-bit weights (1 <= bits <= 16)."""
  if not isinstance(bits, int) or not 1 <= bits <= 16:
    raise ValueError(f"quantized: bits must be an int in [1, 16], got {bits!r}")
  if scaling not in SCALINGS:
    raise ValueError(f"quantized: scaling must be one of {SCALINGS}, got {scaling!r}")
  if base == "quantized":
    raise ValueError("quantized: base must be a zoo model other than 'quantized'")
  return Quantized(create(base, num_classes=num_classes, **dict(base_kwargs or {})), bits, scaling)
