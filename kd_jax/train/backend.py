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
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import jax
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
