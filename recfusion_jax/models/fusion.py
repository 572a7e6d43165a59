"""Adaptive gated fusion of an item's sources (its modalities plus, when it has one, its ID).

Every source s of item i is a unit vector e_{i,s}; the user is a unit vector u. The score is

    score(u, i) = (1 / tau) * sum_s w_s(u, i) * <u, e_{i,s}>,
    w(u, i)     = softmax over the PRESENT sources of  a_{i,s} + <q_u, k_{i,s}> / sqrt(h),

where a_{i,s} = MLP(e_{i,s} + type_s) says how reliable this item's source looks on its own
(item context), and the bilinear term lets the user decide which sources matter to them
(q_u = W_q u, k_{i,s} = W_k e_{i,s} + key_type_s). Absent sources get weight exactly zero; an
item with no source at all gets all-zero weights and a finite score of 0.

Why this form: the gate is conditioned on the user, yet scoring U users against I items stays
batched matmuls (U x I x S x (d + h) flops) with per-item tables computed once -- full-catalogue
ranking never runs an MLP per (user, item) pair.

``residual`` keeps the ID source outside the convex gate: w_id = 1 when the item has an ID, and
the gate's softmax runs over the present *content* sources only, so

    score(u, i) = <u, e_{i,id}> + sum_{m in content} w_m(u, i) <u, e_{i,m}>  (+ b_i),

a strong collaborative signal plus a user-weighted content correction, instead of a convex
mixture in which ID and content compete for one unit of weight. A cold item (no ID) is scored
from its gated content alone.

``mean`` (uniform weights over present sources) and ``concat`` (one projected vector per item,
user independent) are the ablations; all share this interface. A table may carry
``score_bias`` [I] (a per-item popularity term), added to every user's score of the item, and
``item_id`` [I] with ``id_weight`` [I]: where users carry ``item_item`` [U, N] (a full-rank
history-to-item term, ``RecFusion.item_item_scores``) or ``transition`` [U, N] (a Markov chain's,
``RecFusion.transition_scores``), user u's score of item i gains item_item[u, item_id[i]] *
id_weight[i], and the same of ``transition``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from recfusion_jax.models.encoder import l2_normalize

FUSIONS = ("gated", "mean", "concat", "residual")
GATED = ("gated", "residual")   # kinds with a learned, user-conditioned gate


def masked_softmax(logits: jax.Array, present: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to ``present``; all-absent rows give all zeros."""
  logits = jnp.where(present, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  unnorm = jnp.where(present, jnp.exp(logits - peak), 0.0)
  return unnorm / jnp.maximum(jnp.sum(unnorm, axis=-1, keepdims=True), 1e-30)


class Fusion(nnx.Module):
  """One of FUSIONS over ``num_sources`` unit-vector sources of width ``embed_dim``."""

  def __init__(self, kind: str, num_sources: int, embed_dim: int, gate_dim: int, gate_hidden: int,
               *, rngs: nnx.Rngs, has_id_source: bool = False):
    if kind not in FUSIONS:
      raise ValueError(f"fusion={kind!r}; choose from {FUSIONS}")
    if kind == "residual" and not has_id_source:
      raise ValueError("fusion='residual' adds content to the ID source: needs item_id.use")
    self.kind = kind
    self.gate_dim = gate_dim
    if kind in GATED:
      small = nnx.initializers.normal(0.02)
      self.source_embeddings = nnx.Param(small(rngs.params(), (num_sources, embed_dim)))
      self.gate_hidden = nnx.Linear(embed_dim, gate_hidden, rngs=rngs)
      # No biases where a constant would shift all of an item's source logits equally: softmax
      # ignores it, so it would only be a parameter with zero gradient.
      self.gate_out = nnx.Linear(gate_hidden, 1, use_bias=False, rngs=rngs)
      self.query = nnx.Linear(embed_dim, gate_dim, rngs=rngs)
      self.key = nnx.Linear(embed_dim, gate_dim, use_bias=False, rngs=rngs)
      self.key_source = nnx.Param(small(rngs.params(), (num_sources, gate_dim)))
    elif kind == "concat":
      self.project = nnx.Linear(num_sources * embed_dim, embed_dim, rngs=rngs)

  def item_table(self, emb: jax.Array, present: jax.Array) -> dict[str, jax.Array]:
    """Per-item quantities, computed once per item: emb [..., S', d], present [..., S'] (+ gate)."""
    if self.kind == "concat":
      flat = (emb * present[..., None]).reshape(*emb.shape[:-2], -1)
      fused = l2_normalize(self.project(flat))[..., None, :]
      return {"emb": fused * jnp.any(present, -1)[..., None, None],
              "present": jnp.any(present, axis=-1, keepdims=True)}
    table = {"emb": emb, "present": present}
    if self.kind in GATED:
      hidden = jax.nn.gelu(self.gate_hidden(emb + self.source_embeddings[...]))
      table["bias"] = self.gate_out(hidden)[..., 0]
      table["key"] = self.key(emb) + self.key_source[...]
    return table

  def user_query(self, user: jax.Array) -> jax.Array | None:
    return self.query(user) if self.kind in GATED else None

  def pair_weights(self, query: jax.Array | None, table: dict[str, jax.Array]) -> jax.Array:
    """Weights [U, I, S'] of every user (query [U, h]) for every item (table with leading I)."""
    return pair_weights(query, table, kind=self.kind, gate_dim=self.gate_dim)

  def row_weights(self, query: jax.Array | None, table: dict[str, jax.Array]) -> jax.Array:
    """Weights [B, ..., S'] when row b of the table belongs to user b (query [B, h])."""
    present = table["present"]
    if self.kind not in GATED:
      return masked_softmax(jnp.zeros(present.shape), present)
    extra = (None,) * (present.ndim - 2)
    q = query[(slice(None),) + extra]  # broadcast over any middle axes (history positions)
    logits = table["bias"] + jnp.einsum("b...h,b...sh->b...s", q, table["key"]) / jnp.sqrt(
        float(self.gate_dim))
    return _gate(logits, present, self.kind)

  def scores(self, users: dict[str, jax.Array | None],
             table: dict[str, jax.Array]) -> jax.Array:
    """Un-tempered scores [U, I] = sum_s w_s(u, i) <u, e_{i,s}> (+ the table's extra terms);
    ``users``: {"emb" [U, d], "query" [U, h] or None, optional "item_item" and "transition"
    [U, N]}."""
    return fused_scores(users, table, kind=self.kind, gate_dim=self.gate_dim)


def pair_weights(query: jax.Array | None, table: dict[str, jax.Array], *, kind: str,
                 gate_dim: int) -> jax.Array:
  """Fusion weights [U, I, S'] of every user for every item of a precomputed table."""
  present = table["present"][None]
  if kind not in GATED:
    return masked_softmax(jnp.zeros(present.shape), present)
  logits = table["bias"][None] + jnp.einsum("uh,ish->uis", query, table["key"]) / jnp.sqrt(
      float(gate_dim))
  return _gate(logits, present, kind)


def _gate(logits: jax.Array, present: jax.Array, kind: str) -> jax.Array:
  """Gate weights over the last (source) axis; ``residual``: the last source is the ID, kept at
  weight 1 where present, and the softmax covers the content sources."""
  if kind != "residual":
    return masked_softmax(logits, present)
  id_weight = jnp.broadcast_to(present[..., -1:], logits.shape[:-1] + (1,)).astype(logits.dtype)
  if logits.shape[-1] == 1:   # an ID-only model: nothing to gate
    return id_weight
  content = masked_softmax(logits[..., :-1], present[..., :-1])
  return jnp.concatenate([content, id_weight], axis=-1)


def fused_scores(users: dict[str, jax.Array], table: dict[str, jax.Array], *, kind: str,
                 gate_dim: int) -> jax.Array:
  """Scores [U, I] from user vectors/queries and an item table; no parameters needed.

  A pure function of precomputed tables, so the evaluator can block, shard and jit it freely.
  Equals sum_s pair_weights[u, i, s] * <u, e_{i,s}> (tests/test_model.py checks it against
  that form), computed one source at a time: every intermediate is a [U, I] plane, where the
  [U, I, S] form puts the few sources on the minor axis, which XLA:CPU vectorises poorly (a
  next-item step scores 25,600 user states against 1,682 items x 3 sources: forward and
  backward 2.1x faster this way, docs/TUNING.md §15).
  """
  emb, present = table["emb"], table["present"]
  num_sources = present.shape[-1]
  user = users["emb"]
  masks = [present[:, s][None, :] for s in range(num_sources)]
  if kind in GATED:
    # Residual: the ID (the last source) keeps weight 1 where present; the softmax covers the
    # content sources.
    gated = range(num_sources - 1) if kind == "residual" else range(num_sources)
    scale = 1.0 / jnp.sqrt(float(gate_dim))
    logits = {s: jnp.where(masks[s], table["bias"][None, :, s]
                           + (users["query"] @ table["key"][:, s].T) * scale, -jnp.inf)
              for s in gated}
    weights = _plane_softmax(logits, masks) if logits else {}   # {}: an ID-only residual
  else:   # mean (and concat's single source): uniform over the present sources
    count = jnp.maximum(sum(m.astype(jnp.float32) for m in masks), 1.0)
    weights = {s: masks[s] / count for s in range(num_sources)}
  scores = jnp.zeros((user.shape[0], emb.shape[0]), user.dtype)
  for s in range(num_sources):
    weight = weights.get(s, masks[s].astype(user.dtype))   # residual's ID source
    scores = scores + weight * (user @ emb[:, s].T)
  if "score_bias" in table:
    scores = scores + table["score_bias"][None, :]
  for key in ("item_item", "transition"):   # ID-side [U, N] terms, read by item ID
    if key in users:
      scores = scores + jnp.take(users[key], table["item_id"], axis=1) * table[
          "id_weight"][None, :]
  return scores


def _plane_softmax(logits: dict[int, jax.Array], masks: list[jax.Array]) -> dict[int, jax.Array]:
  """``masked_softmax`` across per-source planes ({source: [U, I] logits, -inf where absent})."""
  peak = functools.reduce(jnp.maximum, logits.values())
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  unnorm = {s: jnp.where(masks[s], jnp.exp(x - peak), 0.0) for s, x in logits.items()}
  total = jnp.maximum(sum(unnorm.values()), 1e-30)
  return {s: x / total for s, x in unnorm.items()}
