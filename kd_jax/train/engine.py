"""The train state and the jitted, sharded train and eval steps.

One step serves every method. The trained model is a stack of K peers (K = 1
for offline distillation) vmapped over a leading axis that is laid out on the
mesh axis "replica"; each peer sees a data stream (one shared stream, or one per
peer for co-distillation's stale mode) whose batch axis is sharded over "data".
What a peer learns from is one of:
  - a frozen teacher (offline: KD, FitNets, CRD, ...), run in inference mode;
  - the other peers' predictions (logits and named features) on the same batch,
    exchanged every step (DML; co-distillation's "predictions" mode; AFD's
    feature discriminators): a roll over the peer axis, which XLA lowers to a
    collective across the replica axis;
  - stale copies of the other peers' parameters, refreshed every N steps and
    evaluated on the peer's own batch (co-distillation's "stale" mode).
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
from kd_jax.distill import weight_distillation
from kd_jax.train import backend
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import optim

EXCHANGES = ("none", "predictions", "stale")
TEACHER_INPUTS = ("augmented", "clean")
# Mixed precision: params are kept (and updated) in float32, the models run in the compute dtype.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: checkpoint this and nothing else.

  params: {"student": ..., "terms": {term name: connector params}}; every leaf
    has a leading peer axis [K, ...].
  batch_stats: {"student": ...} BatchNorm running statistics, [K, ...].
  method_state: {term name: state} (memory banks, ...), [K, ...].
  exchange: co-distillation's stale peer copies {"params", "batch_stats"} ({} otherwise).
  rng: raw uint32 [2] key; the step's randomness is fold_in(rng, step).
  nonfinite_step: -1, or the first step whose loss or gradients were not finite.
  nonfinite_values: at that step, [loss, grad norm, each term's mean] (see `value_names`).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any
  exchange: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  nonfinite_values: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static description of one training run's step."""

  student: nn.Module
  objective: Objective
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  normalize: Callable[[jax.Array], jax.Array]
  teacher: nn.Module | None = None
  augment: str = "none"
  # "augmented": the teacher sees the student's augmented inputs; "clean": the un-augmented ones.
  teacher_input: str = "augmented"
  max_norm: float = 0.0
  peers: int = 1
  exchange: str = "none"
  exchange_every: int = 1
  # Read the teacher's logits from a cache over the train set (teacher_variables =
  # {"cache": [N, classes]}) instead of running it: inputs must not be augmented.
  teacher_cache: bool = False
  # Weight distillation, phase 1: the trained params are a generator of the
  # student's weights from the teacher's (a plan from weight_distillation.make_plan).
  generator: tuple[weight_distillation.Group, ...] | None = None
  # Peers that share devices run one after another, peers on their own replica
  # groups in parallel (vmapped); see `map_peers`.
  sequential_peers: bool = True
  # "bfloat16": student, teacher and peers compute in bf16 (accelerators) from float32 master
  # params; BatchNorm statistics, outputs, losses and updates stay float32 (see `apply_model`).
  compute_dtype: str = "float32"
  # The CPU convolution rewrites applied to every model forward (`apply_model`); None: none.
  rewrites: backend.ConvRewrites | None = None

  def __post_init__(self):
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"unknown compute_dtype {self.compute_dtype!r}; known: {sorted(COMPUTE_DTYPES)}")
    if self.exchange not in EXCHANGES:
      raise ValueError(f"unknown exchange mode {self.exchange!r}; known: {EXCHANGES}")
    if self.peers < 1:
      raise ValueError(f"peers must be >= 1, got {self.peers}")
    if self.exchange != "none" and self.peers < 2:
      raise ValueError(f"exchange={self.exchange!r} needs at least 2 peers, got {self.peers}")
    if self.exchange == "none" and self.objective.needs_peers:
      raise ValueError("an online term (e.g. 'dml', 'codistill') needs peers >= 2 and exchange "
                       "'predictions' or 'stale'")
    if self.exchange != "none" and self.teacher is not None:
      raise ValueError("a run learns from a teacher or from its peers, not both")
    if self.exchange_every < 1:
      raise ValueError(f"exchange_every must be >= 1, got {self.exchange_every}")
    if self.generator is not None and (self.teacher is None or self.peers > 1 or self.teacher_cache):
      raise ValueError("a weight generator needs a teacher (its weights are the generator's input), "
                       "a single peer and no teacher cache")
    if self.teacher_input not in TEACHER_INPUTS:
      raise ValueError(f"unknown teacher_input {self.teacher_input!r}; known: {TEACHER_INPUTS}")
    if self.teacher_cache and self.augment != "none" and self.teacher_input != "clean":
      raise ValueError(f"a teacher cache needs un-augmented inputs, but augment={self.augment!r}: the teacher "
                       "must see each step's random augmentation (or set teacher_input='clean')")

  @property
  def streams(self) -> int:
    """Data streams: one per peer in stale mode (each replica its own data), else one shared."""
    return self.peers if self.exchange == "stale" else 1


def value_names(spec: StepSpec) -> tuple[str, ...]:
  """Names of `TrainState.nonfinite_values`."""
  return ("loss", "grad_norm") + tuple(f"loss/{name}" for name in spec.objective.terms)


def _variables(params, batch_stats):
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _cast_floats(tree, dtype):
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
  variables = {**variables, "params": _cast_floats(variables["params"], dtype)}
  out = apply(variables, _cast_floats(x, dtype), **kwargs)
  if kwargs.get("mutable"):
    (outputs, updates) = out
    return _cast_floats(outputs, jnp.float32), updates
  return _cast_floats(out, jnp.float32)


def student_params(spec: StepSpec, params, teacher_variables):
  """The student module's params: `params` itself, or generated from the teacher's by the generator."""
  if spec.generator is None:
    return params
  return weight_distillation.generate(params, teacher_variables["params"], spec.generator)


def unstack(tree, k: int = 0):
  """Peer k's slice of a stacked pytree."""
  return jax.tree.map(lambda x: x[k], tree)


def teacher_outputs(spec: StepSpec, teacher_variables, images, indices=None) -> Outputs | None:
  if spec.teacher_cache:
    if indices is None:  # at init: only the shape matters
      return Outputs(jnp.zeros((images.shape[0], teacher_variables["cache"].shape[-1]), jnp.float32))
    return Outputs(jax.lax.stop_gradient(teacher_variables["cache"][indices]))
  if spec.teacher is None:
    return None
  logits, features = apply_model(spec.teacher, teacher_variables, images, train=False, return_features=True,
                                 compute_dtype=spec.compute_dtype, rewrites=spec.rewrites)
  return jax.lax.stop_gradient(Outputs(logits, features))


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


def _peer_stub(spec: StepSpec, logits, features) -> Outputs | None:
  """What online terms see at init: the other peers' logits [K-1, B, K] (and, exchanging
  predictions, their features [K-1, B, ...])."""
  if spec.exchange == "none":
    return None
  stack = lambda x: jnp.broadcast_to(x, (spec.peers - 1,) + x.shape)
  return Outputs(stack(logits), jax.tree.map(stack, dict(features)) if spec.exchange == "predictions" else {})


def init_state(spec: StepSpec, rng: jax.Array, teacher_variables, example_images: jax.Array) -> TrainState:
  """A fresh state: a pure function of `rng` (call under jit for placement)."""
  images = spec.normalize(example_images)
  teacher = teacher_outputs(spec, teacher_variables, images)

  def init_peer(peer_rng):
    init_rng, term_rng, dropout_rng = jax.random.split(peer_rng, 3)
    variables = spec.student.init({"params": init_rng, "dropout": dropout_rng}, images, train=False)
    logits, features = apply_model(spec.student, variables, images, train=False, return_features=True,
                                   rewrites=spec.rewrites)
    source = teacher if teacher is not None else _peer_stub(spec, logits, features)
    term_params, method_state = spec.objective.init(term_rng, Outputs(logits, features), source)
    return variables["params"], variables.get("batch_stats", {}), term_params, method_state

  student, batch_stats, term_params, method_state = over_peers(spec, init_peer, (0,))(_peer_rngs(rng, spec.peers))
  if spec.generator is not None:
    student = jax.tree.map(lambda x: x[None], weight_distillation.init_generator(spec.generator))
  params = {"student": student, "terms": term_params}
  exchange = {"params": student, "batch_stats": batch_stats} if spec.exchange == "stale" else {}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats={"student": batch_stats},
      opt_state=spec.optimizer.init(params),
      method_state=method_state,
      exchange=exchange,
      rng=rng,
      nonfinite_step=jnp.full((), -1, jnp.int32),
      nonfinite_values=jnp.zeros((len(value_names(spec)),), jnp.float32))


def _others(stacked: jax.Array, peers: int) -> jax.Array:
  """[K, ...] -> [K, K-1, ...]: for each peer, the other peers' values (rolls over the peer axis)."""
  return jnp.stack([jnp.roll(stacked, shift, axis=0) for shift in range(1, peers)], axis=1)


def train_step(spec: StepSpec, state: TrainState, teacher_variables, batch) -> tuple[TrainState, dict]:
  """One optimisation step of all peers.

  batch: {"image": uint8 [S, B, H, W, C], "label": int [S, B], "index": int [S, B]} with S = spec.streams.
  """
  k = spec.peers
  step_rng = jax.random.fold_in(state.rng, state.step)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  images = jax.vmap(lambda r, x: augment_lib.augment(r, model_inputs(x), kind=spec.augment))(
      _peer_rngs(augment_rng, spec.streams), batch["image"])
  images = jax.vmap(spec.normalize)(images)
  teacher_images = images if spec.teacher_input == "augmented" else jax.vmap(spec.normalize)(
      jax.vmap(model_inputs)(batch["image"]))
  # Per-peer inputs: the shared stream broadcast to every peer, or each peer's own stream.
  stream_axis = 0 if spec.streams > 1 else None
  pick = lambda x: x if spec.streams > 1 else x[0]
  teacher = teacher_outputs(spec, teacher_variables, pick(teacher_images), pick(batch["index"]))

  if spec.exchange == "stale":
    def peer_predictions(params, batch_stats, peer_images):
      return apply_model(spec.student, _variables(params, batch_stats), peer_images, train=False,
                         compute_dtype=spec.compute_dtype, rewrites=spec.rewrites)

    # Peer k reads the copy of peer (k - shift) for each shift: its own stale peers, on its own batch.
    stale = [over_peers(spec, peer_predictions, (0, 0, 0))(
        *jax.tree.map(lambda x: jnp.roll(x, shift, axis=0), (state.exchange["params"], state.exchange["batch_stats"])),
        images)
             for shift in range(1, k)]
    stale_logits = jax.lax.stop_gradient(jnp.stack(stale, axis=1))  # [K, K-1, B, classes]

  def peer_forward(params, batch_stats, peer_rng, peer_images):
    (logits, features), updates = apply_model(
        spec.student, _variables(student_params(spec, params, teacher_variables), batch_stats), peer_images,
        train=True, return_features=True, mutable=["batch_stats"], rngs={"dropout": peer_rng},
        compute_dtype=spec.compute_dtype, rewrites=spec.rewrites)
    return logits, features, updates.get("batch_stats", {})

  def loss_fn(params):
    logits, features, batch_stats = over_peers(spec, peer_forward, (0, 0, 0, stream_axis))(
        params["student"], state.batch_stats["student"], _peer_rngs(dropout_rng, k), pick(images))
    if spec.exchange == "predictions":
      # The other peers' logits and features (feature-level online methods, e.g. AFD), as constants;
      # XLA drops the exchange of the features no term reads.
      others = lambda x: jax.lax.stop_gradient(_others(x, k))
      sources, source_axis = Outputs(others(logits), jax.tree.map(others, dict(features))), 0
    elif spec.exchange == "stale":
      sources, source_axis = Outputs(stale_logits), 0
    else:
      sources, source_axis = teacher, None
    def objective(term_params, method_state, logits, features, peer_batch, source, peer_rng):
      # Terms that draw random numbers (CRD's negatives, CS-KD's pairs) use the batch's "rng".
      return spec.objective(term_params, method_state, Outputs(logits, features), source,
                            {**peer_batch, "rng": peer_rng}, step=state.step)

    # The terms' connectors (regressors, paraphrasers) are convolutions too.
    objective = _rewritten(objective, spec.rewrites)
    loss, metrics, method_state = over_peers(spec, objective, (0, 0, 0, 0, stream_axis, source_axis, 0))(
        params["terms"], state.method_state, logits, features, jax.tree.map(pick, batch), sources,
        _peer_rngs(jax.random.fold_in(dropout_rng, 1), k))
    labels = batch["label"] if spec.streams > 1 else jnp.broadcast_to(batch["label"][0], logits.shape[:-1])
    metrics["accuracy"] = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), axis=1)
    # Peers are independent models: the sum's gradient is each peer's own loss gradient.
    return jnp.sum(loss), (jax.tree.map(jnp.mean, metrics), batch_stats, method_state)

  (loss, (metrics, batch_stats, method_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  loss = loss / k
  updates, opt_state = spec.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if spec.max_norm and spec.generator is None:
    params = {**params, "student": optim.max_norm(params["student"], spec.max_norm, stacked=True)}
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
  if spec.exchange == "stale":
    # Every N steps each replica receives its peers' current parameters.
    refresh = (new_state.step % spec.exchange_every) == 0
    current = {"params": new_state.params["student"], "batch_stats": new_state.batch_stats["student"]}
    new_state = new_state.replace(
        exchange=jax.tree.map(lambda n, o: jnp.where(refresh, n, o), current, state.exchange))
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
    peer_axis = top in ("params", "batch_stats", "method_state", "exchange") or (
        top == "opt_state" and leaf.ndim >= 1 and leaf.shape[0] == spec.peers)
    return NamedSharding(mesh, P(peer)) if (peer and peer_axis and leaf.ndim >= 1) else replicated

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def batch_sharding(mesh: Mesh, spec: StepSpec) -> NamedSharding:
  """[S, B, ...]: streams over "replica" (stale mode), the batch over "data"."""
  if spec.streams > 1 and mesh.shape["replica"] > 1:
    return NamedSharding(mesh, P("replica", "data"))
  return NamedSharding(mesh, P(None, "data"))


def make_train_step(spec: StepSpec, mesh: Mesh, state_sharding):
  """`step(state, teacher_variables, batch) -> (state, metrics)`, jitted; the state is donated."""
  replicated = mesh_lib.replicated(mesh)
  return backend.jit(
      lambda state, teacher_variables, batch: train_step(spec, state, teacher_variables, batch),
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
