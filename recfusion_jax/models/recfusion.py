"""RecFusion: content encoder + gated fusion + user model, and the item embedding cache.

Data flow of one training step (B rows; a row is one interaction, or one user with several
targets, see ``data.examples``):

  the rows' positive items' content --ContentEncoder--> e_{i,m} (with gradient)
  history item ids --cache lookup--> e_{h,m} (no gradient) + ID input embeddings --> h_j
  user id + history vectors --UserEncoder--> u
  scores: u against the batch's items (in-batch softmax, trains the encoder) and against the
  whole catalogue (full softmax over cached, stop-gradient content + the ID table)

Efficiency: the content encoder runs once per row per step. History items are never
re-encoded; their per-modality embeddings come from ``item_cache``, a non-trainable table that
every step overwrites with the fresh (stop-gradient) encodings of its positives and that the
train loop re-encodes in full every ``cache_refresh_every`` steps.

Scoring (``model.scoring``):
  cosine  unit user, unit sources, a learned (clipped) temperature: the paper's form.
  dot     unnormalised user and ID vectors, unit content vectors times a learned per-modality
          scale, and (``model.item_bias``) a learned per-item bias: the magnitude and
          popularity channels a softmax recommender needs, and that unit vectors under a
          convex gate do not have (docs/TUNING.md measures the difference).

``model.item_item`` (dot scoring, with item IDs) adds a full-rank item-to-item term, the form of
EASE and SLIM: score(u, i) += sum_{j in history(u)} W[j, i] (times a normaliser). A rank-d
user vector against rank-d item vectors cannot express every item-item relation; on MovieLens
the closed-form EASE, which is exactly such a W, leads every low-rank model (docs/TUNING.md §9).
  learned  W trained by the same softmax from zero, over the history's multi-hot / sqrt(n).
  ease     W is EASE's closed form on the training interactions (``train.fill_item_item_prior``;
           not trained), over the raw multi-hot as EASE scores, times a learned scale: the
           factors, the content and the gate then learn what the linear item-item model misses
           (a hybrid in the manner of EASE with side information).
  ease_fixed  the same W, not trained and not in training: its weight ``item_item_setting`` is
           0 in training and chosen on valid after it (``score_terms.choose_settings``),
           so the trained model is unchanged and the term is a blend at scoring time. Trained
           jointly (``ease``) the softmax overfits what it adds to W (docs/TUNING.md §9); set
           beside the finished model it adds what the factors miss (§28).
W is N x N: a term for catalogues of thousands of items, not millions. It is an ID-side term
(zero for items without a trained ID, i.e. cold items), and it reads a user's whole history, so
it has no per-position (causal) form.

``model.transition="markov"`` (with item IDs) adds a first-order Markov term, FPMC's
"what follows what" in closed form: P[j, i] = the share of transitions out of item j in the
training timelines that go to i (``baselines.markov``, filled by ``train.fill_transition_prior``),
and score(u, i) += weight * sum_k decay^(k-1) P[h_k(u), i] over the user's latest
``transition_window`` items. It is not trained: ``transition_setting`` = (weight, decay) is 0 in
training and chosen on valid after it (``score_terms.choose_settings``), a product of the
trained model and the chain at scoring time. On MovieLens loo the chain holds the sequential
signal of the last transition that SASRec reads and the pooled user misses (docs/TUNING.md §27).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from recfusion_jax.data.types import MODALITIES
from recfusion_jax.models.encoder import ContentEncoder, l2_normalize
from recfusion_jax.models.fusion import Fusion
from recfusion_jax.models.user import UserEncoder

SCORINGS = ("cosine", "dot")
ITEM_ITEM = ("off", "learned", "ease", "ease_fixed")
TRANSITIONS = ("off", "markov")
HISTORY_FUSIONS = ("gated", "sum", "id")


class ItemCache(nnx.Variable):
  """Non-trainable state: per-modality item embeddings reused for history items."""


class ItemItemPrior(nnx.Variable):
  """Non-trainable state: a closed-form item-item matrix fitted on the training interactions."""


class ScoringSetting(nnx.Variable):
  """Non-trainable state chosen after training (on valid), used at scoring time only."""


def _clipped_inverse_temperature(log_temperature: jax.Array) -> jax.Array:
  # A clipped temperature keeps logits bounded (CLIP clips its logit scale the same way).
  return 1.0 / jnp.clip(jnp.exp(log_temperature), 0.01, 1.0)


class RecFusion(nnx.Module):
  """The whole recommender. ``cfg`` is ``config.model`` (see configs/tiny.py)."""

  def __init__(self, cfg: Mapping[str, Any], *, num_users: int, num_items: int, rngs: nnx.Rngs):
    d = cfg.embed_dim
    self.embed_dim = d
    self.num_items = num_items
    self.scoring = cfg.get("scoring", "cosine")
    if self.scoring not in SCORINGS:
      raise ValueError(f"model.scoring={self.scoring!r}; choose from {SCORINGS}")
    self.history_fusion = cfg.get("history_fusion", "gated")
    self.in_batch_user_gradient = bool(cfg.get("in_batch_user_gradient", True))
    self.in_batch_with_id = bool(cfg.get("in_batch_with_id", False))
    if self.history_fusion not in HISTORY_FUSIONS:
      raise ValueError(f"model.history_fusion={self.history_fusion!r}; choose from "
                       f"{HISTORY_FUSIONS}")
    normalize = self.scoring == "cosine"
    self.encoder = ContentEncoder(cfg.encoder, tuple(cfg.modalities), d, rngs=rngs)
    self.modalities = self.encoder.modalities
    self.use_item_id = bool(cfg.item_id.use)
    self.sources = self.modalities + (("id",) if self.use_item_id else ())
    small = nnx.initializers.normal(0.02)
    self.item_embeddings = (
        nnx.Embed(num_items, d, embedding_init=small, rngs=rngs) if self.use_item_id else None)
    # Separate input embeddings for history items (SASRec ties them; on random hold-outs an
    # untied pair, as in a linear autoencoder, generalises better).
    self.history_embeddings = (
        nnx.Embed(num_items, d, embedding_init=small, rngs=rngs)
        if self.use_item_id and cfg.item_id.get("separate_history", False) else None)
    self.item_bias = (nnx.Param(jnp.zeros((num_items,), jnp.float32))
                      if cfg.get("item_bias", False) else None)
    self.item_item_mode = cfg.get("item_item", "off")
    if self.item_item_mode not in ITEM_ITEM:
      raise ValueError(f"model.item_item={self.item_item_mode!r}; choose from {ITEM_ITEM}")
    if self.item_item_mode != "off" and (not self.use_item_id or self.scoring != "dot"):
      raise ValueError("model.item_item is an ID-side term of dot scoring: it needs "
                       "model.item_id.use and model.scoring='dot'")
    # Learned: zero at init, so training starts from the factor model and the softmax adds what
    # it lacks. The diagonal is never trained (a user's history items are neither targets nor,
    # with exclude_history, negatives), so it needs no EASE-style zero constraint.
    zeros = jnp.zeros((num_items, num_items), jnp.float32)
    self.item_item = (nnx.Param(zeros) if self.item_item_mode == "learned" else
                      ItemItemPrior(zeros) if self.item_item_mode in ("ease", "ease_fixed")
                      else None)
    # The prior's scores are on EASE's scale (a regression onto 0/1), not a softmax's: a
    # learned scale, started where the prior best fits the training data as a softmax.
    self.item_item_scale = (nnx.Param(jnp.ones((), jnp.float32))
                            if self.item_item_mode == "ease" else None)
    # ease_fixed: (weight,), 0 in training; chosen on valid after it.
    self.item_item_setting = (ScoringSetting(jnp.zeros((1,), jnp.float32))
                              if self.item_item_mode == "ease_fixed" else None)
    self.transition_mode = cfg.get("transition", "off")
    if self.transition_mode not in TRANSITIONS:
      raise ValueError(f"model.transition={self.transition_mode!r}; choose from {TRANSITIONS}")
    if self.transition_mode != "off" and not self.use_item_id:
      raise ValueError("model.transition reads the history's item IDs: it needs model.item_id.use")
    self.transition_window = int(cfg.get("transition_window", 8))
    if self.transition_window < 1:
      raise ValueError(f"model.transition_window must be >= 1, got {self.transition_window}")
    use_transition = self.transition_mode == "markov"
    self.transition = ItemItemPrior(zeros) if use_transition else None
    # (weight, decay): weight 0 leaves the trained model's scores as they are.
    self.transition_setting = (ScoringSetting(jnp.array([0.0, 0.5], jnp.float32))
                               if use_transition else None)
    self.content_scale = (nnx.Param(jnp.ones((len(self.modalities),), jnp.float32))
                          if self.scoring == "dot" and self.modalities else None)
    # Residual fusion adds an item's gated content at weight 1 next to its ID vector, so a warm
    # item with a strong ID signal cannot turn its content down. A learned per-item weight on
    # the content term lets it (docs/TUNING.md §10: no gain on MovieLens); items without a
    # trained ID (cold) keep weight 1, the scale the in-batch content-only term trains the
    # encoder at.
    # Starts at ``item_content_scale_init`` (1: the plain residual model; 0: the ID-only model,
    # content learned in where it helps) and, being 1-D, is not weight-decayed.
    content_scaled = bool(cfg.get("item_content_scale", False))
    if content_scaled and (cfg.fusion != "residual" or not self.modalities):
      raise ValueError("model.item_content_scale weighs content next to the ID source: it "
                       "needs model.fusion='residual' and at least one modality")
    self.item_content_scale = (
        nnx.Param(jnp.full((num_items,), cfg.get("item_content_scale_init", 1.0), jnp.float32))
        if content_scaled else None)
    # ID dropout (as in DropoutNet): hiding the ID source for a share of training positives
    # teaches the gate and the user model to score from content alone -- what cold items need.
    self.id_dropout = nnx.Dropout(cfg.item_id.dropout, rngs=rngs)
    # Content dropout, the converse: hiding an item's modalities in the catalogue term makes the
    # ID path score on its own, where joint training otherwise lets cached content stand in for
    # it. At 0.5 it strengthens the ID path but not the fused score (docs/TUNING.md §22).
    # Built only when used: a Dropout draws a key from ``rngs``, which would shift every later
    # initial weight and so every earlier measured fit of the default config.
    rate = cfg.get("content_dropout", 0.0)
    self.content_dropout = nnx.Dropout(rate, rngs=rngs) if rate else None
    self.fusion = Fusion(cfg.fusion, len(self.sources), d, cfg.gate_dim, cfg.gate_hidden,
                         rngs=rngs, has_id_source=self.use_item_id)
    u = cfg.user
    self.user_encoder = UserEncoder(
        num_users=num_users, embed_dim=d, history_len=u.history_len, depth=u.depth,
        num_heads=u.num_heads, use_id=u.use_id, dropout=u.dropout, rngs=rngs,
        kind=u.get("kind", "transformer"), causal=u.get("causal", False), normalize=normalize,
        history_dropout=u.get("history_dropout", 0.0), recent=u.get("recent", 0))
    if self.history_fusion == "gated":
      self.history_context = nnx.Linear(2 * d, d, rngs=rngs)
    elif self.history_fusion == "sum" and self.modalities:
      self.history_content = nnx.Linear(d, d, rngs=rngs)
    if self.history_fusion == "id" and not self.use_item_id:
      raise ValueError("model.history_fusion='id' reads history from item IDs: needs item_id.use")
    self.log_temperature = nnx.Param(jnp.log(jnp.asarray(cfg.temperature, jnp.float32)))
    self.contrastive_log_temperature = nnx.Param(
        jnp.log(jnp.asarray(cfg.contrastive_temperature, jnp.float32)))
    m = len(self.modalities)
    # An ID-only model still keeps one (empty) cache slot: Orbax cannot save zero-size arrays.
    self.cache_embeddings = ItemCache(jnp.zeros((num_items, max(m, 1), d), jnp.float32))
    self.cache_presence = ItemCache(jnp.zeros((num_items, max(m, 1)), bool))
    # Which items were trained on (have an ID): the negatives of the full-catalogue softmax.
    self.cache_has_id = ItemCache(jnp.zeros((num_items,), bool))

  # ---- items -------------------------------------------------------------------------------

  def encode_content(self, content: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-modality unit embeddings [B, M, d] (zero where absent) and presence [B, M]."""
    return self.encoder(content)

  def item_sources(self, item_id: jax.Array, has_id: jax.Array, content_emb: jax.Array,
                   presence: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The fusion sources: emb [..., S, d], present [..., S] (content, then the ID if used)."""
    if self.content_scale is not None:
      content_emb = content_emb * self.content_scale[...][:, None]
    if not self.use_item_id:
      return content_emb, presence
    id_emb = self.item_embeddings(item_id)
    if self.scoring == "cosine":
      id_emb = l2_normalize(id_emb)
    emb = jnp.concatenate([content_emb, id_emb[..., None, :]], axis=-2)
    return emb, jnp.concatenate([presence, has_id[..., None]], axis=-1)

  def item_table(self, item_id: jax.Array, has_id: jax.Array, content_emb: jax.Array,
                 presence: jax.Array) -> dict[str, jax.Array]:
    table = self.fusion.item_table(*self.item_sources(item_id, has_id, content_emb, presence))
    if self.item_content_scale is not None:
      # After the gate's inputs were taken: the weight scales the content's score, not its gate.
      scale = jnp.where(has_id, self.item_content_scale[...][item_id], 1.0)
      per_source = jnp.concatenate([jnp.broadcast_to(scale[..., None], presence.shape),
                                    jnp.ones_like(scale)[..., None]], axis=-1)
      table["emb"] = table["emb"] * per_source[..., None]
    if self.item_bias is not None:
      # Popularity is an ID-side fact: an item without a trained ID (cold) gets no bias.
      table["score_bias"] = self.item_bias[...][item_id] * has_id.astype(jnp.float32)
    if self.item_item is not None or self.transition is not None:
      # fusion.fused_scores adds users["item_item"] and users["transition"] [:, item_id] where
      # the item has its ID.
      table["item_id"] = item_id
      table["id_weight"] = has_id.astype(jnp.float32)
    return table

  # ---- users -------------------------------------------------------------------------------

  def projected_content(self, content: jax.Array, present: jax.Array) -> jax.Array:
    """``history_fusion='sum'``'s content input [..., d]: a projection of the mean of an item's
    present modalities (content [..., M, d], present [..., M]); zero for an item with none."""
    count = jnp.maximum(jnp.sum(present, axis=-1, keepdims=True), 1)
    mean = jnp.sum(content * present[..., None], axis=-2) / count
    return self.history_content(mean) * jnp.any(present, -1, keepdims=True)

  def history_vectors(self, id_emb: jax.Array, history: jax.Array, history_mask: jax.Array,
                      *, per_item: bool | None = None) -> jax.Array:
    """[B, L, d] input vectors of the history items (content read from the item cache).

    ``per_item`` (``history_fusion='sum'``): project the content of every catalogue item once
    and gather the history's rows, instead of projecting every history slot; the same values
    (an item's projection depends on that item alone). Default: whichever has fewer rows --
    on MovieLens 1,682 items against 128 x 768 slots, a d x d matmul 58 times smaller.
    """
    m = len(self.modalities)
    if self.history_fusion in ("sum", "id"):
      # The ID input embedding plus (sum) a projection of the mean present content; ``id`` keeps
      # content out of the user model, which then reads the items' IDs as an ID-only model does.
      vectors = jnp.zeros(history.shape + (self.embed_dim,))
      if self.modalities and self.history_fusion == "sum":
        if per_item is None:
          # An exported program's batch is symbolic, so the sizes cannot be compared: per item
          # is right at any size.
          per_item = not isinstance(history.size, int) or self.num_items < history.size
        cache = jax.lax.stop_gradient(self.cache_embeddings[...][:, :m])
        present = self.cache_presence[...][:, :m]
        if per_item:
          vectors = self.projected_content(cache, present)[history]
        else:
          vectors = self.projected_content(cache[history], present[history])
      if self.use_item_id:
        table = (self.history_embeddings if self.history_embeddings is not None
                 else self.item_embeddings)
        vectors = vectors + table(history) * self.cache_has_id[...][history][..., None]
      return vectors * history_mask[..., None]
    hist_content = jax.lax.stop_gradient(self.cache_embeddings[...][history][..., :m, :])
    hist_present = self.cache_presence[...][history][..., :m] & history_mask[..., None]
    hist_table = self.item_table(history, history_mask, hist_content, hist_present)
    # The gate needs a user before the user exists: fuse history items with a context made of
    # the ID embedding and the mean of the history's present content.
    weights_hist = hist_present.astype(jnp.float32)[..., None]
    content_mean = jnp.sum(hist_content * weights_hist, axis=(1, 2)) / jnp.maximum(
        jnp.sum(weights_hist, axis=(1, 2)), 1.0)
    context = l2_normalize(self.history_context(jnp.concatenate([id_emb, content_mean], -1)))
    weights = self.fusion.row_weights(self.fusion.user_query(context), hist_table)
    return jnp.sum(weights[..., None] * hist_table["emb"], axis=-2)

  def encode_users(self, user_id: jax.Array, user_has_id: jax.Array, history: jax.Array,
                   history_mask: jax.Array, per_position: bool = False,
                   fixed_terms: bool = True) -> dict[str, jax.Array]:
    """User vectors [B, d] ([B, L, d] with ``per_position``) and their gate queries.

    ``fixed_terms=False`` leaves out the terms weighed after training (``ease_fixed``'s
    item-item term, the transition term): training passes it, since their weight is 0 there
    and each costs a [B, N] x [N, N] matmul a step. Per-position rows (training only) never
    carry them."""
    id_emb = self.user_encoder.id_embedding(user_id, user_has_id)
    hist_vectors = self.history_vectors(id_emb, history, history_mask)
    user = self.user_encoder(id_emb, hist_vectors, history_mask, per_position=per_position)
    users = {"emb": user, "query": self.fusion.user_query(user)}
    fixed_terms = fixed_terms and not per_position
    if self.item_item is not None and (self.item_item_setting is None or fixed_terms):
      if per_position:
        raise ValueError("model.item_item scores from a whole history: no per-position form "
                         "(switch it off for causal next-item rows)")
      users["item_item"] = self.item_item_scores(history, history_mask)
    if self.transition is not None and fixed_terms:
      users["transition"] = self.transition_scores(history, history_mask)
    return users

  def transition_scores(self, history: jax.Array, history_mask: jax.Array) -> jax.Array:
    """[B, N]: weight * sum_k decay^(k-1) P[h_k, :] over the latest ``transition_window``
    history items with a trained ID (history left-padded, most recent last)."""
    weight, decay = self.transition_setting[...][0], self.transition_setting[...][1]
    window = min(self.transition_window, history.shape[1])
    recent, mask = history[:, -window:], history_mask[:, -window:]
    age = jnp.arange(window - 1, -1, -1, dtype=jnp.float32)    # 0 for the latest slot
    per_slot = jnp.where(age == 0, 1.0, decay ** age)           # decay 0: the latest alone
    weights = jnp.where(mask & self.cache_has_id[...][recent], per_slot[None, :], 0.0)
    rows = jnp.arange(history.shape[0])[:, None]
    recency = jnp.zeros((history.shape[0], self.num_items), jnp.float32).at[rows, recent].add(
        weights)
    return weight * (recency @ self.transition[...])

  def item_item_scores(self, history: jax.Array, history_mask: jax.Array) -> jax.Array:
    """[B, N]: sum_{j in history} W[j, :] over the history items with a trained ID, divided by
    sqrt(n) (``learned``), times the learned scale (``ease``) or the set weight
    (``ease_fixed``)."""
    weights = (history_mask & self.cache_has_id[...][history]).astype(jnp.float32)
    rows = jnp.arange(history.shape[0])[:, None]
    # A multi-hot row times W: a [B, N] x [N, N] matmul; gathering W's rows per history item
    # instead would build [B, L, N].
    multi_hot = jnp.zeros((history.shape[0], self.num_items), jnp.float32).at[
        rows, history].add(weights)
    if self.item_item_scale is not None:
      return (multi_hot @ self.item_item[...]) * self.item_item_scale[...]
    if self.item_item_setting is not None:
      return (multi_hot @ self.item_item[...]) * self.item_item_setting[...][0]
    count = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
    return (multi_hot * jax.lax.rsqrt(count)) @ self.item_item[...]

  # ---- scores ------------------------------------------------------------------------------

  @property
  def inverse_temperature(self) -> jax.Array:
    if self.scoring == "dot":
      return jnp.ones(())   # the vectors' norms carry the scale
    return _clipped_inverse_temperature(self.log_temperature[...])

  @property
  def contrastive_inverse_temperature(self) -> jax.Array:
    return _clipped_inverse_temperature(self.contrastive_log_temperature[...])

  def score(self, users: Mapping[str, jax.Array], table: Mapping[str, jax.Array]) -> jax.Array:
    """Logits [U, I] of every user against every item of ``table``."""
    return self.fusion.scores(users, table) * self.inverse_temperature

  def catalogue_table(self, item_id: jax.Array, content_emb: jax.Array, presence: jax.Array,
                      has_id: jax.Array, valid: jax.Array, *, hide_ids: bool = False
                      ) -> tuple[dict[str, jax.Array], jax.Array]:
    """(table of every item, candidates [N]): cached content with the batch's fresh encodings
    written in, all stop-gradient; ``hide_ids`` scores content alone (the cold-item view).

    Candidates are the items trained on (have an ID): the negatives of a catalogue softmax.
    """
    rows = jnp.where(valid, item_id, self.num_items)  # padding -> dropped
    m = len(self.modalities)
    content_emb, presence = self.to_cache_width(content_emb, presence)
    emb = self.cache_embeddings[...].at[rows].set(content_emb, mode="drop")[:, :m]
    present = self.cache_presence[...].at[rows].set(presence, mode="drop")[:, :m]
    trained = self.cache_has_id[...].at[rows].set(has_id, mode="drop")
    has = jnp.zeros_like(trained) if hide_ids else trained
    if self.use_item_id and not hide_ids:
      # One draw per catalogue item, so an item's positive and negative uses agree.
      has = trained & (self.id_dropout(jnp.ones(trained.shape)) > 0)
      # One draw per (item, modality): items with one modality hidden, as missing_modality has.
      if self.content_dropout is not None:
        present = present & (self.content_dropout(jnp.ones(present.shape)) > 0)
    table = self.item_table(jnp.arange(self.num_items), has, jax.lax.stop_gradient(emb), present)
    return table, trained

  def __call__(self, batch: Mapping[str, jax.Array], full_catalogue: bool = False,
               content: tuple[jax.Array, jax.Array] | None = None,
               users: Mapping[str, jax.Array | None] | None = None,
               in_batch_logits: bool = True) -> dict[str, jax.Array]:
    """Training forward pass over a (global) batch: logits and what the losses need.

    Always: ``logits`` [B, B], each row's user against the batch's positives (in-batch
    negatives). With ``full_catalogue`` also ``catalogue_logits`` [B, N] ([B, L, N] for a
    causal per-user batch, [B, K, N] when it carries ``target_positions``) against every
    item, all read as stop-gradient content (the batch's items with their fresh values, the
    rest from the item cache): the user model, the gate and the ID table then see every
    negative every step, while the encoder is trained only by the in-batch term. Letting the
    encoder's gradient in through the positives alone would be biased -- a pull on each
    positive and no push on the cached negatives -- and collapses all content toward the
    average user.

    Per-user batches (with ``targets``) score the in-batch term from content alone (ID hidden):
    the encoder and the gate learn to stand without the ID, which cold items need;
    ``model.in_batch_with_id`` scores it from every source instead, as an ID-only model's is.

    ``content``: the batch's (content_emb [B, M, d], presence [B, M]) computed elsewhere (the
    gradient-caching step encodes them in micro-batches, ``recfusion_jax.gradcache``); the
    encoder is then not run here, and nothing else in this pass uses it. ``users``: likewise
    the batch's ``encode_users`` output (per position for a causal per-user batch), used
    instead of running the user tower.

    ``in_batch_logits=False`` leaves out ``logits``: a tiled loss scores ``in_batch_users``
    against ``in_batch_table`` (always returned) tile by tile instead (``train.compute_losses``
    with ``loss_tile``), so no [B, B] array is built here.
    """
    content_emb, presence = self.encode_content(batch) if content is None else content
    item_id = batch["item_id"]
    per_user = "targets" in batch
    per_position = per_user and self.user_encoder.causal
    if users is None:
      users = self.encode_users(batch["user_id"], batch["user_has_id"], batch["history"],
                                batch["history_mask"], per_position=per_position,
                                fixed_terms=False)
    last = ({k: v[:, -1] if v is not None else None for k, v in users.items()}
            if per_position else users)
    has_id = batch["item_has_id"]
    if per_user and self.modalities and not self.in_batch_with_id:
      has_id = jnp.zeros_like(has_id)
    elif self.use_item_id:
      has_id = has_id & (self.id_dropout(jnp.ones(has_id.shape)) > 0)
    table = self.item_table(item_id, has_id, content_emb, presence)
    if not self.in_batch_user_gradient:
      # Content follows the user space that the ID-side catalogue term learns, instead of
      # pulling that space toward what content alone can score (docs/TUNING.md §13).
      # The gate's query is recomputed from the stopped vector: its own weights still learn.
      emb = jax.lax.stop_gradient(last["emb"])
      last = {**last, "emb": emb, "query": self.fusion.user_query(emb)}
    out = {"content_emb": content_emb, "presence": presence,
           "in_batch_users": last, "in_batch_table": table,
           "gate_weights": self.fusion.row_weights(last.get("query"), table)}
    if in_batch_logits:
      out["logits"] = self.score(last, table)
    if full_catalogue:
      catalogue, trained = self.catalogue_table(item_id, content_emb, presence,
                                                batch["item_has_id"], batch["example_mask"])
      flat = users
      if per_position:
        if "target_positions" in batch:   # only the sampled slots are scored (data.examples)
          slots = batch["target_positions"][:, :, None]
          flat = {k: jnp.take_along_axis(v, slots, axis=1) if v is not None else None
                  for k, v in users.items()}
        b, length, d = flat["emb"].shape
        flat = {k: v.reshape(b * length, -1) if v is not None else None
                for k, v in flat.items()}
      logits = self.score(flat, catalogue)
      if per_position:
        logits = logits.reshape(b, length, -1)
      out["catalogue_logits"] = logits
      out["candidates"] = trained
    return out

  # ---- cache -------------------------------------------------------------------------------

  def to_cache_width(self, content_emb: jax.Array, presence: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """Encodings [..., M, d] as the cache stores them (one empty slot when M = 0)."""
    if self.modalities:
      return content_emb, presence
    pad = content_emb.shape[:-2]
    return (jnp.zeros(pad + (1, self.embed_dim), content_emb.dtype),
            jnp.zeros(pad + (1,), bool))

  def write_cache(self, item_id: jax.Array, content_emb: jax.Array, presence: jax.Array,
                  valid: jax.Array, has_id: jax.Array | None = None) -> None:
    """Stores fresh encodings; rows with ``valid`` False (batch padding) are dropped."""
    rows = jnp.where(valid, item_id, self.num_items)  # out of range -> dropped by mode="drop"
    content_emb, presence = self.to_cache_width(content_emb, presence)
    self.cache_embeddings[...] = self.cache_embeddings[...].at[rows].set(
        jax.lax.stop_gradient(content_emb), mode="drop")
    self.cache_presence[...] = self.cache_presence[...].at[rows].set(presence, mode="drop")
    if has_id is not None:
      self.cache_has_id[...] = self.cache_has_id[...].at[rows].set(has_id, mode="drop")


def source_names(model: RecFusion) -> tuple[str, ...]:
  """Names of the fusion sources, in the order of the gate's last axis."""
  return model.sources if model.fusion.kind != "concat" else ("fused",)


__all__ = ["RecFusion", "ItemCache", "ItemItemPrior", "ScoringSetting", "source_names",
           "MODALITIES"]
