"""The engine's wiring of a method, checked by hand: which params an optimizer step moves and by how much,
the randomness of each step, peer and replay, evaluation with padded batches, and a row that learns.

Rows are written as a user writes them (`train.row`, `train.base_config`) and built through
tests/engine_harness.py, the one place that knows how the train room assembles a step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import data, losses, train
from kd_jax.distill import Outputs
from tests import engine_harness


def _synthetic_images(directory=None):
  """32x32x3 images whose colour depends on the class: 32 train, 40 test (eval batch 16 leaves 8 padded)."""
  del directory
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 72).astype(np.int32)
  images = (rng.integers(0, 60, (72, 32, 32, 3)) + labels[:, None, None, None] * 19).astype(np.uint8)
  return data.Dataset("engine_images", images[:32], labels[:32], images[32:], labels[32:], num_classes=10)


if "engine_images" not in data.names():
  data.register("engine_images", _synthetic_images)

LEARNING_RATE, WEIGHT_DECAY = 0.05, 5e-4
# Params the optimizer must leave exactly as they are: a frozen part of the student (the row's `freeze`) and
# FT's paraphraser in its transfer stage (the term's own frozen params).
FROZEN = (("student", "bn1"), ("terms/ft", "paraphraser"))


def _config(data_name, batch_size, rows):
  config = train.base_config()
  config.data.name = data_name
  config.data.batch_size = batch_size
  config.mesh.data = 1
  config.progress = False
  config.epochs = 1
  for name, row in rows.items():
    config.rows[name] = row
  return config


@pytest.fixture(scope="module")
def connectors(tmp_path_factory):
  """resnet8 <- resnet8x4 with every kind of trainable term params: a FitNets regressor, CRD's two embedding
  heads, AB's connectors, FT's translator (beside its frozen paraphraser), and KD and CE."""
  dataset = _synthetic_images()
  teacher = engine_harness.save_random_model(str(tmp_path_factory.mktemp("teacher")), "resnet8x4", dataset, seed=1)
  row = train.row(model="resnet8", teacher=teacher, terms={
      "ce": {"weight": 1.0}, "kd": {"weight": 0.5, "temperature": 4.0}, "hint": {"weight": 2.0},
      "crd": {"weight": 0.8, "dim": 16, "num_negatives": 24}, "ab": {"weight": 1.0}, "ft": {"weight": 3.0}},
      optimizer={"name": "sgd", "learning_rate": LEARNING_RATE, "momentum": 0.9, "weight_decay": WEIGHT_DECAY,
                 "freeze": ["student/bn1"]})
  return engine_harness.build(_config("engine_images", 8, {"student": row}), "student", dataset)


def _peer(tree, k=0):
  return jax.tree.map(lambda x: jnp.asarray(x)[k], tree)


def _path_names(path):
  return tuple(str(getattr(k, "key", k)) for k in path)


def _is_frozen(group, path):
  return any(group == g and _path_names(path)[:1] == (top,) for g, top in FROZEN)


def _hand_loss(h, groups, batch_stats, term_state, teacher_variables, batch):
  """The row's objective for one peer, assembled from its parts: the student in training mode, the teacher in
  inference mode, the terms with their params and state. batch["rng"]: the key the objective draws from."""
  x = h.normalize(batch["image"])
  (logits, features), updates = h.student.apply({"params": groups["student"], "batch_stats": batch_stats}, x,
                                                train=True, return_features=True, mutable=["batch_stats"])
  t_logits, t_features = h.teacher.apply(teacher_variables, x, train=False, return_features=True)
  term_params = {name.removeprefix("terms/"): tree for name, tree in groups.items() if name != "student"}
  loss, _, new_term_state = h.objective(term_params, term_state, Outputs(logits, features),
                                        Outputs(t_logits, t_features), batch, step=jnp.zeros((), jnp.int32))
  return loss, (updates["batch_stats"], new_term_state)


def test_one_step_moves_every_param_group_by_the_hand_computed_sgd_update(connectors):
  h = connectors
  state = h.init_state()
  batch = h.batch(0)
  before = {name: _peer(tree) for name, tree in h.param_groups(state).items()}
  assert set(before) == {"student", "terms/hint", "terms/crd", "terms/ab", "terms/ft"}
  # Everything is an argument, not a closed-over constant: XLA would spend its time folding the teacher.
  loss_and_grads = jax.jit(jax.value_and_grad(lambda *args: _hand_loss(h, *args), has_aux=True))
  (loss, (batch_stats, term_state)), grads = loss_and_grads(before, _peer(h.student_variables(state)["batch_stats"]), _peer(h.term_state(state)),
                               h.teacher_variables, {**batch, "rng": h.objective_rngs(state)[0]})
  new_state, metrics = h.step(state, batch)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  after = {name: _peer(tree) for name, tree in h.param_groups(new_state).items()}
  moved = {}
  for group in before:
    flat_before = jax.tree_util.tree_flatten_with_path(before[group])[0]
    flat_grad = jax.tree.leaves(grads[group])
    flat_after = jax.tree.leaves(after[group])
    for (path, old), grad, new in zip(flat_before, flat_grad, flat_after):
      where = f"{group}/{'/'.join(_path_names(path))}"
      old, grad, new = np.asarray(old), np.asarray(grad), np.asarray(new)
      if _is_frozen(group, path):
        np.testing.assert_array_equal(new, old, err_msg=f"{where} is frozen but moved")
        continue
      # SGD with coupled weight decay, first step (momentum trace starts at 0): p - lr · (g + wd · p).
      expected = -LEARNING_RATE * (grad + WEIGHT_DECAY * old)
      np.testing.assert_allclose(new - old, expected, rtol=2e-3, atol=1e-7, err_msg=where)
      moved[group] = moved.get(group, 0.0) + float(np.sum(np.abs(new - old)))
  for group in before:
    assert moved.get(group, 0.0) > 0, f"{group}: no trained param moved"
  for group, top in FROZEN:
    assert top in {_path_names(p)[0] for p, _ in jax.tree_util.tree_flatten_with_path(before[group])[0]}
  # The student's BatchNorm statistics and the terms' state (CRD's memory bank, the connectors' statistics)
  # move on as the step's forward pass says.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, _peer(h.student_variables(new_state)["batch_stats"]), batch_stats)
  assert set(term_state) == {"hint", "crd", "ab", "ft"}
  jax.tree.map(close, _peer(h.term_state(new_state)), term_state)


def test_eval_of_an_image_model_counts_padded_batches_once(connectors):
  h = connectors
  state, _ = h.step(h.init_state(), h.batch(0))
  result = h.evaluate(state, batch_size=16)  # 40 test images: 16 + 16 + 8 and 8 padding
  variables = _peer(h.student_variables(state))
  logits = np.asarray(h.student.apply(variables, h.normalize(h.dataset.test_images), train=False))
  labels = h.dataset.test_labels
  correct = int(np.sum(np.argmax(logits, -1) == labels))
  assert result["test_errors"] == len(labels) - correct
  assert result["test_accuracy"] == correct / len(labels)
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  np.testing.assert_allclose(result["test_loss"], -np.mean(log_probs[np.arange(len(labels)), labels]), rtol=1e-5)


def test_a_row_overfits_one_fixed_batch(connectors):
  """The loss of every term together falls on a batch seen again and again (not only stays finite)."""
  h = connectors
  state, batch = h.init_state(), h.batch(0)
  history = []
  for _ in range(12):
    state, metrics = h.step(state, batch)
    history.append(metrics)
  assert history[-1]["loss"] < 0.6 * history[0]["loss"], [m["loss"] for m in history]
  assert history[-1]["loss/ce"] < 0.75 * history[0]["loss/ce"]
  assert history[-1]["loss/hint"] < 0.75 * history[0]["loss/hint"]
  assert history[-1]["accuracy"] > history[0]["accuracy"]


def _digits_row(*, dropout, augment, peers=1):
  """A small MLP on digits; learning rate 0, so a step changes nothing but the step counter and what
  the step draws at random shows in the loss of the same batch."""
  terms = {"ce": {"weight": 1.0}, **({"dml": {"weight": 1.0}} if peers > 1 else {})}
  return train.row(model="mlp", model_kwargs={"widths": [32], "dropout": dropout, "input_dropout": dropout},
                   terms=terms, data={"augment": augment},
                   peers={"count": peers, "exchange": "predictions" if peers > 1 else "none"},
                   optimizer={"name": "sgd", "learning_rate": 0.0, "momentum": 0.0})


@pytest.fixture(scope="module")
def digits():
  return data.load("digits")


@pytest.fixture(scope="module")
def dropout_peers(digits):
  """Two MLP peers with dropout and jittered inputs, exchanging predictions (DML)."""
  rows = {"dml": _digits_row(dropout=0.5, augment="jitter", peers=2)}
  return engine_harness.build(_config("digits", 16, rows), "dml", digits)


@pytest.mark.parametrize("dropout, augment", [(0.5, "none"), (0.0, "jitter")], ids=["dropout", "augmentation"])
def test_consecutive_steps_draw_fresh_randomness(digits, dropout, augment):
  h = engine_harness.build(_config("digits", 16, {"row": _digits_row(dropout=dropout, augment=augment)}), "row",
                           digits)
  state, batch = h.init_state(), h.batch(0)
  losses_by_step = []
  for _ in range(3):
    state, metrics = h.step(state, batch)  # same params (lr 0), same batch: only the step's keys differ
    losses_by_step.append(metrics["loss"])
  assert len(set(losses_by_step)) == 3, losses_by_step


def test_peers_draw_different_dropout_masks(dropout_peers):
  """With both peers given the same params and the same batch, their predictions differ only by dropout:
  DML's KL between them is zero if they share the masks."""
  h = dropout_peers
  state = h.init_state()
  student = h.param_groups(state)["student"]
  same = jax.tree.map(lambda x: np.broadcast_to(x[:1], x.shape), student)
  _, metrics = h.step(h.with_param_groups(state, {"student": same}), h.batch(0))
  assert metrics["loss/dml"] > 1e-3, metrics


def test_a_step_replayed_from_a_checkpoint_draws_the_same_randomness(dropout_peers, tmp_path):
  h = dropout_peers
  state, _ = h.step(h.init_state(), h.batch(0))
  h.save(state, str(tmp_path / "checkpoints"))
  continued, metrics = h.step(state, h.batch(1))
  replayed, replayed_metrics = h.step(h.restore(str(tmp_path / "checkpoints")), h.batch(1))
  assert replayed_metrics == metrics
  assert h.step_index(replayed) == h.step_index(continued) == 2


def test_eval_of_peers_counts_padded_batches_once(dropout_peers, digits):
  h = dropout_peers
  state = h.init_state()
  result = h.evaluate(state, batch_size=64)  # 360 test digits: 5 full batches and 40 of 64
  variables = h.student_variables(state)
  labels = digits.test_labels
  x = h.normalize(digits.test_images)
  logits = np.stack([np.asarray(h.student.apply(_peer(variables, k), x, train=False)) for k in range(h.peers)])
  peer_correct = [int(np.sum(np.argmax(z, -1) == labels)) for z in logits]
  assert result["peer_test_accuracy"] == [c / len(labels) for c in peer_correct]
  assert result["test_accuracy"] == pytest.approx(np.mean(peer_correct) / len(labels), abs=1e-12)
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities /= probabilities.sum(-1, keepdims=True)
  ensemble_correct = int(np.sum(np.argmax(probabilities.mean(0), -1) == labels))
  assert result["ensemble_test_accuracy"] == ensemble_correct / len(labels)
  ce = np.mean([np.asarray(losses.cross_entropy(jnp.asarray(z), jnp.asarray(labels))) for z in logits])
  np.testing.assert_allclose(result["test_loss"], ce, rtol=1e-5)


def test_stale_peers_each_read_their_own_data_order(digits):
  """Co-distillation's stale mode (Anil et al. 2018): each replica trains on its own stream of the data; within
  an epoch each stream visits an example at most once."""
  row = train.row(model="mlp", model_kwargs={"widths": [8]}, terms={"ce": {}, "codistill": {}},
                  peers={"count": 2, "exchange": "stale", "every_steps": 2})
  h = engine_harness.build(_config("digits", 16, {"stale": row}), "stale", digits)
  per_epoch = digits.num_train // 16
  epoch = np.stack([h.batch(step)["index"] for step in range(per_epoch)], axis=1)  # [S, steps, B]
  assert epoch.shape == (2, per_epoch, 16)
  for stream in epoch:
    assert len(np.unique(stream)) == stream.size
  assert not np.array_equal(epoch[0], epoch[1])
  np.testing.assert_array_equal(h.batch(3)["image"][1], digits.train_images[h.batch(3)["index"][1]])
