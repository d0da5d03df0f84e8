"""The train state and the jitted, sharded train and eval steps.

One step serves every method. The trained model is a stack of K peers (K = 1
for offline distillation) vmapped over a leading axis that is laid out on the
mesh axis "replica"; each peer sees a data stream (one shared stream, or one per
peer) whose batch axis is sharded over "data". What the peers learn from besides
their labels is the step's *source* (kd_jax/train/sources.py: a frozen teacher,
a cache of its logits, the other peers' predictions, stale peer copies), what
they are trained on is the *objective* (kd_jax/distill), and the trained params
map to the model's through an optional *param map* (weight distillation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kd_jax import losses
from kd_jax.data import augment as augment_lib
from kd_jax.distill import Objective, Outputs
from kd_jax.train import backend
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import sources as sources_lib

# Mixed precision: params are kept (and updated) in float32, the models run in the compute dtype.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: checkpoint this and nothing else.

  params: {"student": ..., "terms": {term name: connector params}}; every leaf
    has a leading peer axis [K, ...].
  batch_stats: {"student": ...} BatchNorm running statistics, [K, ...].
  method_state: {term name: state} (memory banks, ...), [K, ...].
  source: the source's state (stale peer copies; {} for most sources).
  rng: raw uint32 [2] key; the step's randomness is fold_in(rng, step).
  nonfinite_step: -1, or the first step whose loss or gradients were not finite.
  nonfinite_values: at that step, [loss, grad norm, each term's mean] (see `value_names`).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any
  source: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  nonfinite_values: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static description of one training run's step (built by `kd_jax.train.plan`; checked there).

  source: what the peers learn from besides labels (None: labels only), loaded (`Source.load`).
  param_map: `param_map(params, constants) -> model params` with `param_map.init(model params)` giving
    the trained params (e.g. a hypernetwork's); None: the model's params are trained.
  sequential_peers: peers that share devices run one after another, peers on their own replica groups
    in parallel (vmapped); see `map_peers`.
  compute_dtype: "bfloat16": models compute in bf16 from float32 master params; BatchNorm statistics,
    outputs, losses and updates stay float32 (see `apply_model`).
  rewrites: the CPU convolution rewrites applied to every model forward and to the terms (`backend`).
  """

  student: nn.Module
  objective: Objective
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  normalize: Callable[[jax.Array], jax.Array]
  source: sources_lib.Source | None = None
  param_map: Any = None
  augment: str = "none"
  peers: int = 1
  sequential_peers: bool = True
  compute_dtype: str = "float32"
  rewrites: backend.ConvRewrites | None = None

  @property
  def streams(self) -> int:
    """Data streams: one shared by all peers, or one per peer (the source says)."""
    return self.source.streams(self.peers) if self.source is not None else 1


def value_names(spec: StepSpec) -> tuple[str, ...]:
  """Names of `TrainState.nonfinite_values`."""
  return ("loss", "grad_norm") + tuple(f"loss/{name}" for name in spec.objective.terms)


def _variables(params, batch_stats):
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def cast_floats(tree, dtype):
  """The floating leaves of `tree` in `dtype` (others unchanged)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _rewritten(fn: Callable, rewrites: backend.ConvRewrites | None) -> Callable:
  """`fn` with its convolutions rewritten (`backend.rewrite`) when `rewrites` enables any, else `fn`."""
  return backend.rewrite(fn, rewrites) if rewrites is not None and rewrites.enabled else fn


def apply_model(model: nn.Module, variables, x, *, compute_dtype: str = "float32",
                rewrites: backend.ConvRewrites | None = None, **kwargs):
  """`model.apply(variables, x, **kwargs)` with params and float inputs in `compute_dtype`, its
  convolutions rewritten as `rewrites` says (`backend.rewrite`).

  The modules infer their dtype from inputs and params, so casting both runs every
  Dense/Conv in the compute dtype. BatchNorm statistics stay float32 (flax computes
  them in at least float32, and the running averages are not cast); the outputs
  (logits, features) are returned in float32, so losses and metrics are float32.
  Gradients reach the float32 params through the cast.
  """
  dtype = COMPUTE_DTYPES[compute_dtype]
  apply = _rewritten(model.apply, rewrites)
  if dtype == jnp.float32:
    return apply(variables, x, **kwargs)
  variables = {**variables, "params": cast_floats(variables["params"], dtype)}
  out = apply(variables, cast_floats(x, dtype), **kwargs)
  if kwargs.get("mutable"):
    (outputs, updates) = out
    return cast_floats(outputs, jnp.float32), updates
  return cast_floats(out, jnp.float32)


def model_params(spec: StepSpec, params, constants):
  """The model's params: the trained `params` themselves, or mapped by the param map."""
  return params if spec.param_map is None else spec.param_map(params, constants)


def unstack(tree, k: int = 0):
  """Peer k's slice of a stacked pytree."""
  return jax.tree.map(lambda x: x[k], tree)


def map_peers(fn: Callable, args, in_axes, *, peers: int, sequential: bool):
  """`fn` mapped over the peer axis of `args` (axis 0 in `in_axes`; None: shared by all peers).

  Results are stacked [K, ...]. Peers that share devices (`sequential`) run one
  after another, as K unrolled copies of `fn` in the one jitted step: vmapping
  over their weights turns convolutions into grouped ones, and a loop (lax.map,
  i.e. an XLA while loop) made XLA:CPU's 2-peer ResNet step ~25x slower than two
  single steps (BENCHMARKS.md); unrolled, each peer is the ordinary single-model
  graph. Peers on their own replica groups are vmapped, in parallel.
  """
  if peers > 1 and not sequential:
    return jax.vmap(fn, in_axes=in_axes)(*args)

  def peer(k):
    return fn(*[jax.tree.map(lambda x: x[k], arg) if axis == 0 else arg for arg, axis in zip(args, in_axes)])

  return jax.tree.map(lambda *xs: jnp.stack(xs), *[peer(k) for k in range(peers)])


def over_peers(spec: StepSpec, fn: Callable, in_axes):
  """`map_peers` with the peer count and execution of `spec`, as a function of the args."""
  return lambda *args: map_peers(fn, args, in_axes, peers=spec.peers, sequential=spec.sequential_peers)


def model_inputs(x: jax.Array) -> jax.Array:
  """uint8 pixels as float32, to augment and normalise; other inputs (int32 token ids) unchanged."""
  return x.astype(jnp.float32) if x.dtype == jnp.uint8 else x


def _peer_rngs(rng, peers):
  return jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(peers))


def _source_axis(spec: StepSpec):
  return 0 if spec.source is not None and spec.source.per_peer else None


def _inference(spec: StepSpec, model: nn.Module, variables, images):
  """(logits, features) of `model` in inference mode, in the compute dtype: a teacher's forward."""
  return apply_model(model, variables, images, train=False, return_features=True, compute_dtype=spec.compute_dtype,
                     rewrites=spec.rewrites)


def init_state(spec: StepSpec, rng: jax.Array, constants, example_images: jax.Array) -> TrainState:
  """A fresh state: a pure function of `rng` (call under jit for placement). `constants`: the source's."""
  images = spec.normalize(example_images)

  def init_peer(peer_rng):
    init_rng, term_rng, dropout_rng = jax.random.split(peer_rng, 3)
    variables = spec.student.init({"params": init_rng, "dropout": dropout_rng}, images, train=False)
    logits, features = apply_model(spec.student, variables, images, train=False, return_features=True,
                                   rewrites=spec.rewrites)
    source = None if spec.source is None else spec.source.init_outputs(
        constants, images, logits, features, lambda m, v, x: _inference(spec, m, v, x))
    term_params, method_state = spec.objective.init(term_rng, Outputs(logits, features), source)
    return variables["params"], variables.get("batch_stats", {}), term_params, method_state

  student, batch_stats, term_params, method_state = over_peers(spec, init_peer, (0,))(_peer_rngs(rng, spec.peers))
  source_state = spec.source.init_state(student, batch_stats) if spec.source is not None else {}
  if spec.param_map is not None:
    student = spec.param_map.init(student)
  params = {"student": student, "terms": term_params}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats={"student": batch_stats},
      opt_state=spec.optimizer.init(params),
      method_state=method_state,
      source=source_state,
      rng=rng,
      nonfinite_step=jnp.full((), -1, jnp.int32),
      nonfinite_values=jnp.zeros((len(value_names(spec)),), jnp.float32))


def _step_inputs(spec: StepSpec, state: TrainState, batch):
  """(source inputs, dropout key) of a step: the augmented and the clean images, normalised, [S, B, ...]."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  images = jax.vmap(lambda r, x: augment_lib.augment(r, model_inputs(x), kind=spec.augment))(
      _peer_rngs(augment_rng, spec.streams), batch["image"])
  images = jax.vmap(spec.normalize)(images)
  clean = jax.vmap(spec.normalize)(jax.vmap(model_inputs)(batch["image"]))

  def apply_student(params, batch_stats, peer_images):
    return apply_model(spec.student, _variables(params, batch_stats), peer_images, train=False,
                       compute_dtype=spec.compute_dtype, rewrites=spec.rewrites)

  inputs = sources_lib.Inputs(images=images, clean_images=clean, batch=batch,
                              forward=lambda m, v, x: _inference(spec, m, v, x), apply_student=apply_student,
                              map_peers=lambda fn, args, in_axes: over_peers(spec, fn, in_axes)(*args))
  return inputs, dropout_rng


def _loss_fn(spec: StepSpec, state: TrainState, constants, inputs, dropout_rng, targets):
  """`loss(params) -> (sum of the peers' losses, (metrics, batch_stats, method_state))`."""
  k, streams = spec.peers, spec.streams
  stream_axis = 0 if streams > 1 else None
  pick = lambda x: x if streams > 1 else x[0]
  batch = inputs.batch

  def peer_forward(params, batch_stats, peer_rng, peer_images):
    (logits, features), updates = apply_model(
        spec.student, _variables(model_params(spec, params, constants), batch_stats), peer_images,
        train=True, return_features=True, mutable=["batch_stats"], rngs={"dropout": peer_rng},
        compute_dtype=spec.compute_dtype, rewrites=spec.rewrites)
    return logits, features, updates.get("batch_stats", {})

  def objective(term_params, method_state, logits, features, peer_batch, source, peer_rng):
    # Terms that draw random numbers (CRD's negatives, CS-KD's pairs) use the batch's "rng".
    return spec.objective(term_params, method_state, Outputs(logits, features), source,
                          {**peer_batch, "rng": peer_rng}, step=state.step)

  objective = _rewritten(objective, spec.rewrites)  # the terms' connectors (regressors, ...) are convolutions too

  def loss_fn(params):
    logits, features, batch_stats = over_peers(spec, peer_forward, (0, 0, 0, stream_axis))(
        params["student"], state.batch_stats["student"], _peer_rngs(dropout_rng, k), pick(inputs.images))
    source = spec.source.from_students(logits, features) if spec.source is not None and spec.source.online \
        else targets
    loss, metrics, method_state = over_peers(spec, objective, (0, 0, 0, 0, stream_axis, _source_axis(spec), 0))(
        params["terms"], state.method_state, logits, features, jax.tree.map(pick, batch), source,
        _peer_rngs(jax.random.fold_in(dropout_rng, 1), k))
    labels = batch["label"] if streams > 1 else jnp.broadcast_to(batch["label"][0], logits.shape[:-1])
    metrics["accuracy"] = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), axis=1)
    # Peers are independent models: the sum's gradient is each peer's own loss gradient.
    return jnp.sum(loss), (jax.tree.map(jnp.mean, metrics), batch_stats, method_state)

  return loss_fn


def train_step(spec: StepSpec, state: TrainState, constants, batch) -> tuple[TrainState, dict]:
  """One optimisation step of all peers.

  batch: {"image": uint8 [S, B, H, W, C], "label": int [S, B], "index": int [S, B]} with S = spec.streams.
  constants: the source's (a teacher's variables, a cache of its logits).
  """
  inputs, dropout_rng = _step_inputs(spec, state, batch)
  targets = spec.source.outputs(constants, state.source, inputs) if spec.source is not None else None
  loss_fn = _loss_fn(spec, state, constants, inputs, dropout_rng, targets)
  (loss, (metrics, batch_stats, method_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  loss = loss / spec.peers
  updates, opt_state = spec.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  first_bad = (state.nonfinite_step < 0) & ~finite
  values = jnp.stack([loss, grad_norm] + [metrics[n] for n in value_names(spec)[2:]]).astype(jnp.float32)
  # A non-finite step leaves the state as it was (but for the step counter and the record of it);
  # the host then stops the run or, with config.skip_nonfinite, goes on.
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_old(params, state.params),
      batch_stats=keep_old({"student": batch_stats}, state.batch_stats),
      opt_state=keep_old(opt_state, state.opt_state),
      method_state=keep_old(method_state, state.method_state),
      nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
      nonfinite_values=jnp.where(first_bad, values, state.nonfinite_values))
  if spec.source is not None:
    new_state = new_state.replace(source=spec.source.update_state(
        state.source, new_state.params["student"], new_state.batch_stats["student"], new_state.step))
  metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=spec.schedule(state.step),
                 finite=finite.astype(jnp.float32))
  return new_state, metrics


def state_shardings(mesh: Mesh, abstract_state: TrainState, spec: StepSpec):
  """Peer-stacked leaves split over "replica" (when the peer count allows), the rest replicated;
  the per-example rows of memory banks (terms with `shard_state_rows`) split over "data"."""
  replicas, data = mesh.shape["replica"], mesh.shape["data"]
  peer = "replica" if replicas > 1 and spec.peers % replicas == 0 else None
  replicated = mesh_lib.replicated(mesh)
  row_terms = {name for name, term in spec.objective.terms.items() if term.shard_state_rows}

  def leaf_sharding(path, leaf):
    top = getattr(path[0], "name", None)
    if top == "method_state" and getattr(path[1], "key", None) in row_terms and leaf.ndim >= 3 \
        and leaf.shape[1] % data == 0:
      return NamedSharding(mesh, P(peer, "data"))
    peer_axis = top in ("params", "batch_stats", "method_state", "source") or (
        top == "opt_state" and leaf.ndim >= 1 and leaf.shape[0] == spec.peers)
    return NamedSharding(mesh, P(peer)) if (peer and peer_axis and leaf.ndim >= 1) else replicated

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def batch_sharding(mesh: Mesh, spec: StepSpec) -> NamedSharding:
  """[S, B, ...]: streams over "replica" (one stream per peer), the batch over "data"."""
  if spec.streams > 1 and mesh.shape["replica"] > 1:
    return NamedSharding(mesh, P("replica", "data"))
  return NamedSharding(mesh, P(None, "data"))


def make_train_step(spec: StepSpec, mesh: Mesh, state_sharding):
  """`step(state, constants, batch) -> (state, metrics)`, jitted; the state is donated."""
  replicated = mesh_lib.replicated(mesh)
  return backend.jit(
      lambda state, constants, batch: train_step(spec, state, constants, batch),
      in_shardings=(state_sharding, replicated, batch_sharding(mesh, spec)),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,))


def eval_heads(model: nn.Module) -> tuple[str, ...]:
  """The features of `model` that hold other predictions [B, classes] (early exits, SLA's aggregate), which
  the evaluation scores besides its logits: the model's `eval_heads` attribute, () for most models."""
  return tuple(getattr(model, "eval_heads", ()))


def make_eval_step(model: nn.Module, normalize, mesh: Mesh, *, sequential: bool = True,
                   compute_dtype: str = "float32", heads: tuple[str, ...] | None = None,
                   rewrites: backend.ConvRewrites | None = None):
  """`eval(stacked variables, batch) -> sums`: per-peer "correct" [K] and "loss" [K], the
  peers' ensemble (mean of probabilities) "ensemble_correct", and "count". With per-position
  labels [B, T] (sequences) every position counts as one prediction (per-token sums).
  `heads`: features of the model that are predictions too [B, classes] (early exits, a group's
  members; by default the model's `eval_heads`), each counted in "head_correct" {name: [K]}."""
  heads = eval_heads(model) if heads is None else tuple(heads)

  def forward(v, images):
    if not heads:
      return apply_model(model, v, images, train=False, compute_dtype=compute_dtype, rewrites=rewrites), {}
    logits, features = apply_model(model, v, images, train=False, return_features=True,
                                   compute_dtype=compute_dtype, rewrites=rewrites)
    missing = [name for name in heads if name not in features]
    if missing:
      raise KeyError(f"eval heads {missing} are not features of the model; available features: {sorted(features)}")
    return logits, {name: features[name] for name in heads}

  def eval_step(variables, batch):
    images = normalize(model_inputs(batch["image"]))
    # [K, B, classes]; as in training, peers sharing devices run one after another.
    peers = jax.tree.leaves(variables)[0].shape[0]
    logits, head_logits = map_peers(lambda v: forward(v, images), (variables,), (0,), peers=peers,
                                    sequential=sequential)
    mask = batch["mask"].astype(jnp.float32)
    mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (batch["label"].ndim - 1)), batch["label"].shape)
    hits = lambda l: (jnp.argmax(l, -1) == batch["label"]).astype(jnp.float32)
    masked_sum = jax.vmap(lambda per_example: jnp.sum(per_example * mask))  # over peers
    ce = jax.vmap(lambda l: losses.cross_entropy(l, batch["label"]))(logits)
    ensemble = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), -1), axis=0)
    sums = {"correct": masked_sum(jax.vmap(hits)(logits)), "loss": masked_sum(ce),
            "ensemble_correct": jnp.sum(hits(ensemble) * mask), "count": jnp.sum(mask)}
    if heads:
      sums["head_correct"] = {name: masked_sum(jax.vmap(hits)(z)) for name, z in head_logits.items()}
    return sums

  # Variables keep the sharding they were trained with (peers split over "replica").
  return backend.jit(eval_step, in_shardings=(None, mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def make_teacher_logits(teacher: nn.Module, normalize, mesh: Mesh, *, rewrites: backend.ConvRewrites | None = None):
  """`logits(teacher_variables, batch) -> [B, classes]` in inference mode, for the teacher cache."""
  return backend.jit(lambda variables, batch: apply_model(
      teacher, variables, normalize(model_inputs(batch["image"])), train=False, rewrites=rewrites).astype(jnp.float32),
                 in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))
