"""Gradient caching through the encoder and the user tower (``config.micro_batch``) gives the
one-shot update."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recfusion_jax import config_validation, gradcache, sharding, train
from recfusion_jax.models.recfusion import RecFusion
from tests.helpers import assert_states_close, random_batch, tiny_config

NUM_USERS, NUM_ITEMS, BATCH, MICRO = 24, 64, 32, 8


def _setup(config):
  model = RecFusion(config.model, num_users=NUM_USERS, num_items=NUM_ITEMS,
                    rngs=nnx.Rngs(config.seed))
  # Some trained items, so the full-catalogue term has negatives.
  model.cache_has_id[...] = jnp.arange(NUM_ITEMS) % 3 != 0
  tx, schedule = train.make_optimizer(config, num_steps=10)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  return graphdef, state, schedule


def _config(**overrides):
  # warmup 0: the first update already has the peak learning rate (else it changes nothing).
  return tiny_config(**{"optimizer.warmup_steps": 0, "batch_size": BATCH, **overrides})


def test_gradcache_step_equals_one_shot_step_full_catalogue():
  """One device, rec_loss="full" (the in-batch term is the sharded test's)."""
  rec_loss = "full"
  config = _config(rec_loss=rec_loss)
  graphdef, state, schedule = _setup(config)
  assert float(schedule(0)) > 0
  batch = random_batch(config, BATCH, NUM_USERS, NUM_ITEMS, seed=1)
  step = functools.partial(train.train_step, graphdef, contrastive_weight=0.5,
                           schedule=schedule, full_catalogue=rec_loss == "full")
  one_shot, aux1 = jax.jit(step)(state, batch)
  cached, aux2 = jax.jit(functools.partial(step, micro_batch=MICRO))(state, batch)
  for key in ("total_loss", "rec_loss", "contrastive_loss", "grad_norm"):
    np.testing.assert_allclose(aux2[key], aux1[key], rtol=1e-5, err_msg=key)
  # The update moved the encoder and the user model (so their gradients came through the
  # passes 2) ...
  for tower in ("encoder", "user_encoder"):
    before = nnx.state(getattr(nnx.merge(graphdef, state)[0], tower), nnx.Param)
    after = nnx.state(getattr(nnx.merge(graphdef, cached)[0], tower), nnx.Param)
    moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), before, after)
    assert min(jax.tree.leaves(moved)) > 0, tower
  # ... and every parameter, moment, cache row and RNG count equals the one-shot step's.
  assert assert_states_close(cached, one_shot, atol=1e-5, rtol=1e-4).floats > 50


def test_gradcache_on_a_causal_per_user_batch_equals_one_shot():
  """Next-item rows (a causal user model, ``targets`` per history position): the user pass
  caches the per-position users [B, L, d] the catalogue term scores."""
  config = _config(rec_loss="full", **{"model.user.causal": True})
  graphdef, state, schedule = _setup(config)
  batch = random_batch(config, BATCH, NUM_USERS, NUM_ITEMS, seed=4)
  rng = np.random.default_rng(4)
  batch["targets"] = rng.integers(0, NUM_ITEMS, batch["history"].shape).astype(np.int32)
  batch["target_mask"] = batch["history_mask"]
  step = functools.partial(train.train_step, graphdef, contrastive_weight=0.5,
                           schedule=schedule, full_catalogue=True)
  one_shot, aux1 = jax.jit(step)(state, batch)
  cached, aux2 = jax.jit(functools.partial(step, micro_batch=MICRO))(state, batch)
  for key in ("total_loss", "rec_loss", "full_softmax_loss", "grad_norm"):
    np.testing.assert_allclose(aux2[key], aux1[key], rtol=1e-5, err_msg=key)
  assert assert_states_close(cached, one_shot, atol=1e-5, rtol=1e-4).floats > 50


def test_gradcache_on_a_sharded_batch_equals_one_shot():
  """rec_loss="sampled" on 8 devices, one row of each device's share per micro-batch (the
  layout that keeps rows where they are), through ``jit_train_step``'s shardings and
  donation."""
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  config = _config()
  mesh = sharding.make_mesh(data=8)
  results = []
  for micro_batch in (0, MICRO):
    graphdef, state, schedule = _setup(config)
    shardings = sharding.state_shardings(state, mesh, min_elements=64)
    state = jax.device_put(state, shardings)
    step = train.jit_train_step(graphdef, shardings, mesh, contrastive_weight=0.5,
                                schedule=schedule, micro_batch=micro_batch)
    batch = jax.device_put(random_batch(config, BATCH, NUM_USERS, NUM_ITEMS, seed=2),
                           sharding.batch_sharding(mesh))
    results.append(step(state, batch))
  (one_shot, aux1), (cached, aux2) = results
  np.testing.assert_allclose(aux2["total_loss"], aux1["total_loss"], rtol=1e-5)
  assert assert_states_close(cached, one_shot, atol=1e-5, rtol=1e-4).floats > 50


def test_dropout_masks_match_between_the_passes():
  """Encoder and user model dropout > 0: the gradient equals the direct gradient of the
  micro-batched forward pass (each micro-batch's masks drawn once, reused by pass 2); the RNG
  state ends where the forward pass left it. Layout with 4 shards, as on a 4-device batch.
  Text alone: its stem's and the trunk's dropout streams are what is tested (and the compile
  is much shorter)."""
  config = _config(**{"model.encoder.dropout": 0.2, "model.modalities": ("text",),
                      "model.user.dropout": 0.2, "model.user.history_dropout": 0.2})
  graphdef, state, _ = _setup(config)
  batch = random_batch(config, BATCH, NUM_USERS, NUM_ITEMS, seed=3)
  loss_fn = functools.partial(train.compute_losses, contrastive_weight=0.5)
  shards = 4

  @jax.jit
  def cached(state, batch):
    model, _ = nnx.merge(graphdef, state)
    (loss, _), grads = gradcache.loss_and_grads(model, batch, loss_fn, micro_batch=MICRO,
                                                shards=shards)
    return loss, grads, nnx.state(model, nnx.RngState)

  @jax.jit
  def direct(state, batch):
    model, _ = nnx.merge(graphdef, state)

    def micro_batched_loss(model):
      enc_def, params, other = nnx.split(model.encoder, nnx.Param, ...)
      content = {k: batch[k] for k in model.encoder.input_keys()}
      emb, presence, after = gradcache.encode_micro_batches(
          enc_def, params, other, content, BATCH // MICRO, shards)
      nnx.update(model.encoder, after)
      user_def, user_params, rng, rest = nnx.split(model, gradcache._USER_PARAMS,
                                                   nnx.RngState, ...)
      inputs = {k: batch[k] for k in gradcache.USER_KEYS}
      users, rng_after = gradcache.encode_users_micro_batches(
          user_def, user_params, rng, rest, inputs, BATCH // MICRO, shards)
      nnx.update(model, rng_after)
      return loss_fn(model, batch, content=(emb, presence), users=users)

    grad_fn = nnx.value_and_grad(micro_batched_loss, argnums=nnx.DiffState(0, nnx.Param),
                                 has_aux=True)
    (loss, _), grads = grad_fn(model)
    return loss, grads, nnx.state(model, nnx.RngState)

  loss1, grads1, rng1 = cached(state, batch)
  loss2, grads2, rng2 = direct(state, batch)
  np.testing.assert_allclose(loss1, loss2, rtol=1e-6)
  assert_states_close(grads1, grads2, atol=1e-6, rtol=1e-4)
  counts = lambda rng: np.asarray(jax.tree.leaves(nnx.state(rng, nnx.RngCount)))
  np.testing.assert_array_equal(counts(rng1), counts(rng2))
  # The masks were random: every dropout stream of the encoder and of the user model advanced,
  # by the same number of draws in each micro-batch's forward pass.
  for tower in ("encoder", "user_encoder"):
    start = nnx.state(getattr(nnx.merge(graphdef, state)[0], tower), nnx.RngCount)
    end = nnx.state(rng1[tower], nnx.RngCount)
    draws = np.asarray(jax.tree.leaves(end)) - np.asarray(jax.tree.leaves(start))
    assert np.all(draws > 0) and np.all(draws % (BATCH // MICRO) == 0), (tower, draws)


def test_micro_batch_layout_round_trips():
  x = jnp.arange(32 * 3).reshape(32, 3)
  micro = gradcache.split_micro(x, 4, shards=8)
  assert micro.shape == (4, 8, 3)
  # Micro-batch 0 holds the first row of each of the 8 devices' 4-row shares.
  np.testing.assert_array_equal(micro[0, :, 0], np.arange(0, 32, 4) * 3)
  np.testing.assert_array_equal(gradcache.merge_micro(micro, shards=8), x)
  with pytest.raises(ValueError, match="does not divide the batch"):
    gradcache.num_micro_batches(32, 12)
  with pytest.raises(ValueError, match="over the batch's 8 devices"):
    gradcache.num_micro_batches(32, 4, shards=8)


def test_config_validation_of_micro_batch():
  config_validation.validate(_config(micro_batch=MICRO), num_devices=8)
  with pytest.raises(config_validation.ConfigError, match="micro_batch 12 does not divide "
                     "batch_size 32"):
    config_validation.validate(_config(micro_batch=12), num_devices=8)
  with pytest.raises(config_validation.ConfigError, match="does not divide over the 8 devices"):
    config_validation.validate(_config(micro_batch=4), num_devices=8)
  with pytest.raises(config_validation.ConfigError, match="micro_batch must be >= 0"):
    config_validation.validate(_config(micro_batch=-1), num_devices=8)
  with pytest.raises(config_validation.ConfigError, match="needs a content encoder"):
    config_validation.validate(_config(micro_batch=MICRO, **{"model.modalities": ()}),
                               num_devices=8)
