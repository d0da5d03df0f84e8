"""Mutation check of the test suite (`make mutants`; not collected by pytest: no test_ prefix).

Each mutant is a realistic bug, one exact text replacement in one file, where it
would silently change results: how the engine wires a method (which params it
updates, which keys it draws, what peers see), the terms' defaults and
stop-gradients, the data order and the evaluation. For each mutant the repo (its
git-tracked and untracked, non-ignored files) is copied to a temporary
directory with `../shared` linked beside it, the replacement is applied (the old
text must occur exactly once), and the mutant's test files are run with
`pytest -x -q` (the default suite's options). A mutant is killed when they fail.
Exit status 1 if any mutant survives.

After a redesign, re-point a mutant by editing its `file`, `old` and `new` only.

    python tests/mutants.py            # every mutant
    python tests/mutants.py -k byot    # those whose name contains "byot"
    python tests/mutants.py --baseline # first check that the unmutated files pass
    python tests/mutants.py --check    # only check that every old text occurs exactly once
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  file: str
  old: str
  new: str
  tests: tuple[str, ...]  # test files (or node ids), run in this order


ENGINE = "kd_jax/train/engine.py"
MUTANTS = (
    # The engine.
    Mutant("term and connector params not updated", ENGINE,
           "  params = optax.apply_updates(state.params, updates)\n",
           "  params = {**optax.apply_updates(state.params, updates), \"terms\": state.params[\"terms\"]}\n",
           ("tests/test_engine.py",)),
    Mutant("per-step key frozen", ENGINE,
           "step_rng = jax.random.fold_in(state.rng, state.step)",
           "step_rng = jax.random.fold_in(state.rng, 0)",
           ("tests/test_engine.py",)),
    Mutant("peers share one key", ENGINE,
           "return jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(peers))",
           "return jax.vmap(lambda k: jax.random.fold_in(rng, 0 * k))(jnp.arange(peers))",
           ("tests/test_engine.py",)),
    Mutant("peer exchange includes the peer itself", "kd_jax/train/sources.py",
           "return jnp.stack([jnp.roll(stacked, shift, axis=0) for shift in range(1, peers)], axis=1)",
           "return jnp.stack([jnp.roll(stacked, shift - 1, axis=0) for shift in range(1, peers)], axis=1)",
           ("tests/test_engine.py", "tests/test_online.py")),
    Mutant("peers' gradients averaged, not each peer's own", ENGINE,
           "    return jnp.sum(loss), (jax.tree.map(jnp.mean, metrics), batch_stats, method_state)",
           "    return jnp.mean(loss), (jax.tree.map(jnp.mean, metrics), batch_stats, method_state)",
           ("tests/test_online.py", "tests/test_engine.py")),
    Mutant("BatchNorm statistics not updated", ENGINE,
           "      batch_stats=keep_old({\"student\": batch_stats}, state.batch_stats),",
           "      batch_stats=state.batch_stats,",
           ("tests/test_engine.py",)),
    Mutant("term state (memory bank, connector statistics) not carried", ENGINE,
           "      method_state=keep_old(method_state, state.method_state),",
           "      method_state=state.method_state,",
           ("tests/test_engine.py",)),
    Mutant("stale copies refreshed one step late", ENGINE,
           "new_state.batch_stats[\"student\"], new_state.step))",
           "new_state.batch_stats[\"student\"], state.step))",
           ("tests/test_online.py",)),
    Mutant("frozen params trained", "kd_jax/train/planning.py",
           "optax.multi_transform({\"trained\": optimizer, \"frozen\": optax.set_to_zero()}, labels)",
           "optax.multi_transform({\"trained\": optimizer, \"frozen\": optimizer}, labels)",
           ("tests/test_engine.py",)),
    Mutant("weight decay dropped", "kd_jax/train/optim.py",
           "return optax.chain(optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(), chain)",
           "return optax.chain(optax.identity(), chain)",
           ("tests/test_engine.py",)),
    # Evaluation.
    Mutant("eval counts the padding", ENGINE,
           "    mask = batch[\"mask\"].astype(jnp.float32)\n",
           "    mask = jnp.ones_like(batch[\"mask\"], jnp.float32)\n",
           ("tests/test_engine.py",)),
    Mutant("eval drops the last partial batch", "kd_jax/data/__init__.py",
           "    for start in range(0, n, batch_size):\n      positions",
           "    for start in range(0, n - batch_size + 1, batch_size):\n      positions",
           ("tests/test_engine.py",)),
    # Data order.
    Mutant("same order every epoch", "kd_jax/data/__init__.py",
           "key = [seed, epoch] + ([stream] if stream else [])",
           "key = [seed] + ([stream] if stream else [])",
           ("tests/test_data.py",)),
    Mutant("every stream reads the same order", "kd_jax/data/__init__.py",
           "key = [seed, epoch] + ([stream] if stream else [])",
           "key = [seed, epoch]",
           ("tests/test_data.py", "tests/test_engine.py::test_stale_peers_each_read_their_own_data_order")),
    # Terms.
    Mutant("at's default p 2 -> 1", "kd_jax/distill/features.py",
           "teacher_features: Sequence[str] = (\"stage1\", \"stage2\", \"stage3\"), p: float = 2.0):",
           "teacher_features: Sequence[str] = (\"stage1\", \"stage2\", \"stage3\"), p: float = 1.0):",
           ("tests/test_terms.py",)),
    Mutant("BYOT's deepest feature not a constant", "kd_jax/distill/self_distillation.py",
           "deepest_feature = jax.lax.stop_gradient(feature(student, \"pre_logits\", who=\"student\"))",
           "deepest_feature = feature(student, \"pre_logits\", who=\"student\")",
           ("tests/test_terms.py",)),
    # (Equivalent, so not listed: ONE's `stop_gradient(ensemble)` and FT's `stop_gradient` of the frozen
    # paraphraser's variables; kd_loss holds its target constant and FT stops the teacher factor's gradient again.)
    Mutant("OKDDip's attention inputs detached (the authors' code lets gradients through)",
           "kd_jax/distill/collaborative.py",
           "self._constant(features[1:])",
           "jax.lax.stop_gradient(features[1:])",
           ("tests/test_terms.py",)),
    Mutant("FT's paraphraser not frozen in the transfer stage (weight decay shrinks it)",
           "kd_jax/distill/features.py",
           "self.frozen_params = (\"paraphraser\",) if stage == \"transfer\" else ()",
           "self.frozen_params = ()",
           ("tests/test_engine.py",)),
    Mutant("DKD's default beta 8 -> 1", "kd_jax/distill/logits.py",
           "def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature=4.0, standardize: bool = False):",
           "def __init__(self, alpha: float = 1.0, beta: float = 1.0, temperature=4.0, standardize: bool = False):",
           ("tests/test_terms.py",)),
    Mutant("a term's start epoch starts one step late", "kd_jax/distill/core.py",
           "return self.weights[name] * jnp.where(since_start >= 0, ramp, 0.0)",
           "return self.weights[name] * jnp.where(since_start > 0, ramp, 0.0)",
           ("tests/test_distill.py", "tests/test_online.py")),
)


def _files(root: str) -> list[str]:
  out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                       capture_output=True).stdout.decode()
  return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f))]


def _copy(root: str, destination: str) -> str:
  """The repo's files under destination/repo, with destination/shared -> ../shared."""
  repo = os.path.join(destination, "repo")
  for f in _files(root):
    os.makedirs(os.path.dirname(os.path.join(repo, f)), exist_ok=True)
    shutil.copy2(os.path.join(root, f), os.path.join(repo, f))
  shared = os.path.join(os.path.dirname(root), "shared")
  if os.path.isdir(shared):
    os.symlink(shared, os.path.join(destination, "shared"))
  return repo


def _apply(repo: str, mutant: Mutant) -> None:
  path = os.path.join(repo, mutant.file)
  with open(path) as f:
    text = f.read()
  count = text.count(mutant.old)
  if count != 1:
    raise SystemExit(f"mutant {mutant.name!r}: its old text occurs {count} times in {mutant.file} (must be once); "
                     "re-point it")
  with open(path, "w") as f:
    f.write(text.replace(mutant.old, mutant.new))


def _pytest(repo: str, tests, env) -> tuple[int, float, str]:
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", *tests], cwd=repo, env=env,
                        capture_output=True, text=True)
  lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
  # The test that failed (an ERROR is a crash at collection or setup, worth a look), then pytest's summary.
  failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
  return proc.returncode, time.time() - start, "; ".join(failed[:1] + lines[-1:])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("-k", default="", help="only mutants whose name contains this")
  parser.add_argument("--baseline", action="store_true", help="first run the unmutated test files (must pass)")
  parser.add_argument("--check", action="store_true", help="only check that each old text occurs exactly once")
  args = parser.parse_args(argv)
  mutants = [m for m in MUTANTS if args.k in m.name]
  if args.check:
    for mutant in mutants:
      with open(os.path.join(ROOT, mutant.file)) as f:
        count = f.read().count(mutant.old)
      print(f"{'ok ' if count == 1 else 'BAD'} {count}x  {mutant.name} ({mutant.file})")
    return 0 if all(open(os.path.join(ROOT, m.file)).read().count(m.old) == 1 for m in mutants) else 1
  with tempfile.TemporaryDirectory(prefix="kd_jax_mutants_") as scratch:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # One compilation cache for every run: only the graphs a mutant changes compile again.
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(scratch, "compile_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    if args.baseline:
      repo = _copy(ROOT, os.path.join(scratch, "baseline"))
      files = {t for m in mutants for t in m.tests if "::" not in t}
      tests = sorted(files | {t for m in mutants for t in m.tests if t.split("::")[0] not in files})
      code, seconds, last = _pytest(repo, tests, env)
      print(f"baseline ({' '.join(tests)}): {'passed' if code == 0 else 'FAILED'} in {seconds:.0f} s: {last}",
            flush=True)
      if code != 0:
        return 2
    survivors = []
    for i, mutant in enumerate(mutants):
      repo = _copy(ROOT, os.path.join(scratch, f"mutant{i}"))
      _apply(repo, mutant)
      code, seconds, last = _pytest(repo, mutant.tests, env)
      killed = code != 0
      if not killed:
        survivors.append(mutant.name)
      print(f"{'killed  ' if killed else 'SURVIVED'} {seconds:6.0f} s  {mutant.name} ({mutant.file}; "
            f"{' '.join(mutant.tests)}): {last}", flush=True)
      shutil.rmtree(os.path.dirname(repo), ignore_errors=True)
    print(f"{len(mutants) - len(survivors)} of {len(mutants)} mutants killed"
          + (f"; survivors: {survivors}" if survivors else ""))
  return 1 if survivors else 0


if __name__ == "__main__":
  sys.exit(main())
