"""End-to-end: the train loop learns the synthetic data, checkpoints, resumes, and the gate
learns to ignore a noise modality. Sizes are small so each test takes well under a minute."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from recfusion_jax import checkpointing, model_eval, sharding, train
from recfusion_jax.data import sources
from tests.helpers import tiny_config


def _config(steps, **overrides):
  config = tiny_config(**overrides)
  config.num_steps = steps
  config.batch_size = 64
  config.log_every = 25
  config.checkpoint_every = 50
  config.cache_refresh_every = 50
  config.eval_block_size = 128
  config.data.synthetic.num_items = 300
  config.data.synthetic.num_users = 200
  return config


def _history(workdir):
  """The training-metric rows of metrics.jsonl (ReportProgress adds steps_per_sec rows)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row for row in map(json.loads, f) if "rec_loss" in row]


def _tensorboard_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  events = event_accumulator.EventAccumulator(workdir)
  events.Reload()
  return set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])


def test_learns_resumes_and_beats_chance(tmp_path):
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(_config(100), workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "100"))
  # Resume: a longer run continues at step 101 instead of starting over.
  results = train.train_and_evaluate(_config(200), workdir)
  steps = [row["step"] for row in _history(workdir)]
  assert steps == [25, 50, 75, 100, 125, 150, 175, 200]
  assert first["train_history"][-1]["step"] == 100
  # TensorBoard (clu writers) shows the losses, the learning rate, the gate and the speed.
  tags = _tensorboard_tags(workdir)
  for tag in ("rec_loss", "contrastive_loss", "learning_rate", "gate/text", "gate/id",
              "examples_per_sec", "steps_per_sec"):
    assert tag in tags, (tag, tags)

  rows = _history(workdir)
  assert rows[-1]["contrastive_loss"] < rows[0]["contrastive_loss"] - 0.2
  assert rows[-1]["rec_loss"] < rows[0]["rec_loss"]
  assert results["warm"]["HR@10"] > 4 * results["warm_random"]["HR@10"]
  # Items never seen in training, ranked among themselves from content alone.
  assert results["cold_items"]["NDCG@10"] > 1.5 * results["cold_items_random"]["NDCG@10"]


def test_gate_moves_toward_the_informative_modality(tmp_path):
  config = _config(150, **{"model.item_id.use": False})
  config.data.synthetic.noise_modality = "image"
  train.train_and_evaluate(config, str(tmp_path / "noise"))
  rows = _history(str(tmp_path / "noise"))
  first, last = rows[0], rows[-1]
  assert last["gate/image"] < first["gate/image"] - 0.05
  assert last["gate/text"] > last["gate/image"] + 0.1
  assert last["gate/video"] > last["gate/image"] + 0.1


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  config = tiny_config()
  from recfusion_jax.models.recfusion import RecFusion
  model = RecFusion(config.model, num_users=10, num_items=64, rngs=nnx.Rngs(0))
  tx, _ = train.make_optimizer(config, 10)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  del graphdef
  mesh_a = sharding.make_mesh(data=4, fsdp=2)
  mesh_b = sharding.make_mesh(data=2, fsdp=4)
  shard_a = sharding.state_shardings(state, mesh_a, min_elements=64)
  shard_b = sharding.state_shardings(state, mesh_b, min_elements=64)
  saved = jax.device_put(state, shard_a)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=1)
  ckpt.save(7, saved, force=True)
  ckpt.wait()
  out = ckpt.restore(checkpointing.abstract_like(state, shard_b))
  assert out.step == 7
  restored = out.state
  for a, b, s in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), jax.tree.leaves(
      shard_b, is_leaf=lambda x: hasattr(x, "spec"))):
    assert b.sharding.is_equivalent_to(s, b.ndim)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(
      shard_b, is_leaf=lambda x: hasattr(x, "spec")))


def _steps_on_disk(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_checkpointer_keeps_the_best_validated_step(tmp_path):
  state = {"w": jax.numpy.zeros(4)}
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=1,
                                    best_metric="valid/NDCG@10", async_save=False)
  scores = {1: 0.1, 2: 0.5, 3: None, 4: 0.5, 5: 0.2, 6: None}   # None: a plain checkpoint
  for step, score in scores.items():
    metrics = {checkpointing.FINITE_KEY: True}
    if score is not None:
      metrics["valid/NDCG@10"] = score
    ckpt.save(step, state, metrics=metrics, force=True)
  ckpt.wait()
  # The latest (keep=1) and the best; of two equal scores the earlier step (the shorter fit).
  assert ckpt.all_steps() == [2, 6]
  ckpt.close()


def test_validation_stops_early_and_resumes_stopped(tmp_path):
  # A learning rate too small to change any float32 parameter: every validation scores the
  # same, so none improves on the first and training stops after `patience` more.
  config = _config(200, **{"optimizer.learning_rate": 1e-12})
  config.validation.every, config.validation.patience = 10, 2
  config.keep_checkpoints = 1
  workdir = str(tmp_path / "run")
  trained = train.train_model(config, workdir)
  assert [row["step"] for row in trained.valid_history] == [10, 20, 30]
  assert trained.last_step == 30 and trained.best["step"] == 10
  assert trained.best["epoch"] == round(10 * 64 / _examples_per_epoch(trained.dataset), 3)
  assert _steps_on_disk(workdir) == [10, 30]   # the best one outlives keep_checkpoints=1
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [row["step"] for row in map(json.loads, f) if "valid/NDCG@10" in row]
  assert logged == [10, 20, 30]
  # Rerunning the command resumes a run that has already stopped: no further step.
  again = train.train_model(config, workdir)
  assert again.last_step == 30 and again.best == trained.best
  assert len(again.valid_history) == 3 and _steps_on_disk(workdir) == [10, 30]


def test_validation_returns_the_best_state(tmp_path):
  config = _config(80)
  config.validation.every = 20
  trained = train.train_model(config, str(tmp_path / "run"))
  curve = [row["NDCG@10"] for row in trained.valid_history]
  assert len(curve) == 4 and trained.best["NDCG@10"] == max(curve)
  assert trained.best["step"] == trained.valid_history[int(np.argmax(curve))]["step"]
  # The returned model is the best validated state: the loop's validator scores it again at
  # its numbers. The validator takes a (model, optimizer) state; no optimizer is needed here.
  graphdef, state = nnx.split((trained.model, None))
  validate = model_eval.make_validator(trained.dataset, config, graphdef, trained.mesh)
  again = validate(state)
  for key in ("NDCG@10", "HR@10"):
    np.testing.assert_allclose(again[key], trained.best[key], atol=1e-6)


def _examples_per_epoch(dataset):
  from recfusion_jax.data import examples, pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.examples_per_epoch(examples.TrainExampleIndex.build(dataset))


def test_encoder_weight_decay_decays_the_content_encoder_only():
  # Unset, the chain is optax.adamw; set, the encoder's matrices take their own rate and the
  # other matrices keep weight_decay. Zero gradients isolate the decay from Adam's step.
  import optax  # pylint: disable=import-outside-toplevel
  config = _config(10)
  config.optimizer.weight_decay = 0.5
  model = train.create_model(config, sources.load_dataset(config))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(np.zeros_like, params)
  mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx, schedule = train.make_optimizer(config, 10)
  reference = optax.chain(   # make_optimizer as it was before encoder_weight_decay
      optax.clip_by_global_norm(config.optimizer.clip_norm),
      optax.adamw(schedule, b2=config.optimizer.b2, weight_decay=0.5, mask=mask))
  state, ref_state = tx.init(params), reference.init(params)
  for _ in range(3):   # past the warm-up's zero learning rate at step 0
    ours, state = tx.update(grads, state, params)
    theirs, ref_state = reference.update(grads, ref_state, params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  assert any(np.any(u != 0) for u in jax.tree.leaves(ours))

  config.optimizer.encoder_weight_decay = 0.0
  tx, _ = train.make_optimizer(config, 10)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
  moved = {jax.tree_util.keystr(path): bool(np.any(u != 0))
           for path, u in jax.tree_util.tree_leaves_with_path(updates)}
  encoder = {k: v for k, v in moved.items() if k.startswith("['encoder']")}
  others = {k: v for k, v in moved.items() if not k.startswith("['encoder']")}
  assert encoder and not any(encoder.values()), encoder
  assert others["['item_embeddings']['embedding'].value"], others
  assert not others["['log_temperature'].value"]   # a scalar: never decayed


def test_encoder_lr_scale_scales_the_content_encoder_update_only():
  # The same gradients through the chain at scale 1 and at 0.1: the encoder's updates (Adam
  # step and decay) are a tenth, every other parameter's are equal.
  config = _config(10)
  config.optimizer.weight_decay = 0.5
  model = train.create_model(config, sources.load_dataset(config))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: np.full(p.shape, 0.01, np.float32), params)

  def updates(scale):
    config.optimizer.encoder_lr_scale = scale
    tx, _ = train.make_optimizer(config, 10)
    state = tx.init(params)
    for _ in range(3):   # past the warm-up's zero learning rate at step 0
      out, state = tx.update(grads, state, params)
    return {jax.tree_util.keystr(path): np.asarray(u)
            for path, u in jax.tree_util.tree_leaves_with_path(out)}

  plain, slow = updates(1.0), updates(0.1)
  encoder = [k for k in plain if k.startswith("['encoder']")]
  assert encoder and len(encoder) < len(plain)
  for key, value in plain.items():
    want = value * 0.1 if key in encoder else value
    np.testing.assert_allclose(slow[key], want, rtol=1e-5, atol=1e-12, err_msg=key)
  assert all(np.any(plain[k] != 0) for k in encoder)

  # encoder_lr_scale_paths narrows the scale to the named parts (a prefix the encoder lacks,
  # such as a separate-towers path, is allowed beside one it has); naming nothing is an error.
  config.optimizer.encoder_lr_scale_paths = ("encoder/trunk/", "encoder/towers/text/")
  narrow = updates(0.1)
  trunk = [k for k in encoder if k.startswith("['encoder']['trunk']")]
  assert trunk and len(trunk) < len(encoder)
  for key, value in plain.items():
    want = value * 0.1 if key in trunk else value
    np.testing.assert_allclose(narrow[key], want, rtol=1e-5, atol=1e-12, err_msg=key)
  config.optimizer.encoder_lr_scale_paths = ("encoder/tunk/",)
  with pytest.raises(ValueError, match="match no parameter"):
    updates(0.1)
