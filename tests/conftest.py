"""Test setup: 8 fake CPU devices, strict numpy rank promotion, offline data, references that CI cannot skip."""
import importlib
import os
import pathlib
import shutil
import tempfile

# Must happen before JAX is imported anywhere: multi-device code is tested on CPU.
# The suite is dominated by compilation on 2 cores. LLVM's expensive passes are skipped (about 2x
# faster compiles), and fusions are emitted by XLA:CPU's loop emitters rather than its MLIR fusion
# emitters (about 2x faster again on a convnet's train step); same IEEE arithmetic, no fast-math.
# Subprocesses the tests start (training runs, benchmark workers) inherit these flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run: the training subprocesses that are killed and
# resumed or restarted (test_reliability, test_multiprocess, benchmark workers) compile the same steps
# again. The xdist workers and every subprocess inherit the directory; whoever made it removes it.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kd_jax_tests_compile_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
_SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("KD_JAX_DATA_DIR", str(_SHARED_DATA))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# CI sets this (.ci/run): the independent references (torch, torchdistill, transformers) must then be
# installed, and their parity tests run, rather than be skipped without anyone noticing.
REQUIRE_REFERENCES = os.environ.get("KD_JAX_REQUIRE_REFERENCES", "") not in ("", "0")


def require_reference(name: str, why: str = ""):
  """`pytest.importorskip(name)`, but a failure where KD_JAX_REQUIRE_REFERENCES=1."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    message = f"reference {name!r} is not importable{f' ({why})' if why else ''}: {e}"
    if REQUIRE_REFERENCES:
      pytest.fail(f"{message}; KD_JAX_REQUIRE_REFERENCES is set, so its parity tests must run", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def pytest_collection_modifyitems(config, items):
  """An expected failure must say why and must fail when it starts passing (strict)."""
  for item in items:
    for mark in item.iter_markers("xfail"):
      if not mark.kwargs.get("reason") or not mark.kwargs.get("strict", config.getini("xfail_strict")):
        raise pytest.UsageError(f"{item.nodeid}: xfail needs a reason and strict=True")


def pytest_sessionfinish(session):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
