"""User model: optional user-ID embedding + a small Transformer over the fused history items.

The sequence is [user token, h_1, ..., h_L] with learned positions; the user token starts as a
learned default plus the user's ID embedding (when the user has one), and its output is the
user representation. A user with no history and no ID therefore still gets a representation:
the learned default, which training pushes toward "what everybody likes".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recfusion_jax.models.encoder import l2_normalize
from recfusion_jax.models.transformer import Trunk


class UserEncoder(nnx.Module):

  def __init__(self, *, num_users: int, embed_dim: int, history_len: int, depth: int,
               num_heads: int, use_id: bool, dropout: float, rngs: nnx.Rngs):
    small = nnx.initializers.normal(0.02)
    self.use_id = use_id
    self.user_embeddings = (
        nnx.Embed(num_users, embed_dim, embedding_init=small, rngs=rngs) if use_id else None)
    self.default_user = nnx.Param(small(rngs.params(), (embed_dim,)))
    self.position_embeddings = nnx.Param(small(rngs.params(), (history_len + 1, embed_dim)))
    self.history_len = history_len
    self.trunk = Trunk(width=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=2 * embed_dim,
                       pre_ln=True, ln_eps=1e-6, activation="gelu", dropout=dropout, rngs=rngs)
    self.out = nnx.Linear(embed_dim, embed_dim, rngs=rngs)

  def id_embedding(self, user_id: jax.Array, has_id: jax.Array) -> jax.Array:
    """[B, d]; zero for users without a trained ID (cold users) or when IDs are switched off."""
    if self.user_embeddings is None:
      return jnp.zeros(user_id.shape + (self.default_user.shape[0],))
    return self.user_embeddings(user_id) * has_id[:, None].astype(jnp.float32)

  def __call__(self, id_emb: jax.Array, history: jax.Array, history_mask: jax.Array) -> jax.Array:
    """id_emb [B, d], fused history items [B, L, d] -> unit user vectors [B, d]."""
    if history.shape[1] > self.history_len:
      raise ValueError(f"history of length {history.shape[1]} > history_len {self.history_len}")
    user_token = (self.default_user[...] + id_emb)[:, None]
    x = jnp.concatenate([user_token, history], axis=1)
    x = x + self.position_embeddings[...][None, :x.shape[1]]
    mask = jnp.concatenate([jnp.ones_like(history_mask[:, :1]), history_mask], axis=1)
    return l2_normalize(self.out(self.trunk(x, mask)[:, 0]))
