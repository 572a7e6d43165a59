"""User model: optional user-ID embedding + a model of the user's history items.

Two kinds (``model.user.kind``):

  transformer  the sequence [user token, h_1, ..., h_L] with learned positions through a small
               Transformer; the user token starts as a learned default plus the user's ID
               embedding (when the user has one). Bidirectional, the user token's output is the
               user; ``causal`` (next-item protocols) lets position t attend only to the user
               token and h_1..h_t, as SASRec does, and every position's output is the user
               state after item t (trained to predict item t + 1).
  pool         the learned default plus the ID embedding plus sum_j h_j / sqrt(n), then a
               linear map: a denoising linear autoencoder over the history. No order, no
               attention: cheap, and on random hold-outs it generalises better. ``causal``:
               the state after item t pools h_1..h_t (prefix sums), for next-item rows.
               ``recent`` = K > 0 adds sum_k w_k h_{t-k} over the latest K items with learned
               weights w (zero at init): the order a next-item protocol needs, at the cost of
               K shifted sums instead of attention.

A user with no history and no ID still gets a representation: the learned default, which
training pushes toward "what everybody likes". ``history_dropout`` hides each history item with
that probability in training (denoising; the cloze examples already hide the targets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recfusion_jax.models.encoder import l2_normalize
from recfusion_jax.models.transformer import Trunk

USER_KINDS = ("transformer", "pool")


class UserEncoder(nnx.Module):

  def __init__(self, *, num_users: int, embed_dim: int, history_len: int, depth: int,
               num_heads: int, use_id: bool, dropout: float, rngs: nnx.Rngs,
               kind: str = "transformer", causal: bool = False, normalize: bool = True,
               history_dropout: float = 0.0, recent: int = 0):
    if kind not in USER_KINDS:
      raise ValueError(f"model.user.kind={kind!r}; choose from {USER_KINDS}")
    if recent and kind != "pool":
      raise ValueError("model.user.recent needs model.user.kind='pool'")
    if not 0 <= recent <= history_len:
      raise ValueError(f"model.user.recent={recent} must be in [0, history_len={history_len}]")
    small = nnx.initializers.normal(0.02)
    self.kind, self.causal, self.normalize = kind, causal, normalize
    self.use_id = use_id
    self.user_embeddings = (
        nnx.Embed(num_users, embed_dim, embedding_init=small, rngs=rngs) if use_id else None)
    self.default_user = nnx.Param(small(rngs.params(), (embed_dim,)))
    self.history_len = history_len
    self.history_dropout = nnx.Dropout(history_dropout, rngs=rngs)
    if kind == "transformer":
      self.position_embeddings = nnx.Param(small(rngs.params(), (history_len + 1, embed_dim)))
      self.trunk = Trunk(width=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_dim=2 * embed_dim, pre_ln=True, ln_eps=1e-6, activation="gelu",
                         dropout=dropout, rngs=rngs)
    self.recent_weights = nnx.Param(jnp.zeros((recent,))) if recent else None
    # Dot scoring reads the user's norm. After the Transformer's final LayerNorm a default
    # `out` starts every user at norm ~sqrt(d), random scores that the catalogue loss first
    # removes by making every user the same (docs/TUNING.md §13): start them at the origin,
    # as the pooled user nearly does. Cosine scoring normalises, so a zero user is no start.
    zero_out = kind == "transformer" and not normalize
    self.out = nnx.Linear(embed_dim, embed_dim, rngs=rngs,
                          **({"kernel_init": nnx.initializers.zeros} if zero_out else {}))

  def id_embedding(self, user_id: jax.Array, has_id: jax.Array) -> jax.Array:
    """[B, d]; zero for users without a trained ID (cold users) or when IDs are switched off."""
    if self.user_embeddings is None:
      return jnp.zeros(user_id.shape + (self.default_user.shape[0],))
    return self.user_embeddings(user_id) * has_id[:, None].astype(jnp.float32)

  def __call__(self, id_emb: jax.Array, history: jax.Array, history_mask: jax.Array,
               per_position: bool = False) -> jax.Array:
    """id_emb [B, d], history item vectors [B, L, d] (most recent last) -> users [B, d].

    ``per_position`` (causal only): [B, L, d], the user after each history position.
    """
    if history.shape[1] > self.history_len:
      raise ValueError(f"history of length {history.shape[1]} > history_len {self.history_len}")
    if per_position and not self.causal:
      raise ValueError("per-position user states need a causal user model")
    keep = self.history_dropout(jnp.ones(history_mask.shape)) > 0
    history_mask = history_mask & keep
    user_token = self.default_user[...] + id_emb
    if self.kind == "pool":
      weights = history_mask.astype(history.dtype)[..., None]
      present = history * weights
      # Right-aligned windows: the last causal state is the pool of the whole window, so only
      # per-position states need the prefix form.
      if per_position:   # every position t pools items 1..t (padding comes first)
        count = jnp.maximum(jnp.cumsum(weights, axis=1), 1.0)
        pooled = user_token[:, None] + jnp.cumsum(present, axis=1) * jax.lax.rsqrt(count)
      else:
        count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        pooled = user_token + jnp.sum(present, axis=1) * jax.lax.rsqrt(count)
      if self.recent_weights is not None:
        w = self.recent_weights[...].astype(history.dtype)
        if per_position:   # position t reads t, t-1, ..., t-K+1 (zeros before the window)
          shifted = [jnp.pad(present, ((0, 0), (k, 0), (0, 0)))[:, :present.shape[1]]
                     for k in range(w.shape[0])]
          pooled = pooled + sum(w[k] * x for k, x in enumerate(shifted))
        else:              # the latest K items, most recent first
          latest = present[:, ::-1][:, :w.shape[0]]
          pooled = pooled + jnp.einsum("k,bkd->bd", w, latest)
      return self._finish(self.out(pooled))
    x = jnp.concatenate([user_token[:, None], history], axis=1)
    x = x + self.position_embeddings[...][None, :x.shape[1]]
    mask = jnp.concatenate([jnp.ones_like(history_mask[:, :1]), history_mask], axis=1)
    hidden = self.trunk(x, mask, causal=self.causal)
    if self.causal:
      # Right-aligned histories: the last position has seen the whole (latest) history.
      states = self.out(hidden[:, 1:])
      return self._finish(states if per_position else states[:, -1])
    return self._finish(self.out(hidden[:, 0]))

  def _finish(self, users: jax.Array) -> jax.Array:
    return l2_normalize(users) if self.normalize else users
