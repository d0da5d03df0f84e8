"""Test setup: 8 fake CPU devices, strict numpy rank promotion, offline data."""
import os
import pathlib

# Must happen before JAX is imported anywhere: multi-device code is tested on CPU.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("KD_JAX_DATA_DIR", str(_SHARED_DATA))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
