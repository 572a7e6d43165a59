"""The in-batch losses of ``losses.py`` from embeddings, in tiles: no [B, B] array, ever.

Same semantics as their naive counterparts (which stay the reference and the small-batch path):

  info_nce             == losses.info_nce(a, b, ...)
  cross_modal_loss     == losses.cross_modal_loss(emb, ...)
  sampled_softmax_loss == losses.sampled_softmax_loss(t * users @ items.T, ...)
  fused_softmax_loss   == losses.sampled_softmax_loss(t * fusion.fused_scores(users, table), ...)

Each takes the GLOBAL batch. With ``mesh`` the loss runs as a ring over the mesh's batch axes
(``recfusion_jax.ops.tiled_lse``), each device keeping its rows; without it the tiles are
computed on the arrays as given -- inside a jit whose batch is sharded, pass the mesh, or XLA
gathers the batch and every device loops over all of its tiles. Both are differentiable with respect to the embeddings (and
everything else that is a float: the table's gate keys and biases, log_q, the temperature),
so a gradient-caching step can take d loss / d embeddings from them directly.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from recfusion_jax.models.fusion import fused_scores
from recfusion_jax.ops.tiled_lse import BATCH_AXES, ScoreFn, paired_lse

DEFAULT_TILE = 1024


def _dot_scores(rows: jax.Array, _, cols: jax.Array, __) -> jax.Array:
  return rows @ cols.T


def _paired_scores(score_fn: ScoreFn, rows: Any, row_consts: Any, cols: Any,
                   col_consts: Any) -> jax.Array:
  """score_fn(row r, column r) for every r: the positives, O(B) work."""
  def one(r, rc, c, cc):
    lead = lambda tree: jax.tree.map(lambda x: x[None], tree)
    return score_fn(lead(r), lead(rc), lead(c), lead(cc))[0, 0]
  return jax.vmap(one)(rows, row_consts, cols, col_consts)


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  # where, not a product: an invalid row's lse is -inf.
  total = jnp.sum(jnp.where(valid, values, 0.0))
  return total / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def _id_columns(*ids: jax.Array | None) -> jax.Array:
  return jnp.stack([jnp.asarray(i, jnp.int32) for i in ids if i is not None], axis=1)


def _softmax_ce(score_fn: ScoreFn, rows: Any, row_consts: Any, cols: Any, col_consts: Any,
                valid: jax.Array, ids: jax.Array, inverse_temperature, col_bias: jax.Array, *,
                both: bool, tile, mesh, axes) -> jax.Array:
  scale = jnp.asarray(inverse_temperature, jnp.float32)
  valid = jnp.asarray(valid, bool)
  lse_rows, lse_cols = paired_lse(score_fn, rows, row_consts, cols, col_consts, scale, col_bias,
                                  valid, ids, tile=tile, both=both, mesh=mesh, axes=axes)
  positive = scale * _paired_scores(score_fn, rows, row_consts, cols, col_consts).astype(
      jnp.float32)
  rows_term = _masked_mean(lse_rows - (positive - col_bias), valid)
  if not both:
    return rows_term
  return 0.5 * (rows_term + _masked_mean(lse_cols - positive, valid))


def info_nce(a: jax.Array, b: jax.Array, valid: jax.Array, item_ids: jax.Array,
             inverse_temperature: jax.Array | float, *, tile: int | tuple[int, int] = DEFAULT_TILE,
             mesh: Mesh | None = None, axes: Sequence[str] = BATCH_AXES) -> jax.Array:
  """Symmetric InfoNCE between paired vectors a[i] <-> b[i] (``losses.info_nce``), tiled.

  a, b [B, d]; invalid rows take no part; examples of the same item are not each other's
  negatives. ``tile`` is the tile edge (or (row, column) edges); ``mesh``/``axes`` select the
  ring over devices.
  """
  return _softmax_ce(_dot_scores, a, (), b, (), valid, _id_columns(item_ids),
                     inverse_temperature, jnp.zeros(a.shape[:1], jnp.float32), both=True,
                     tile=tile, mesh=mesh, axes=axes)


def cross_modal_loss(emb: jax.Array, presence: jax.Array, item_ids: jax.Array, valid: jax.Array,
                     inverse_temperature: jax.Array | float, *,
                     tile: int | tuple[int, int] = DEFAULT_TILE, mesh: Mesh | None = None,
                     axes: Sequence[str] = BATCH_AXES) -> jax.Array:
  """``losses.cross_modal_loss`` with each modality pair's InfoNCE tiled (emb [B, M, d])."""
  total, count = jnp.zeros(()), jnp.zeros(())
  for m, n in itertools.combinations(range(emb.shape[1]), 2):
    both = presence[:, m] & presence[:, n] & valid
    has_pairs = jnp.any(both).astype(jnp.float32)
    total += has_pairs * info_nce(emb[:, m], emb[:, n], both, item_ids, inverse_temperature,
                                  tile=tile, mesh=mesh, axes=axes)
    count += has_pairs
  return total / jnp.maximum(count, 1.0)


def sampled_softmax_loss(users: jax.Array, items: jax.Array, item_ids: jax.Array,
                         log_q: jax.Array, valid: jax.Array,
                         inverse_temperature: jax.Array | float, *,
                         user_ids: jax.Array | None = None,
                         tile: int | tuple[int, int] = DEFAULT_TILE, mesh: Mesh | None = None,
                         axes: Sequence[str] = BATCH_AXES) -> jax.Array:
  """In-batch sampled softmax with logQ correction (``losses.sampled_softmax_loss``), tiled.

  The logits are ``inverse_temperature * users @ items.T`` (users, items [B, d]); column c is
  the positive item of example c. Accidental hits (the row's item at another position) and,
  with ``user_ids``, the row user's other positives in the batch are not negatives.
  """
  return _softmax_ce(_dot_scores, users, (), items, (), valid, _id_columns(item_ids, user_ids),
                     inverse_temperature, jnp.asarray(log_q, jnp.float32), both=False,
                     tile=tile, mesh=mesh, axes=axes)


def fused_softmax_loss(users: Mapping[str, jax.Array | None], table: Mapping[str, jax.Array],
                       item_ids: jax.Array, log_q: jax.Array, valid: jax.Array,
                       inverse_temperature: jax.Array | float, *, kind: str, gate_dim: int,
                       user_ids: jax.Array | None = None,
                       tile: int | tuple[int, int] = DEFAULT_TILE, mesh: Mesh | None = None,
                       axes: Sequence[str] = BATCH_AXES) -> jax.Array:
  """The sampled softmax over gated fusion scores without the [B, B, S] weights.

  Equals ``losses.sampled_softmax_loss(inverse_temperature * fused_scores(users, table, kind=,
  gate_dim=), item_ids, log_q, valid, user_ids)``: ``users`` = {"emb": [B, d], "query": [B, h]
  or None} (``RecFusion.encode_users``), ``table`` = the batch positives' item table
  (``Fusion.item_table``: "emb" [B, S, d], "present" [B, S], and for ``gated`` "bias" [B, S],
  "key" [B, S, h]). Each tile builds the fusion weights of its [tile, tile, S] block only.
  """
  row_data = {k: v for k, v in users.items() if v is not None}
  col_data = {k: v for k, v in table.items() if k != "present"}
  col_consts = {"present": table["present"]}

  def score_fn(rows, _, cols, consts):
    return fused_scores(rows, {**cols, **consts}, kind=kind, gate_dim=gate_dim)

  return _softmax_ce(score_fn, row_data, (), col_data, col_consts, valid,
                     _id_columns(item_ids, user_ids), inverse_temperature,
                     jnp.asarray(log_q, jnp.float32), both=False, tile=tile, mesh=mesh, axes=axes)
