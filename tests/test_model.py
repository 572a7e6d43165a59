"""Model properties: masks, cold start, ablation variants, inference path = training path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recfusion_jax.data.types import Catalogue
from recfusion_jax.models.recfusion import RecFusion
from recfusion_jax.recommend import Recommender
from tests.helpers import random_batch, tiny_config

NUM_USERS, NUM_ITEMS, B = 12, 40, 8


def _model(config):
  return RecFusion(config.model, num_users=NUM_USERS, num_items=NUM_ITEMS, rngs=nnx.Rngs(0))


def _presence_with_gaps():
  presence = np.ones((B, 3), bool)
  presence[0] = [False, True, True]     # no text
  presence[1] = [True, False, False]    # text only
  presence[2] = [False, False, False]   # no content at all
  return presence


@pytest.mark.parametrize("fusion,unified", [("gated", True), ("mean", True), ("concat", True),
                                            ("gated", False)])
def test_missing_modalities_are_finite_and_get_zero_weight(fusion, unified):
  config = tiny_config(**{"model.fusion": fusion, "model.encoder.unified": unified})
  model = _model(config)
  model.eval()
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=_presence_with_gaps())
  batch["item_has_id"][:] = True
  batch["item_has_id"][2] = False        # row 2: neither content nor ID

  out = model(batch)
  assert np.all(np.isfinite(out["logits"]))
  weights = np.asarray(out["gate_weights"])
  if fusion != "concat":
    assert weights[0, 0] == 0.0                       # absent text: exactly zero
    assert np.all(weights[1, 1:3] == 0.0)             # absent image and video
    np.testing.assert_allclose(weights[0].sum(), 1.0, rtol=1e-6)
    assert np.all(weights[2] == 0.0)                  # nothing present: all zero
  # An item with nothing to go on scores exactly 0 for every user (no NaN, no garbage).
  np.testing.assert_array_equal(np.asarray(out["logits"])[:, 2], 0.0)

  grads = nnx.grad(lambda m: jnp.sum(m(batch)["logits"] ** 2))(model)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_cold_item_without_id_scores_from_content():
  config = tiny_config()
  model = _model(config)
  model.eval()
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=np.ones((B, 3), bool))
  batch["item_has_id"][:] = False
  others = np.setdiff1d(np.arange(NUM_ITEMS), batch["item_id"])
  batch["history"] = others[batch["history"] % len(others)].astype(np.int32)
  out = model(batch)
  logits = np.asarray(out["logits"])
  assert np.all(np.isfinite(logits)) and np.any(logits != 0.0)
  # The ID source has zero weight; content sources carry everything.
  np.testing.assert_array_equal(np.asarray(out["gate_weights"])[:, 3], 0.0)
  # Changing the (untrained) ID embeddings of the cold items cannot change their scores.
  table = model.item_embeddings.embedding[...]
  model.item_embeddings.embedding[...] = table.at[batch["item_id"]].add(1.0)
  np.testing.assert_allclose(np.asarray(model(batch)["logits"]), logits, rtol=1e-6)


def test_user_without_history_or_id_gets_a_representation():
  config = tiny_config()
  model = _model(config)
  model.eval()
  # Users 0-1: no ID, every history slot masked (but different ids behind the mask); user 2
  # has one visible history item; user 3 the same with its ID.
  history = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6],
                      [1, 2, 3, 4, 5, 6]], np.int32)
  mask = np.zeros((4, 6), bool)
  mask[2:, -1] = True
  users = model.encode_users(jnp.array([0, 1, 2, 2], jnp.int32),
                             jnp.array([False, False, False, True]), jnp.asarray(history),
                             jnp.asarray(mask))
  emb = np.asarray(users["emb"])
  assert np.all(np.isfinite(emb))
  # Masked history and an unused ID change nothing: both empty users get the same vector...
  np.testing.assert_allclose(emb[0], emb[1], rtol=1e-6, atol=1e-7)
  # ...while one visible history item, and then the user's ID, each change it.
  assert np.abs(emb[2] - emb[0]).max() > 1e-3 and np.abs(emb[3] - emb[2]).max() > 1e-3


# The paper's scoring, and the dot-product / residual-fusion / pooled-user form (docs/TUNING.md).
DOT_RESIDUAL = {"model.scoring": "dot", "model.item_bias": True, "model.fusion": "residual",
                "model.user.kind": "pool", "model.user.use_id": False,
                "model.history_fusion": "sum", "model.item_id.separate_history": True}


DOT_ITEM_ITEM = {**DOT_RESIDUAL, "model.item_item": "learned"}
DOT_EASE_PRIOR = {**DOT_RESIDUAL, "model.item_item": "ease"}
DOT_EASE_FIXED = {**DOT_RESIDUAL, "model.item_item": "ease_fixed"}
DOT_CONTENT_SCALE = {**DOT_RESIDUAL, "model.item_content_scale": True}


@pytest.mark.parametrize("variant", [{}, DOT_RESIDUAL, DOT_ITEM_ITEM, DOT_EASE_PRIOR,
                                     DOT_EASE_FIXED, DOT_CONTENT_SCALE],
                         ids=["cosine_gated", "dot_residual", "dot_item_item", "dot_ease_prior",
                              "dot_ease_fixed", "dot_content_scale"])
def test_recommender_scores_equal_training_logits(variant):
  """Catalogue tables + user encodings (the eval path) reproduce the train-time logits."""
  config = tiny_config(**{"model.item_id.dropout": 0.0, **variant})
  model = _model(config)
  if variant:   # give the item biases values, so the test sees them
    model.item_bias[...] = jnp.linspace(-1.0, 1.0, NUM_ITEMS)
  if model.item_item is not None:
    model.item_item[...] = jax.random.normal(jax.random.key(1), (NUM_ITEMS, NUM_ITEMS))
  if model.item_item_scale is not None:
    model.item_item_scale[...] = 3.0
  # ease_fixed's term is weighed after training: the training forward leaves it out whatever
  # its weight (1.7 there), so its logits are the eval scores at weight 0.
  def set_fixed_weight(weight):
    if model.item_item_setting is not None:
      model.item_item_setting[...] = jnp.array([weight])

  set_fixed_weight(0.0)
  if model.item_content_scale is not None:
    model.item_content_scale[...] = jnp.linspace(-0.5, 2.0, NUM_ITEMS)
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=_presence_with_gaps())
  for key in ("text_ids", "text_mask", "image", "video", "presence", "item_has_id"):
    batch[key][1] = batch[key][0]  # row 1 repeats item 0: same item, same content
  # Put the batch's items into a catalogue at their ids; fill the cache from it.
  cat = Catalogue(
      text_ids=np.zeros((NUM_ITEMS, 16), np.int32), text_mask=np.zeros((NUM_ITEMS, 16), bool),
      image=np.zeros((NUM_ITEMS, 16, 16, 3), np.uint8),
      video=np.zeros((NUM_ITEMS, 4, 16, 16, 3), np.uint8),
      presence=np.zeros((NUM_ITEMS, 3), bool), has_id=np.ones(NUM_ITEMS, bool))
  ids = batch["item_id"]
  keep = np.unique(ids, return_index=True)[1]
  for key in ("text_ids", "text_mask", "image", "video", "presence"):
    getattr(cat, key)[ids[keep]] = batch[key][keep]
  cat.has_id[ids[keep]] = batch["item_has_id"][keep]

  rec = Recommender(model, chunk=16)
  emb, presence = rec.encode_catalogue(cat)
  model.write_cache(jnp.arange(NUM_ITEMS), emb, presence, jnp.ones(NUM_ITEMS, bool))
  rec = Recommender(model, chunk=16)
  table = rec.item_table(cat)
  users = rec.encode_users({k: batch[k] for k in ("user_id", "user_has_id", "history",
                                                  "history_mask")})
  scores = np.asarray(rec.score_fn()(users, table))[:, ids]

  model.eval()
  set_fixed_weight(1.7)
  logits = np.asarray(model(batch)["logits"]) / float(model.inverse_temperature)
  np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-6)

  # The full-catalogue logits (rec_loss="full") are the eval scores of every item, and only
  # trained items are candidate negatives.
  cat.has_id[NUM_ITEMS // 2:] = False
  model.write_cache(jnp.arange(NUM_ITEMS), emb, presence, jnp.ones(NUM_ITEMS, bool),
                    jnp.asarray(cat.has_id))
  batch["item_has_id"] = cat.has_id[ids]
  set_fixed_weight(0.0)
  rec = Recommender(model, chunk=16)
  table = rec.item_table(cat)
  # Re-encode: with history_fusion="sum" a history item's ID counts only if it was trained.
  users = rec.encode_users({k: batch[k] for k in ("user_id", "user_has_id", "history",
                                                  "history_mask")})
  set_fixed_weight(1.7)
  out = model(batch, full_catalogue=True)
  np.testing.assert_allclose(np.asarray(rec.score_fn()(users, table)),
                             np.asarray(out["catalogue_logits"]) / float(
                                 model.inverse_temperature), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["candidates"], cat.has_id)


def test_content_dropout_hides_catalogue_content_in_training_only():
  """model.content_dropout = 1 scores the catalogue term's items from their IDs alone (the
  users unchanged); in eval mode nothing is hidden."""
  config = tiny_config(**{**DOT_RESIDUAL, "model.item_id.dropout": 0.0,
                          "model.content_dropout": 1.0})
  model = _model(config)
  content = jax.random.normal(jax.random.key(1), (NUM_ITEMS, 3, config.model.embed_dim))
  model.write_cache(jnp.arange(NUM_ITEMS), content, jnp.ones((NUM_ITEMS, 3), bool),
                    jnp.ones(NUM_ITEMS, bool), jnp.ones(NUM_ITEMS, bool))
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=np.ones((B, 3), bool))
  batch["item_has_id"][:] = True
  users = model.encode_users(*(jnp.asarray(batch[k]) for k in
                               ("user_id", "user_has_id", "history", "history_mask")))
  model.train()
  dropped = np.asarray(model(batch, full_catalogue=True, users=users)["catalogue_logits"])
  model.eval()
  kept = np.asarray(model(batch, full_catalogue=True, users=users)["catalogue_logits"])
  model.cache_presence[...] = jnp.zeros_like(model.cache_presence[...])
  id_only = np.asarray(model(batch | {"presence": np.zeros((B, 3), bool)}, full_catalogue=True,
                             users=users)["catalogue_logits"])
  np.testing.assert_allclose(dropped, id_only, rtol=1e-5, atol=1e-6)
  assert np.abs(kept - id_only).max() > 1e-3
  # Off, no Dropout is built: building one draws a key, which would move every initial weight.
  assert _model(tiny_config(**DOT_RESIDUAL)).content_dropout is None


def test_full_catalogue_term_does_not_train_the_encoder():
  """The catalogue softmax reads stop-gradient content: a pull on the positives without a
  push on the cached negatives would collapse the encoder (see RecFusion.__call__)."""
  from recfusion_jax import losses  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  model = _model(config)
  model.cache_has_id[...] = jnp.ones(NUM_ITEMS, bool)
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS)

  def catalogue_loss(m):
    out = m(batch, full_catalogue=True)
    return losses.full_softmax_loss(out["catalogue_logits"], batch["item_id"], out["candidates"],
                                    batch["example_mask"])

  grads = nnx.grad(catalogue_loss, argnums=nnx.DiffState(0, nnx.Param))(model)
  norm = lambda tree: float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))
  assert norm(grads["encoder"]) == 0.0
  assert norm(grads["user_encoder"]) > 0.0 and norm(grads["item_embeddings"]) > 0.0


def test_separate_towers_have_one_trunk_per_modality():
  unified = _model(tiny_config())
  towers = _model(tiny_config(**{"model.encoder.unified": False}))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m.encoder, nnx.Param)))
  trunk = sum(x.size for x in jax.tree.leaves(nnx.state(unified.encoder.trunk, nnx.Param)))
  assert count(towers) == count(unified) + 2 * trunk


def test_total_loss_wires_the_contrastive_weight():
  """compute_losses: total = rec + lambda * contrastive, and lambda = 0 (the no_contrastive
  ablation) leaves exactly the recommendation gradient."""
  from recfusion_jax import train  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  model = _model(config)
  model.eval()   # no ID dropout: every call below sees the same sources
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, B, NUM_USERS, NUM_ITEMS).items()}
  total, aux = train.compute_losses(model, batch, 0.3)
  np.testing.assert_allclose(float(total), float(aux["rec_loss"])
                             + 0.3 * float(aux["contrastive_loss"]), rtol=1e-6)
  assert float(aux["contrastive_loss"]) > 0.1   # the term is there to be switched off

  def grads(weight, key):
    fn = lambda m: train.compute_losses(m, batch, weight)[1][key] if key else (
        train.compute_losses(m, batch, weight)[0])
    return jax.tree.leaves(nnx.grad(fn)(model))

  for got, want in zip(grads(0.0, None), grads(0.0, "rec_loss")):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-8)
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-6
             for a, b in zip(grads(0.3, None), grads(0.0, None)))


def test_residual_fusion_keeps_the_id_outside_the_gate():
  """residual: w_id = 1 for items with an ID, a softmax over present content otherwise; a cold
  item is scored from its gated content alone, and the item bias is an ID-side term."""
  config = tiny_config(**{**DOT_RESIDUAL, "model.item_id.dropout": 0.0})
  model = _model(config)
  model.eval()
  model.item_bias[...] = jnp.linspace(-1.0, 1.0, NUM_ITEMS)
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=_presence_with_gaps())
  batch["item_has_id"][:] = True
  batch["item_has_id"][3] = False
  out = model(batch)
  weights = np.asarray(out["gate_weights"])           # [B, S]: text, image, video, id
  np.testing.assert_array_equal(weights[np.arange(B) != 3, -1], 1.0)
  assert weights[3, -1] == 0.0
  content = weights[:, :-1]
  np.testing.assert_allclose(content[[0, 1, 3, 4]].sum(-1), 1.0, rtol=1e-6)
  assert content[0, 0] == 0.0 and np.all(content[1, 1:] == 0.0) and np.all(content[2] == 0.0)
  # Row 2 has no content: its score is the ID product plus its bias, exactly.
  users = model.encode_users(*(jnp.asarray(batch[k]) for k in
                               ("user_id", "user_has_id", "history", "history_mask")))
  item = batch["item_id"][2]
  want = users["emb"] @ model.item_embeddings.embedding[...][item] + model.item_bias[...][item]
  np.testing.assert_allclose(np.asarray(out["logits"])[:, 2], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="item_id.use"):
    _model(tiny_config(**{"model.fusion": "residual", "model.item_id.use": False}))


def test_item_content_scale_weighs_the_content_of_warm_items_only():
  """score(u, i) = <u, e_id> + c_i * sum_m w_m <u, e_m> + b_i where i has its ID; a cold item's
  content keeps weight 1, and the gate's weights do not depend on c."""
  config = tiny_config(**{**DOT_CONTENT_SCALE, "model.item_id.dropout": 0.0})
  model = _model(config)
  model.eval()
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=np.ones((B, 3), bool))
  batch["item_id"][:] = np.arange(B)
  batch["item_has_id"][:] = True
  batch["item_has_id"][3] = False                      # a cold item
  plain = model(batch)                                 # every c_i = 1: the residual model
  scale = np.linspace(-0.5, 2.0, NUM_ITEMS).astype(np.float32)
  model.item_content_scale[...] = jnp.asarray(scale)
  scaled = model(batch)
  np.testing.assert_array_equal(plain["gate_weights"], scaled["gate_weights"])
  model.item_content_scale[...] = jnp.zeros(NUM_ITEMS)
  id_only = np.asarray(model(batch)["logits"])          # content off for warm items
  content = np.asarray(plain["logits"]) - id_only       # content part of every warm item
  c = np.where(batch["item_has_id"], scale[batch["item_id"]], 1.0)
  np.testing.assert_allclose(np.asarray(scaled["logits"]), id_only + c[None, :] * content,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(id_only[:, 3], np.asarray(plain["logits"])[:, 3], rtol=1e-6)
  with pytest.raises(ValueError, match="item_content_scale"):
    _model(tiny_config(**{"model.item_content_scale": True}))   # gated fusion: no ID outside


@pytest.mark.parametrize("history_fusion", ["sum", "id"])
def test_history_fusion_id_keeps_content_out_of_the_user(history_fusion):
  """``id``: user vectors read the history items' IDs only, so rewriting the history items'
  cached content leaves them unchanged; ``sum`` adds their projected content."""
  config = tiny_config(**{**DOT_RESIDUAL, "model.history_fusion": history_fusion})
  model = _model(config)
  model.eval()
  model.cache_has_id[...] = jnp.ones(NUM_ITEMS, bool)
  model.cache_presence[...] = jnp.ones_like(model.cache_presence[...])
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS)
  args = [jnp.asarray(batch[k]) for k in ("user_id", "user_has_id", "history", "history_mask")]
  before = np.asarray(model.encode_users(*args)["emb"])
  model.cache_embeddings[...] = jax.random.normal(jax.random.key(3),
                                                  model.cache_embeddings[...].shape)
  after = np.asarray(model.encode_users(*args)["emb"])
  if history_fusion == "id":
    np.testing.assert_array_equal(before, after)
  else:
    assert np.abs(before - after).max() > 1e-3


@pytest.mark.parametrize("kind,num_sources", [("gated", 3), ("residual", 3), ("residual", 1),
                                              ("mean", 3), ("concat", 1)])
def test_fused_scores_equal_the_weighted_sum_of_products(kind, num_sources):
  """``fusion.fused_scores`` (per-source planes) against its definition, sum_s w[u, i, s] *
  <u, e_{i,s}> with ``pair_weights``' [U, I, S] weights: values and gradients, with absent
  sources, items with nothing present, a popularity bias and an item-item term."""
  from recfusion_jax.models import fusion   # pylint: disable=import-outside-toplevel
  num_users, num_items, d, h = 6, 9, 8, 4
  keys = jax.random.split(jax.random.key(0), 7)
  present = jax.random.bernoulli(keys[0], 0.6, (num_items, num_sources)).at[0].set(False)
  if num_sources > 1:
    present = present.at[1].set(True)
  users = {"emb": jax.random.normal(keys[1], (num_users, d)),
           "query": jax.random.normal(keys[2], (num_users, h)),
           "item_item": jax.random.normal(keys[3], (num_users, num_items))}
  table = {"emb": jax.random.normal(keys[4], (num_items, num_sources, d)),
           "bias": jax.random.normal(keys[5], (num_items, num_sources)),
           "key": jax.random.normal(keys[6], (num_items, num_sources, h)),
           "score_bias": jnp.linspace(-1.0, 1.0, num_items),
           "id_weight": (jnp.arange(num_items) % 2).astype(jnp.float32)}

  def naive(users, table):
    weights = fusion.pair_weights(users["query"], table, kind=kind, gate_dim=h)
    products = jnp.einsum("ud,isd->uis", users["emb"], table["emb"])
    return (jnp.sum(weights * products, -1) + table["score_bias"][None]
            + users["item_item"][:, table["item_id"]] * table["id_weight"][None])

  def planes(users, table):
    return fusion.fused_scores(users, table, kind=kind, gate_dim=h)

  fixed = {"present": present, "item_id": jnp.arange(num_items)}   # not differentiated

  def loss(fn, users, table):
    return jnp.sum(jnp.sin(fn(users, {**table, **fixed})))

  expected = naive(users, {**table, **fixed})
  np.testing.assert_allclose(np.asarray(planes(users, {**table, **fixed})),
                             np.asarray(expected), rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda *a: loss(planes, *a), argnums=(0, 1))(users, table)
  want = jax.grad(lambda *a: loss(naive, *a), argnums=(0, 1))(users, table)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-5), got, want)
  assert np.abs(np.asarray(got[0]["emb"])).max() > 1e-3


def test_history_content_projected_per_item_equals_per_slot():
  """``history_fusion='sum'`` projects each catalogue item's content once and gathers it: the
  same history vectors and gradients as projecting every history slot (the plain path)."""
  model = _model(tiny_config(**DOT_RESIDUAL))
  model.cache_has_id[...] = jnp.arange(NUM_ITEMS) % 3 > 0
  presence = jax.random.bernoulli(jax.random.key(1), 0.6, model.cache_presence[...].shape)
  model.cache_presence[...] = presence.at[0].set(False)   # item 0: no content at all
  model.cache_embeddings[...] = jax.random.normal(jax.random.key(2),
                                                  model.cache_embeddings[...].shape)
  batch = random_batch(tiny_config(**DOT_RESIDUAL), B, NUM_USERS, NUM_ITEMS)
  history, mask = jnp.asarray(batch["history"]), jnp.asarray(batch["history_mask"])
  id_emb = jnp.zeros((B, model.embed_dim))

  def vectors_and_grads(per_item):
    def loss(m):
      v = m.history_vectors(id_emb, history, mask, per_item=per_item)
      return jnp.sum(jnp.sin(v)), v
    (_, v), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return v, grads

  plain, plain_grads = vectors_and_grads(False)
  gathered, gathered_grads = vectors_and_grads(True)
  assert np.abs(np.asarray(plain)).max() > 1e-3
  np.testing.assert_allclose(np.asarray(gathered), np.asarray(plain), rtol=1e-5, atol=1e-6)
  kernel = lambda g: np.asarray(g.history_content.kernel[...])
  assert np.abs(kernel(plain_grads)).max() > 1e-3
  np.testing.assert_allclose(kernel(gathered_grads), kernel(plain_grads), rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-5),
               nnx.state(gathered_grads), nnx.state(plain_grads))


@pytest.mark.parametrize("fields", [{}, DOT_RESIDUAL], ids=["gated_cosine", "dot_residual"])
def test_in_batch_user_gradient_off_stops_only_the_user_model(fields):
  """``model.in_batch_user_gradient=False``: the in-batch logits are unchanged, their gradient
  reaches the encoder and the gate exactly as before, and the user model gets none of it."""
  logits, grads = {}, {}
  for flag in (True, False):
    config = tiny_config(**{**fields, "model.in_batch_user_gradient": flag})
    model = _model(config)
    model.eval()
    batch = random_batch(config, B, NUM_USERS, NUM_ITEMS)
    logits[flag] = np.asarray(model(batch)["logits"])
    grads[flag] = nnx.grad(lambda m: jnp.sum(m(batch)["logits"] ** 2),  # pylint: disable=cell-var-from-loop
                           argnums=nnx.DiffState(0, nnx.Param))(model)
  np.testing.assert_array_equal(logits[True], logits[False])
  norm = lambda tree: float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))
  assert norm(grads[True]["user_encoder"]) > 0.0
  assert norm(grads[False]["user_encoder"]) == 0.0
  for part in ("encoder", "fusion"):
    assert norm(grads[False][part]) > 0.0
    for a, b in zip(jax.tree.leaves(grads[True][part]), jax.tree.leaves(grads[False][part])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_item_item_term_is_the_history_rows_of_w():
  """score(u, i) gains sum_{j in history(u), j trained} W[j, i] / sqrt(n) where i has its ID,
  and nothing where i has none (a cold item); W is trained by the softmax."""
  config = tiny_config(**{**DOT_ITEM_ITEM, "model.item_id.dropout": 0.0})
  model = _model(config)
  model.eval()
  w = np.asarray(jax.random.normal(jax.random.key(2), (NUM_ITEMS, NUM_ITEMS)))
  trained = np.arange(NUM_ITEMS) % 5 != 0
  model.cache_has_id[...] = jnp.asarray(trained)
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=_presence_with_gaps())
  batch["item_has_id"][:] = True
  batch["item_has_id"][3] = False
  user_keys = ("user_id", "user_has_id", "history", "history_mask")
  users = {k: np.asarray(v) for k, v in model.encode_users(
      *(jnp.asarray(batch[k]) for k in user_keys)).items()}
  np.testing.assert_array_equal(users["item_item"], 0.0)    # zero at init
  base = np.asarray(model(batch)["logits"])
  model.item_item[...] = jnp.asarray(w)
  logits = np.asarray(model(batch)["logits"])

  want = np.zeros((B, B))
  for u in range(B):
    seen = [j for j, m in zip(batch["history"][u], batch["history_mask"][u]) if m and trained[j]]
    for col, item in enumerate(batch["item_id"]):
      if batch["item_has_id"][col]:
        want[u, col] = sum(w[j, item] for j in seen) / np.sqrt(max(len(seen), 1))
  np.testing.assert_allclose(logits - base, want, rtol=1e-4, atol=1e-4)
  assert np.all(logits[:, 3] == base[:, 3])                  # no ID: no item-item term

  model.train()
  grads = nnx.grad(lambda m: jnp.sum(m(batch, full_catalogue=True)["catalogue_logits"] ** 2))(
      model)
  assert np.abs(np.asarray(grads.item_item[...])).max() > 0
  with pytest.raises(ValueError, match="item_item"):
    _model(tiny_config(**{"model.item_item": "learned"}))   # cosine scoring
  with pytest.raises(ValueError, match="choose from"):
    _model(tiny_config(**{**DOT_RESIDUAL, "model.item_item": "yes"}))
  causal = _model(tiny_config(**{**DOT_ITEM_ITEM, "model.user.causal": True}))
  with pytest.raises(ValueError, match="per-position"):
    causal.encode_users(*(jnp.asarray(batch[k]) for k in user_keys), per_position=True)


def test_ease_prior_is_fixed_and_scaled():
  """item_item="ease": score gain = scale * sum_{j in history} W[j, i] (raw multi-hot, as EASE
  scores); W is state, not a parameter (no gradient, no optimizer), the scale is trained."""
  config = tiny_config(**{**DOT_EASE_PRIOR, "model.item_id.dropout": 0.0})
  model = _model(config)
  model.eval()
  w = np.asarray(jax.random.normal(jax.random.key(3), (NUM_ITEMS, NUM_ITEMS)))
  model.item_item[...] = jnp.asarray(w)
  model.item_item_scale[...] = 2.5
  model.cache_has_id[...] = jnp.ones(NUM_ITEMS, bool)
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=_presence_with_gaps())
  user_keys = ("user_id", "user_has_id", "history", "history_mask")
  users = model.encode_users(*(jnp.asarray(batch[k]) for k in user_keys))
  hot = np.zeros((B, NUM_ITEMS))
  for u in range(B):
    for j, m in zip(batch["history"][u], batch["history_mask"][u]):
      hot[u, j] += m
  np.testing.assert_allclose(np.asarray(users["item_item"]), 2.5 * hot @ w, rtol=1e-4, atol=1e-4)
  assert "item_item" not in nnx.state(model, nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(batch, full_catalogue=True)["catalogue_logits"] ** 2))(
      model)
  assert abs(float(grads.item_item_scale[...])) > 0


def test_fixed_ease_term_is_weighted_after_training():
  """item_item="ease_fixed": at its starting weight 0 the model scores as without the term
  (training is unchanged); at weight w the gain is w * sum_{j in history, j trained} W[j, i];
  W and the weight are state, not parameters; per-position rows carry no term."""
  config = tiny_config(**{**DOT_EASE_FIXED, "model.item_id.dropout": 0.0})
  model, plain = _model(config), _model(tiny_config(**{**DOT_RESIDUAL,
                                                        "model.item_id.dropout": 0.0}))
  for m in (model, plain):
    m.eval()
    m.cache_has_id[...] = jnp.asarray(np.arange(NUM_ITEMS) % 4 != 0)
  w = np.asarray(jax.random.normal(jax.random.key(4), (NUM_ITEMS, NUM_ITEMS)))
  model.item_item[...] = jnp.asarray(w)
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=_presence_with_gaps())
  np.testing.assert_array_equal(np.asarray(model(batch)["logits"]),
                                np.asarray(plain(batch)["logits"]))
  model.item_item_setting[...] = jnp.array([2.5])
  user_keys = ("user_id", "user_has_id", "history", "history_mask")
  users = model.encode_users(*(jnp.asarray(batch[k]) for k in user_keys))
  hot = np.zeros((B, NUM_ITEMS))
  for u in range(B):
    for j, m in zip(batch["history"][u], batch["history_mask"][u]):
      hot[u, j] += m * (j % 4 != 0)
  np.testing.assert_allclose(np.asarray(users["item_item"]), 2.5 * hot @ w, rtol=1e-4,
                             atol=1e-4)
  params = nnx.state(model, nnx.Param)
  assert "item_item" not in params and "item_item_setting" not in params
  assert model.item_item_scale is None
  causal = _model(tiny_config(**{**DOT_EASE_FIXED, "model.user.causal": True}))
  assert "item_item" not in causal.encode_users(*(jnp.asarray(batch[k]) for k in user_keys),
                                                per_position=True)


def test_softmax_scale_matches_a_naive_search():
  """models.item_item.softmax_scale: the grid point of least cross-entropy, each training pair
  against the user's non-interacted items, computed pair by pair here."""
  from recfusion_jax.models import item_item   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = (rng.random((9, 7)) < 0.4).astype(np.float32)
  x[:, 0] = 1.0   # every user has a pair
  w = rng.normal(size=(7, 7)).astype(np.float32)
  np.fill_diagonal(w, 0.0)
  grid = (0.5, 1.0, 2.0, 4.0, 8.0)
  losses = []
  for s in grid:
    total, count = 0.0, 0
    for u in range(9):
      logits = s * (x[u] @ w)
      negatives = [j for j in range(7) if x[u, j] == 0]
      for i in np.flatnonzero(x[u]):
        pool = np.array([logits[i]] + [logits[j] for j in negatives])
        total += np.log(np.sum(np.exp(pool))) - logits[i]
        count += 1
    losses.append(total / count)
  assert item_item.softmax_scale(x, w, grid) == grid[int(np.argmin(losses))]
  assert len(set(np.round(losses, 6))) > 1   # the grid points differ: the choice means something


@pytest.mark.parametrize("user", [{}, {"model.user.kind": "pool", "model.user.recent": 3}])
def test_causal_user_states_do_not_see_the_future(user):
  """A causal user model's state at position t reads the history up to t only (a Transformer,
  or the pooled user with its recency kernel)."""
  config = tiny_config(**{"model.user.causal": True, **user})
  model = _model(config)
  if user:   # a recency kernel that reads something (it starts at zero)
    model.user_encoder.recent_weights[...] = jnp.asarray([0.5, -0.3, 0.2])
  model.eval()
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS)
  batch["history_mask"][:] = True
  keys = ("user_id", "user_has_id", "history", "history_mask")
  states = model.encode_users(*(jnp.asarray(batch[k]) for k in keys), per_position=True)["emb"]
  changed = dict(batch, history=batch["history"].copy())
  changed["history"][:, 4:] = (changed["history"][:, 4:] + 1) % NUM_ITEMS
  after = model.encode_users(*(jnp.asarray(changed[k]) for k in keys), per_position=True)["emb"]
  np.testing.assert_allclose(np.asarray(after)[:, :4], np.asarray(states)[:, :4], atol=1e-6)
  assert np.abs(np.asarray(after)[:, 4:] - np.asarray(states)[:, 4:]).max() > 1e-4
  # The last state is the user the evaluator ranks with.
  last = model.encode_users(*(jnp.asarray(batch[k]) for k in keys))["emb"]
  np.testing.assert_allclose(np.asarray(last), np.asarray(states)[:, -1], atol=1e-6)
  with pytest.raises(ValueError, match="recent"):
    _model(tiny_config(**{"model.user.recent": 2}))   # a Transformer user has no kernel


def test_causal_pooled_user_is_the_pooled_user_of_each_prefix():
  """State t of the causal pooled user = the (non-causal) pooled user of the window cut after
  item t and right-aligned again, recency kernel included."""
  from recfusion_jax.models.user import UserEncoder  # pylint: disable=import-outside-toplevel
  kwargs = dict(num_users=5, embed_dim=8, history_len=6, depth=1, num_heads=1, use_id=False,
                dropout=0.0, kind="pool", recent=3, normalize=False)
  causal = UserEncoder(causal=True, rngs=nnx.Rngs(0), **kwargs)
  causal.recent_weights[...] = jnp.asarray([0.7, -0.4, 0.25])
  plain = UserEncoder(causal=False, rngs=nnx.Rngs(1), **kwargs)
  nnx.update(plain, nnx.state(causal))
  rng = np.random.default_rng(0)
  history = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
  mask = np.ones((2, 6), bool)
  mask[1, :2] = False                                   # row 1: two padding slots first
  id_emb = jnp.zeros((2, 8))
  states = causal(id_emb, history, jnp.asarray(mask), per_position=True)
  for t in range(6):
    cut = np.zeros((2, 6, 8), np.float32)
    cut[:, 5 - t:] = np.asarray(history)[:, :t + 1]
    cut_mask = np.zeros((2, 6), bool)
    cut_mask[:, 5 - t:] = mask[:, :t + 1]
    want = plain(id_emb, jnp.asarray(cut), jnp.asarray(cut_mask))
    np.testing.assert_allclose(np.asarray(states[:, t]), np.asarray(want), atol=1e-5,
                               err_msg=f"position {t}")
  np.testing.assert_allclose(np.asarray(causal(id_emb, history, jnp.asarray(mask))),
                             np.asarray(states[:, -1]), atol=1e-6)


@pytest.mark.parametrize("scoring", ["dot", "cosine"])
def test_transformer_user_under_dot_scoring_starts_at_the_origin(scoring):
  """Dot scoring: the Transformer user's output layer starts at zero (every user at the
  origin, and its kernel still gets a gradient); cosine scoring keeps a random start."""
  fields = DOT_RESIDUAL if scoring == "dot" else {}
  config = tiny_config(**{**fields, "model.user.kind": "transformer", "model.user.causal": True})
  model = _model(config)
  model.eval()
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS)
  args = [jnp.asarray(batch[k]) for k in ("user_id", "user_has_id", "history", "history_mask")]
  norms = np.linalg.norm(np.asarray(model.encode_users(*args)["emb"]), axis=-1)
  if scoring == "dot":
    np.testing.assert_array_equal(norms, 0.0)
    grads = nnx.grad(lambda m: jnp.sum(m(batch)["logits"]))(model)
    assert np.abs(np.asarray(grads["user_encoder"]["out"]["kernel"])).max() > 0.0
  else:
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def _user_rows(config, kind: str):
  """(synthetic data set, one batch of B per-user rows of ``kind``: cloze or next)."""
  from recfusion_jax.data import examples  # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.synthetic import make_synthetic  # pylint: disable=import-outside-toplevel
  data = make_synthetic(config.data.synthetic, num_items=NUM_ITEMS, num_users=NUM_USERS,
                        min_interactions=4, max_interactions=9,
                        image_size=config.model.encoder.image.size)
  index = examples.TrainExampleIndex.build(data)
  batch = examples.make_user_batch(
      data, index, np.arange(B), history_len=config.model.user.history_len,
      log_q=examples.item_log_q(data), batch_size=B, kind=kind, target_share=0.3, seed=0)
  return data, batch


@pytest.mark.parametrize("kind,form", [("cloze", "softmax"), ("next", "softmax"),
                                       ("cloze", "squared")])
def test_per_user_batches_train(kind, form):
  """The dot recipe's per-user rows (cloze with a pooled user, next-item with a causal one)
  give finite losses whose repeated steps on one batch drive the catalogue term (either form)
  down."""
  from recfusion_jax import train  # pylint: disable=import-outside-toplevel
  user = ({"model.user.kind": "pool", "model.user.use_id": False} if kind == "cloze" else
          {"model.user.kind": "transformer", "model.user.causal": True})
  config = tiny_config(**{**DOT_RESIDUAL, **user, "model.item_id.dropout": 0.0,
                          "optimizer.warmup_steps": 1, "optimizer.learning_rate": 1e-2,
                          "rec_loss": "full"})
  data, batch = _user_rows(config, kind)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  model = train.create_model(config, data)
  model.cache_has_id[...] = jnp.asarray(data.catalogue.has_id)
  tx, schedule = train.make_optimizer(config, 30)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  step = jax.jit(lambda s, b: train.train_step(
      graphdef, s, b, contrastive_weight=0.1, schedule=schedule, full_catalogue=True,
      exclude_history=kind == "cloze", catalogue_form=form))
  history = []
  for _ in range(25):
    state, metrics = step(state, batch)
    history.append(float(metrics[f"full_{form}_loss"]))
    assert all(np.isfinite(float(v)) for v in jax.tree.leaves(metrics) if np.ndim(v) == 0)
  # The softmax must fall by 0.5 nats; the squared error by half of where it starts.
  assert history[-1] < (history[0] - 0.5 if form == "softmax" else 0.5 * history[0]), history


@pytest.mark.parametrize("with_id", [False, True])
def test_in_batch_term_of_per_user_rows_reads_the_id_only_when_asked(with_id):
  """Per-user rows score the in-batch term from content alone (the ID table cannot move it)
  unless ``model.in_batch_with_id``, which scores it from every source."""
  config = tiny_config(**{**DOT_RESIDUAL, "model.item_id.dropout": 0.0,
                          "model.in_batch_with_id": with_id})
  _, batch = _user_rows(config, "cloze")
  model = _model(config)
  model.eval()
  before = np.asarray(model(batch)["logits"])
  model.item_embeddings.embedding[...] = model.item_embeddings.embedding[...] + 1.0
  moved = np.abs(np.asarray(model(batch)["logits"]) - before).max()
  assert (moved > 1e-3) if with_id else (moved == 0.0)


def test_sampled_next_positions_score_the_same_states_as_every_position():
  """Next-item rows with ``target_positions`` score those slots' user states only: the same
  catalogue logits as the every-position batch at those slots, and with every slot drawn (in
  a random order) the same catalogue loss."""
  from recfusion_jax import train  # pylint: disable=import-outside-toplevel
  from recfusion_jax.data import examples  # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.synthetic import make_synthetic  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{**DOT_RESIDUAL, "model.user.kind": "pool", "model.user.causal": True,
                          "model.user.use_id": False, "rec_loss": "full"})
  length = config.model.user.history_len
  data = make_synthetic(config.data.synthetic, num_items=NUM_ITEMS, num_users=NUM_USERS,
                        min_interactions=4, max_interactions=2 * length,
                        image_size=config.model.encoder.image.size)
  index = examples.TrainExampleIndex.build(data)

  def batch(next_positions):
    out = examples.make_user_batch(
        data, index, np.arange(B), history_len=length, log_q=examples.item_log_q(data),
        batch_size=B, kind="next", target_share=0.3, seed=0, next_positions=next_positions)
    return {k: jnp.asarray(v) for k, v in out.items()}

  model = train.create_model(config, data)
  model.cache_has_id[...] = jnp.asarray(data.catalogue.has_id)
  model.eval()
  every = batch(0)
  full = np.asarray(model(every, full_catalogue=True)["catalogue_logits"])
  assert full.shape[:2] == (B, length)
  for k in (2, length):
    sampled = batch(k)
    slots = np.asarray(sampled["target_positions"])
    assert slots.shape == (B, k)
    logits = np.asarray(model(sampled, full_catalogue=True)["catalogue_logits"])
    np.testing.assert_allclose(logits, np.take_along_axis(full, slots[:, :, None], 1),
                               rtol=1e-5, atol=1e-5)

  def loss(b):
    return float(train.compute_losses(model, b, contrastive_weight=0.0, full_catalogue=True,
                                      in_batch_weight=0.0)[1]["full_softmax_loss"])

  np.testing.assert_allclose(loss(batch(length)), loss(every), rtol=1e-5)
  assert abs(loss(batch(2)) - loss(every)) > 1e-4   # a sample, not the whole row


DOT_TRANSITION = {**DOT_RESIDUAL, "model.transition": "markov", "model.transition_window": 3}


def test_transition_term_weighs_the_latest_items_rows_of_p():
  """transition="markov": score(u, i) gains weight * sum_k decay^(k-1) P[h_k(u), i] over the
  latest ``transition_window`` items with a trained ID, where i has its ID; P and the setting
  are state, not parameters; weight 0 (training's value) adds nothing; per-position states
  carry no term."""
  config = tiny_config(**{**DOT_TRANSITION, "model.item_id.dropout": 0.0})
  model = _model(config)
  model.eval()
  p = np.asarray(jax.random.uniform(jax.random.key(4), (NUM_ITEMS, NUM_ITEMS)))
  trained = np.arange(NUM_ITEMS) % 5 != 0
  model.cache_has_id[...] = jnp.asarray(trained)
  model.transition[...] = jnp.asarray(p)
  batch = random_batch(config, B, NUM_USERS, NUM_ITEMS, presence=_presence_with_gaps())
  hist = config.model.user.history_len
  lengths = np.array([0, 1, 2, 3, 6, 5, 4, 6])     # left-padded, most recent last
  batch["history_mask"] = np.arange(hist)[None, :] >= hist - lengths[:, None]
  batch["item_has_id"][:] = True
  batch["item_has_id"][3] = False
  user_keys = ("user_id", "user_has_id", "history", "history_mask")
  encode = lambda **kw: {k: np.asarray(v) for k, v in model.encode_users(
      *(jnp.asarray(batch[k]) for k in user_keys), **kw).items()}
  np.testing.assert_array_equal(encode()["transition"], 0.0)   # weight 0 until chosen
  # The eval path's scores against the batch's items (the training forward leaves the term
  # out whatever its weight: its logits stay put).
  table = model(batch)["in_batch_table"]
  scores = lambda: np.asarray(model.score(model.encode_users(
      *(jnp.asarray(batch[k]) for k in user_keys)), table))
  base, train_logits = scores(), np.asarray(model(batch)["logits"])
  model.transition_setting[...] = jnp.array([1.5, 0.5])
  logits = scores()
  np.testing.assert_array_equal(np.asarray(model(batch)["logits"]), train_logits)

  want_user = np.zeros((B, NUM_ITEMS))
  for u in range(B):
    latest_first = list(batch["history"][u][batch["history_mask"][u]])[::-1]
    for k, j in enumerate(latest_first[:3]):
      if trained[j]:
        want_user[u] += 1.5 * 0.5 ** k * p[j]
  np.testing.assert_allclose(encode()["transition"], want_user, rtol=1e-5, atol=1e-6)
  want = want_user[:, batch["item_id"]] * batch["item_has_id"][None, :]
  np.testing.assert_allclose(logits - base, want, rtol=1e-4, atol=1e-4)
  assert np.all(logits[:, 3] == base[:, 3])                  # no ID: no transition term
  causal = _model(tiny_config(**{**DOT_TRANSITION, "model.user.causal": True}))
  causal.transition_setting[...] = jnp.array([1.0, 0.5])
  assert "transition" not in causal.encode_users(*(jnp.asarray(batch[k]) for k in user_keys),
                                                 per_position=True)
  params = nnx.state(model, nnx.Param)
  assert "transition" not in params and "transition_setting" not in params
  model.transition_setting[...] = jnp.array([1.0, 0.0])      # decay 0: the latest item alone
  latest = batch["history"][:, -1]
  want_latest = np.where((lengths > 0) & trained[latest], 1.0, 0.0)[:, None] * p[latest]
  np.testing.assert_allclose(encode()["transition"], want_latest, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="item_id.use"):
    _model(tiny_config(**{**DOT_TRANSITION, "model.item_id.use": False}))
  with pytest.raises(ValueError, match="choose from"):
    _model(tiny_config(**{**DOT_RESIDUAL, "model.transition": "fpmc"}))
