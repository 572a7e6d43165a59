"""RecFusion: content encoder + gated fusion + user model, and the item embedding cache.

Data flow of one training step (B examples, each a user with history and one positive item):

  positive items' content --ContentEncoder--> e_{i,m} (with gradient) --+--> item table
  history item ids --cache lookup--> e_{h,m} (no gradient) --fusion--> history vectors
  user id + history vectors --UserEncoder--> u --> scores [B, B] over the global batch

Efficiency: the content encoder runs once per positive item per step. History items are never
re-encoded; their per-modality embeddings come from ``item_cache``, a non-trainable table that
every step overwrites with the fresh (stop-gradient) encodings of its positives and that the
train loop re-encodes in full every ``cache_refresh_every`` steps. History items so cost one
gather each, and the encoder is trained by the positives' side of the loss.
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


class ItemCache(nnx.Variable):
  """Non-trainable state: per-modality item embeddings reused for history items."""


def _clipped_inverse_temperature(log_temperature: jax.Array) -> jax.Array:
  # A clipped temperature keeps logits bounded (CLIP clips its logit scale the same way).
  return 1.0 / jnp.clip(jnp.exp(log_temperature), 0.01, 1.0)


class RecFusion(nnx.Module):
  """The whole recommender. ``cfg`` is ``config.model`` (see configs/tiny.py)."""

  def __init__(self, cfg: Mapping[str, Any], *, num_users: int, num_items: int, rngs: nnx.Rngs):
    d = cfg.embed_dim
    self.embed_dim = d
    self.num_items = num_items
    self.encoder = ContentEncoder(cfg.encoder, tuple(cfg.modalities), d, rngs=rngs)
    self.modalities = self.encoder.modalities
    self.use_item_id = bool(cfg.item_id.use)
    self.sources = self.modalities + (("id",) if self.use_item_id else ())
    self.item_embeddings = (
        nnx.Embed(num_items, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        if self.use_item_id else None)
    # ID dropout (as in DropoutNet): hiding the ID source for a share of training positives
    # teaches the gate and the user model to score from content alone -- what cold items need.
    self.id_dropout = nnx.Dropout(cfg.item_id.dropout, rngs=rngs)
    self.fusion = Fusion(cfg.fusion, len(self.sources), d, cfg.gate_dim, cfg.gate_hidden,
                         rngs=rngs)
    self.user_encoder = UserEncoder(
        num_users=num_users, embed_dim=d, history_len=cfg.user.history_len,
        depth=cfg.user.depth, num_heads=cfg.user.num_heads, use_id=cfg.user.use_id,
        dropout=cfg.user.dropout, rngs=rngs)
    self.history_context = nnx.Linear(2 * d, d, rngs=rngs)
    self.log_temperature = nnx.Param(jnp.log(jnp.asarray(cfg.temperature, jnp.float32)))
    self.contrastive_log_temperature = nnx.Param(
        jnp.log(jnp.asarray(cfg.contrastive_temperature, jnp.float32)))
    m = len(self.modalities)
    self.cache_embeddings = ItemCache(jnp.zeros((num_items, m, d), jnp.float32))
    self.cache_presence = ItemCache(jnp.zeros((num_items, m), bool))
    # Which items were trained on (have an ID): the negatives of the full-catalogue softmax.
    self.cache_has_id = ItemCache(jnp.zeros((num_items,), bool))

  # ---- items -------------------------------------------------------------------------------

  def encode_content(self, content: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-modality unit embeddings [B, M, d] (zero where absent) and presence [B, M]."""
    return self.encoder(content)

  def item_sources(self, item_id: jax.Array, has_id: jax.Array, content_emb: jax.Array,
                   presence: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds the ID source (when enabled): emb [..., S, d], present [..., S]."""
    if not self.use_item_id:
      return content_emb, presence
    id_emb = l2_normalize(self.item_embeddings(item_id))
    emb = jnp.concatenate([content_emb, id_emb[..., None, :]], axis=-2)
    return emb, jnp.concatenate([presence, has_id[..., None]], axis=-1)

  def item_table(self, item_id: jax.Array, has_id: jax.Array, content_emb: jax.Array,
                 presence: jax.Array) -> dict[str, jax.Array]:
    return self.fusion.item_table(*self.item_sources(item_id, has_id, content_emb, presence))

  # ---- users -------------------------------------------------------------------------------

  def encode_users(self, user_id: jax.Array, user_has_id: jax.Array, history: jax.Array,
                   history_mask: jax.Array) -> dict[str, jax.Array]:
    """User vectors [B, d] and gate queries; history items are read from the item cache."""
    id_emb = self.user_encoder.id_embedding(user_id, user_has_id)
    hist_content = jax.lax.stop_gradient(self.cache_embeddings[...][history])  # [B, L, M, d]
    hist_present = self.cache_presence[...][history] & history_mask[..., None]
    hist_table = self.item_table(history, history_mask, hist_content, hist_present)
    # The gate needs a user before the user exists: fuse history items with a context made of
    # the ID embedding and the plain mean of the history's content.
    weights_hist = history_mask[..., None].astype(jnp.float32)
    content_mean = jnp.sum(jnp.sum(hist_content, axis=2) * weights_hist, axis=1) / jnp.maximum(
        jnp.sum(weights_hist, axis=1) * len(self.modalities), 1.0)
    context = l2_normalize(self.history_context(jnp.concatenate([id_emb, content_mean], -1)))
    weights = self.fusion.row_weights(self.fusion.user_query(context), hist_table)
    hist_vectors = jnp.sum(weights[..., None] * hist_table["emb"], axis=-2)  # [B, L, d]
    user = self.user_encoder(id_emb, hist_vectors, history_mask)
    return {"emb": user, "query": self.fusion.user_query(user)}

  # ---- scores ------------------------------------------------------------------------------

  @property
  def inverse_temperature(self) -> jax.Array:
    return _clipped_inverse_temperature(self.log_temperature[...])

  @property
  def contrastive_inverse_temperature(self) -> jax.Array:
    return _clipped_inverse_temperature(self.contrastive_log_temperature[...])

  def score(self, users: Mapping[str, jax.Array], table: Mapping[str, jax.Array]) -> jax.Array:
    """Logits [U, I] of every user against every item of ``table``."""
    return self.fusion.scores(users["emb"], users.get("query"), table) * self.inverse_temperature

  def __call__(self, batch: Mapping[str, jax.Array], full_catalogue: bool = False
               ) -> dict[str, jax.Array]:
    """Training forward pass over a (global) batch: logits and what the losses need.

    Always: ``logits`` [B, B] against the batch's positives (in-batch negatives). With
    ``full_catalogue`` also ``catalogue_logits`` [B, N] against every item, all read as
    stop-gradient content (the batch's items with their fresh values, the rest from the item
    cache): the user model, the gate and the ID table then see every negative every step,
    while the encoder is trained only by the in-batch term. Letting the encoder's gradient in
    through the positives alone would be biased -- a pull on each positive and no push on the
    cached negatives -- and collapses all content toward the average user (measured, see
    docs/TUNING.md).
    """
    content_emb, presence = self.encode_content(batch)
    item_id = batch["item_id"]
    users = self.encode_users(batch["user_id"], batch["user_has_id"], batch["history"],
                              batch["history_mask"])
    has_id = batch["item_has_id"]
    if self.use_item_id:
      has_id = has_id & (self.id_dropout(jnp.ones(has_id.shape)) > 0)
    table = self.item_table(item_id, has_id, content_emb, presence)
    out = {"content_emb": content_emb, "presence": presence,
           "logits": self.score(users, table),
           "gate_weights": self.fusion.row_weights(users.get("query"), table)}
    if full_catalogue:
      rows = jnp.where(batch["example_mask"], item_id, self.num_items)  # padding -> dropped
      catalogue_emb = self.cache_embeddings[...].at[rows].set(content_emb, mode="drop")
      catalogue_presence = self.cache_presence[...].at[rows].set(presence, mode="drop")
      trained = self.cache_has_id[...].at[rows].set(batch["item_has_id"], mode="drop")
      catalogue_has_id = trained
      if self.use_item_id:
        # One draw per catalogue item, so an item's positive and negative uses agree.
        catalogue_has_id = trained & (self.id_dropout(jnp.ones(trained.shape)) > 0)
      catalogue = self.item_table(jnp.arange(self.num_items), catalogue_has_id,
                                  jax.lax.stop_gradient(catalogue_emb), catalogue_presence)
      out["catalogue_logits"] = self.score(users, catalogue)
      out["candidates"] = trained
    return out

  # ---- cache -------------------------------------------------------------------------------

  def write_cache(self, item_id: jax.Array, content_emb: jax.Array, presence: jax.Array,
                  valid: jax.Array, has_id: jax.Array | None = None) -> None:
    """Stores fresh encodings; rows with ``valid`` False (batch padding) are dropped."""
    rows = jnp.where(valid, item_id, self.num_items)  # out of range -> dropped by mode="drop"
    self.cache_embeddings[...] = self.cache_embeddings[...].at[rows].set(
        jax.lax.stop_gradient(content_emb), mode="drop")
    self.cache_presence[...] = self.cache_presence[...].at[rows].set(presence, mode="drop")
    if has_id is not None:
      self.cache_has_id[...] = self.cache_has_id[...].at[rows].set(has_id, mode="drop")


def source_names(model: RecFusion) -> tuple[str, ...]:
  """Names of the fusion sources, in the order of the gate's last axis."""
  return model.sources if model.fusion.kind != "concat" else ("fused",)


__all__ = ["RecFusion", "ItemCache", "source_names", "MODALITIES"]
