"""Test-set evaluation of a trained (stack of) model(s): every test example counted exactly once."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.train import mesh as mesh_lib


def head_name(feature_name: str) -> str:
  """The metric name of an eval head: `exit_stage1_logits` -> `exit_stage1`."""
  return feature_name[:-len("_logits")] if feature_name.endswith("_logits") else feature_name


def device_multiple(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's devices (the padding is masked)."""
  return -(-batch_size // mesh.devices.size) * mesh.devices.size


def evaluate(eval_step, variables, dataset, batch_size: int, mesh) -> dict[str, float]:
  """Test-set accuracy, error count and mean cross-entropy (each process reads only its rows). Batches are
  padded to a multiple of the device count and masked, so any `batch_size` counts each example once."""
  batch_size = device_multiple(batch_size, mesh)
  sharding = mesh_lib.batch_sharding(mesh)
  (rows,) = mesh_lib.local_block(sharding, (batch_size,))
  totals = None
  for batch in dataset.test_batches(batch_size, rows=rows):
    sums = eval_step(variables, mesh_lib.put_local(batch, sharding, (batch_size,)))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals["count"])
  correct = np.rint(totals["correct"]).astype(int)  # [K]: one entry per peer
  result = {"test_accuracy": float(correct.mean()) / count, "test_errors": int(round(count - correct.mean())),
            "test_loss": float(totals["loss"].mean()) / count}
  if correct.size > 1:
    result["peer_test_accuracy"] = [int(c) / count for c in correct]
    result["ensemble_test_accuracy"] = float(totals["ensemble_correct"]) / count
  for name, head_correct in totals.get("head_correct", {}).items():  # early exits, SLA's heads (mean over peers)
    result[f"test_accuracy/{head_name(name)}"] = float(np.rint(head_correct).mean()) / count
  return result
