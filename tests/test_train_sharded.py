"""The sharded train step equals the single-device one (8 devices: 4 data x 2 fsdp)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from recfusion_jax import sharding, train
from recfusion_jax.models.recfusion import RecFusion
from tests.helpers import random_batch, tiny_config

NUM_USERS, NUM_ITEMS, BATCH = 24, 64, 16


def _setup(config):
  model = RecFusion(config.model, num_users=NUM_USERS, num_items=NUM_ITEMS,
                    rngs=nnx.Rngs(config.seed))
  tx, schedule = train.make_optimizer(config, num_steps=10)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  return graphdef, state, schedule


def _run(config, mesh, steps=2, full_catalogue=False):
  graphdef, state, schedule = _setup(config)
  shardings = sharding.state_shardings(state, mesh, min_elements=64)
  state = jax.device_put(state, shardings)
  step = train.jit_train_step(graphdef, shardings, mesh, contrastive_weight=0.5,
                              schedule=schedule, full_catalogue=full_catalogue)
  losses = []
  for i in range(steps):
    batch = jax.device_put(random_batch(config, BATCH, NUM_USERS, NUM_ITEMS, seed=i),
                           sharding.batch_sharding(mesh))
    state, metrics = step(state, batch)
    losses.append(float(metrics["total_loss"]))
  return state, losses, shardings


@pytest.mark.parametrize("fsdp,full_catalogue", [(2, False), (2, True)])
def test_sharded_step_matches_single_device(fsdp, full_catalogue):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  config = tiny_config(**{"optimizer.warmup_steps": 1})
  mesh8 = sharding.make_mesh(data=8 // fsdp, fsdp=fsdp)
  mesh1 = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
  state8, losses8, shardings8 = _run(config, mesh8, full_catalogue=full_catalogue)
  state1, losses1, _ = _run(config, mesh1, full_catalogue=full_catalogue)

  # The rules really split something over fsdp (else this test would not test FSDP).
  specs = jax.tree.leaves(shardings8, is_leaf=lambda s: isinstance(s, NamedSharding))
  assert sum("fsdp" in str(s.spec) for s in specs) >= 5

  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  # The full-catalogue softmax sums over every item in a sharded reduction, so its float
  # rounding differs from one device's more than the in-batch loss does; Adam then divides
  # the tiny gradients of rarely-scored ID rows by their own size, which magnifies it.
  tolerance = 3e-5 if full_catalogue else 1e-5
  flat8 = jax.tree_util.tree_flatten_with_path(jax.device_get(state8))[0]
  flat1 = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(state1))[0])
  compared = 0
  for path, a in flat8:
    b = flat1[path]
    if jax.dtypes.issubdtype(getattr(a, "dtype", np.float32), jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f":
      scale = max(np.max(np.abs(b)), 1e-6)
      assert np.max(np.abs(a - b)) <= tolerance * scale, sharding.path_name(path)
      compared += 1
    else:
      np.testing.assert_array_equal(a, b, err_msg=sharding.path_name(path))
  assert compared > 50
