"""Tiled losses against the naive ones of losses.py: values and gradients, 1 device and a ring.

The naive losses are themselves tested against float64 NumPy in test_losses.py; here every
tiled loss must equal its naive counterpart within 1e-5 (relative) in value and in the
gradients with respect to both embedding sides, every float table entry, log_q and the
inverse temperature, for batch sizes that the tile does not divide (padding), masks with
padding rows, accidental hits and same-user pairs, several temperatures and tile shapes, on one
device and as a ring over the 8 simulated devices. A last test compiles the tiled loss at a
batch where a [B, B] buffer would dominate and checks that none exists.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recfusion_jax import losses, sharding, tiled_losses, train
from recfusion_jax.models.fusion import fused_scores
from recfusion_jax.models.recfusion import RecFusion
from tests.helpers import random_batch, tiny_config

_RTOL = 1e-5


def _assert_tree_close(got, want, name):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    # Relative to the array's scale, so entries that are ~0 by cancellation do not demand 1e-5
    # of themselves.
    np.testing.assert_allclose(g, w, rtol=_RTOL, atol=_RTOL * max(np.abs(w).max(), 1e-3),
                               err_msg=f"{name}{jax.tree_util.keystr(path)}")


@functools.lru_cache(maxsize=None)
def _mesh():
  return sharding.make_mesh(data=4, fsdp=2)  # both batch axes: the ring spans (data, fsdp)


def _batch(seed, b, d, num_items, num_users=None, pad=3):
  """Unit vectors, few distinct items (accidental hits), padding rows that reuse real ids."""
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  a, b_ = unit(rng.normal(size=(b, d))), unit(rng.normal(size=(b, d)))
  item_ids = rng.integers(0, num_items, b).astype(np.int32)
  item_ids[1] = item_ids[0]
  valid = np.ones(b, bool)
  valid[rng.choice(b, pad, replace=False)] = False
  log_q = np.log(rng.dirichlet(np.ones(num_items))[item_ids] + 1e-4).astype(np.float32)
  user_ids = None
  if num_users is not None:
    user_ids = rng.integers(0, num_users, b).astype(np.int32)
    user_ids[3] = user_ids[2]
  return a, b_, item_ids, valid, log_q, user_ids


# (batch, dim, tile, ring, inverse temperature): B = 40 is divisible by neither 7 nor (16, 6),
# and on the ring its 5 rows per device are padded to 7 / 16 x 6; tile 64 > B covers clipping.
CASES = [
    pytest.param(40, 8, 7, False, 5.0, id="B40-tile7"),
    pytest.param(40, 8, (16, 6), False, 12.5, id="B40-tile16x6"),
    pytest.param(40, 8, 64, False, 1.0, id="B40-tile64"),
    pytest.param(40, 8, 3, True, 5.0, id="B40-tile3-ring8"),
    pytest.param(64, 8, (4, 8), True, 20.0, id="B64-tile4x8-ring8"),
]


def _mesh_if(ring):
  return _mesh() if ring else None


# ----------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("b,d,tile,ring,inv_temp", CASES)
def test_info_nce_matches_naive(b, d, tile, ring, inv_temp):
  a, bb, item_ids, valid, _, _ = _batch(0, b, d, num_items=b // 3)
  args = (a, bb, valid, item_ids, jnp.float32(inv_temp))
  naive = jax.jit(jax.value_and_grad(losses.info_nce, argnums=(0, 1, 4)))(*args)
  tiled = jax.jit(jax.value_and_grad(
      functools.partial(tiled_losses.info_nce, tile=tile, mesh=_mesh_if(ring)),
      argnums=(0, 1, 4)))(*args)
  _assert_tree_close(tiled, naive, "info_nce (loss, (d a, d b, d t))")


def test_cross_modal_loss_matches_naive_on_the_ring():
  rng = np.random.default_rng(1)
  b, m, d = 24, 3, 8
  emb = rng.normal(size=(b, m, d)).astype(np.float32)
  presence = rng.random((b, m)) > 0.3
  presence[:, 2] = False
  presence[5, 2] = presence[5, 0] = True  # pair (0, 2) has exactly one item
  item_ids = rng.integers(0, 9, b).astype(np.int32)
  valid = np.arange(b) < b - 2
  args = (emb, presence, item_ids, valid, jnp.float32(4.0))
  naive = jax.jit(jax.value_and_grad(losses.cross_modal_loss, argnums=(0, 4)))(*args)
  tiled = jax.jit(jax.value_and_grad(
      functools.partial(tiled_losses.cross_modal_loss, tile=2, mesh=_mesh()),
      argnums=(0, 4)))(*args)
  _assert_tree_close(tiled, naive, "cross_modal_loss")


# ----------------------------------------------------------------------------- sampled softmax


def _naive_sampled(users, items, item_ids, log_q, valid, inv_temp, user_ids):
  return losses.sampled_softmax_loss(inv_temp * users @ items.T, item_ids, log_q, valid,
                                     user_ids)


@pytest.mark.parametrize("b,d,tile,ring,inv_temp,with_users", [
    pytest.param(40, 8, 7, False, 5.0, False, id="B40-tile7"),
    pytest.param(40, 8, (16, 6), False, 12.5, True, id="B40-tile16x6-users"),
    pytest.param(40, 8, 3, True, 5.0, True, id="B40-tile3-ring8-users"),
    pytest.param(64, 8, (4, 8), True, 20.0, False, id="B64-tile4x8-ring8"),
])
def test_sampled_softmax_matches_naive(b, d, tile, ring, inv_temp, with_users):
  users, items, item_ids, valid, log_q, user_ids = _batch(
      2, b, d, num_items=b // 2, num_users=b // 4 if with_users else None)
  args = (users, items, item_ids, log_q, valid, jnp.float32(inv_temp), user_ids)
  grad_args = (0, 1, 3, 5)
  naive = jax.jit(jax.value_and_grad(_naive_sampled, argnums=grad_args))(*args)

  def tiled(users, items, item_ids, log_q, valid, inv_temp, user_ids):
    return tiled_losses.sampled_softmax_loss(users, items, item_ids, log_q, valid, inv_temp,
                                             user_ids=user_ids, tile=tile, mesh=_mesh_if(ring))

  got = jax.jit(jax.value_and_grad(tiled, argnums=grad_args))(*args)
  _assert_tree_close(got, naive, "sampled softmax (loss, (d users, d items, d log_q, d t))")


def _ref_sampled_with_users(logits, item_ids, log_q, valid, user_ids):
  """float64 NumPy: each valid row over the valid columns that share neither item nor user."""
  corrected = np.asarray(logits, np.float64) - np.asarray(log_q, np.float64)[None, :]
  per_row = []
  for r in np.flatnonzero(valid):
    cols = [c for c in range(len(valid)) if valid[c] and (
        c == r or (item_ids[c] != item_ids[r] and user_ids[c] != user_ids[r]))]
    per_row.append(np.log(np.sum(np.exp(corrected[r, cols]))) - corrected[r, r])
  return float(np.mean(per_row))


def test_naive_sampled_softmax_user_ids_against_numpy():
  rng = np.random.default_rng(3)
  b = 10
  logits = (2.0 * rng.normal(size=(b, b))).astype(np.float32)
  item_ids = np.arange(b, dtype=np.int32)
  item_ids[1] = item_ids[0]
  user_ids = np.array([0, 1, 2, 2, 2, 3, 4, 5, 6, 6], np.int32)
  log_q = rng.normal(size=b).astype(np.float32)
  valid = np.arange(b) != 9
  loss = float(losses.sampled_softmax_loss(logits, item_ids, log_q, valid, user_ids))
  np.testing.assert_allclose(loss, _ref_sampled_with_users(logits, item_ids, log_q, valid,
                                                           user_ids), rtol=_RTOL)
  # The same-user mask matters here, and a user's other positive gets no gradient.
  assert abs(loss - float(losses.sampled_softmax_loss(logits, item_ids, log_q, valid))) > 1e-3
  g = jax.grad(losses.sampled_softmax_loss)(logits, item_ids, log_q, valid, user_ids)
  assert g[2, 3] == 0.0 and g[4, 2] == 0.0 and g[2, 2] != 0.0


# ----------------------------------------------------------------------------- fused scores


def _fusion_inputs(kind, seed, b, d=8, sources=3, gate_dim=4):
  """Random user vectors/queries and an item table shaped like Fusion.item_table's."""
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  sources = 1 if kind == "concat" else sources  # concat fuses into one vector per item
  present = rng.random((b, sources)) > 0.3
  present[4] = False  # an item with no source at all
  table = {"emb": unit(rng.normal(size=(b, sources, d))), "present": present}
  users = {"emb": unit(rng.normal(size=(b, d)))}
  if kind == "gated":
    table["bias"] = rng.normal(size=(b, sources)).astype(np.float32)
    table["key"] = rng.normal(size=(b, sources, gate_dim)).astype(np.float32)
    users["query"] = rng.normal(size=(b, gate_dim)).astype(np.float32)
  return users, table


@pytest.mark.parametrize("kind,b,tile,ring", [
    ("gated", 40, 7, False), ("gated", 40, (3, 5), True), ("mean", 24, 5, False),
    ("concat", 24, 4, True)])
def test_fused_softmax_matches_naive(kind, b, tile, ring):
  users, table = _fusion_inputs(kind, 4, b)
  _, _, item_ids, valid, log_q, user_ids = _batch(5, b, 8, num_items=b // 2, num_users=b // 3)
  gate_dim = 4
  present = table["present"]
  floats = {k: v for k, v in table.items() if k != "present"}

  def naive(users, floats, log_q, inv_temp):
    scores = fused_scores(users, {**floats, "present": present}, kind=kind, gate_dim=gate_dim)
    return losses.sampled_softmax_loss(inv_temp * scores, item_ids, log_q, valid, user_ids)

  def tiled(users, floats, log_q, inv_temp):
    return tiled_losses.fused_softmax_loss(
        users, {**floats, "present": present}, item_ids, log_q, valid, inv_temp, kind=kind,
        gate_dim=gate_dim, user_ids=user_ids, tile=tile, mesh=_mesh_if(ring))

  args = (users, floats, log_q, jnp.float32(7.0))
  want = jax.jit(jax.value_and_grad(naive, argnums=(0, 1, 2, 3)))(*args)
  got = jax.jit(jax.value_and_grad(tiled, argnums=(0, 1, 2, 3)))(*args)
  _assert_tree_close(got, want, f"fused {kind} (loss, (d users, d table, d log_q, d t))")


# ----------------------------------------------------------------------------- edge cases


def test_all_padding_gives_zero_and_finite_gradients():
  a, b, item_ids, _, log_q, _ = _batch(6, 16, 8, num_items=5)
  none = np.zeros(16, bool)
  for ring in (False, True):
    f = functools.partial(tiled_losses.info_nce, tile=3, mesh=_mesh_if(ring))
    loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 4)))(a, b, none, item_ids,
                                                                   jnp.float32(5.0))
    assert float(loss) == 0.0
    for g in grads:
      assert np.all(np.asarray(g) == 0.0)


def test_bfloat16_embeddings_keep_their_dtype_and_stay_close():
  a, b, item_ids, valid, _, _ = _batch(8, 24, 8, num_items=9)
  f = jax.jit(jax.value_and_grad(functools.partial(tiled_losses.info_nce, tile=5),
                                 argnums=(0, 1)))
  loss32, grads32 = f(a, b, valid, item_ids, jnp.float32(5.0))
  loss16, grads16 = f(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), valid, item_ids,
                      jnp.float32(5.0))
  assert loss16.dtype == jnp.float32  # log-sum-exps are float32
  # bf16 rounds the inputs to 8 mantissa bits (relative 2^-8); gradients come back in bf16.
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)
  for g16, g32 in zip(grads16, grads32):
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g32),
                               atol=3e-2 * float(np.abs(np.asarray(g32)).max()))


def test_bad_inputs_are_refused():
  a, b, item_ids, valid, _, _ = _batch(7, 12, 8, num_items=5)
  with pytest.raises(ValueError, match="not divisible"):
    tiled_losses.info_nce(a, b, valid, item_ids, 1.0, mesh=_mesh())  # 12 rows on 8 devices
  with pytest.raises(ValueError, match="positive"):
    tiled_losses.info_nce(a, b, valid, item_ids, 1.0, tile=0)
  with pytest.raises(ValueError, match="lead with batch"):
    tiled_losses.info_nce(a, b[:10], valid, item_ids, 1.0)


# ----------------------------------------------------------------------------- memory


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


@pytest.mark.parametrize("ring", [False, True], ids=["1-device", "ring8"])
def test_no_batch_by_batch_buffer(ring):
  """At B = 4096, d = 16 a [B, B] float32 is 64 MiB, 128x the inputs: it would dominate."""
  b, d, tile = 4096, 16, 256
  devices = 8 if ring else 1
  spec = jax.ShapeDtypeStruct
  args = (spec((b, d), jnp.float32), spec((b, d), jnp.float32), spec((b,), bool),
          spec((b,), jnp.int32), spec((), jnp.float32))
  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 4))
  tiled = _compiled(grad(functools.partial(tiled_losses.info_nce, tile=tile,
                                           mesh=_mesh_if(ring))), *args)
  naive = _compiled(grad(losses.info_nce), *args)
  square = b * b * 4
  # The naive loss does hold [B, B] buffers (so this test can fail) ...
  assert naive.memory_analysis().temp_size_in_bytes >= square
  # ... the tiled one (per device on the ring) only tiles and O(B d) vectors.
  per_device_rows = b // devices
  budget = 8 * tile * tile * 4 + 16 * per_device_rows * d * 4
  assert budget < square / 8
  assert tiled.memory_analysis().temp_size_in_bytes < budget
  hlo = tiled.as_text()
  for shape in (f"[{b},{b}]", f"[{per_device_rows},{b}]", f"[{b},{per_device_rows}]"):
    assert shape not in hlo


# ---------------------------------------------------------------- the train step (loss_tile)


def test_tiled_step_with_gradient_caching_equals_the_naive_step():
  """``config.loss_tile`` in the train step: the in-batch softmax over gated fusion scores and
  the contrastive term as a ring over 8 devices, together with gradient caching (the path of a
  batch far past memory), give the naive one-shot step's losses and update. Tile 3 does not
  divide the 4 rows per device, so the padding is exercised too."""
  num_users, num_items, batch_size = 24, 64, 32
  config = tiny_config(**{"optimizer.warmup_steps": 0, "batch_size": batch_size})
  assert config.model.fusion == "gated"
  mesh = sharding.make_mesh(data=8)
  batch = random_batch(config, batch_size, num_users, num_items, seed=4)
  batch["user_id"][5] = batch["user_id"][4]   # a user's other positive in the batch
  results = []
  for settings in (dict(), dict(loss_tile=3, micro_batch=8)):
    model = RecFusion(config.model, num_users=num_users, num_items=num_items,
                      rngs=nnx.Rngs(config.seed))
    tx, schedule = train.make_optimizer(config, num_steps=10)
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    shardings = sharding.state_shardings(state, mesh, min_elements=64)
    step = train.jit_train_step(graphdef, shardings, mesh, schedule=schedule,
                                **{**train.step_settings(config), **settings})
    new_state, aux = step(jax.device_put(state, shardings),
                          jax.device_put(batch, sharding.batch_sharding(mesh)))
    params = nnx.state(nnx.merge(graphdef, new_state)[0], nnx.Param)
    results.append((jax.device_get(aux), jax.device_get(params)))
  (naive_aux, naive_params), (tiled_aux, tiled_params) = results
  for key in ("total_loss", "rec_loss", "contrastive_loss", "grad_norm"):
    np.testing.assert_allclose(tiled_aux[key], naive_aux[key], rtol=_RTOL, err_msg=key)
  _assert_tree_close(tiled_params, naive_params, "updated params")
