"""Losses, as pure functions of arrays (no model state), each tested against NumPy.

All of them take the GLOBAL batch: under ``jax.jit`` with the batch sharded over the mesh, the
[B, B] logits span every device, so each example's negatives are the positives of all devices.

Masked entries use a large finite negative instead of -inf so that gradients stay finite.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

_MASKED = -1e9


def _row_cross_entropy(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """-log softmax(logits)[r, r] over allowed columns, per row r."""
  logits = jnp.where(allowed, logits, _MASKED)
  return jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  valid = valid.astype(values.dtype)
  return jnp.sum(values * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def sampled_softmax_loss(logits: jax.Array, item_ids: jax.Array, log_q: jax.Array,
                         valid: jax.Array, user_ids: jax.Array | None = None) -> jax.Array:
  """In-batch sampled softmax with logQ correction and accidental-hit masking.

  Args:
    logits: [B, B]; row r = user of example r, column c = positive item of example c.
    item_ids: [B] item of each column.
    log_q: [B] log sampling probability of each column's item. In-batch negatives are drawn in
      proportion to popularity; subtracting log q (Yi et al., RecSys 2019) removes that bias.
    valid: [B] False for padding rows/columns.
    user_ids: optional [B] user of each example; columns of the row's own user at another
      position (that user's other positives) are then excluded too.

  Returns:
    Mean over valid rows of -log softmax(corrected logits)[r, r], where columns holding the
    row's own item at another position (accidental hits) and invalid columns are excluded.
  """
  corrected = logits - log_q[None, :]
  eye = jnp.eye(logits.shape[0], dtype=bool)
  same = item_ids[:, None] == item_ids[None, :]
  if user_ids is not None:
    same = same | (user_ids[:, None] == user_ids[None, :])
  accidental = same & ~eye
  allowed = valid[None, :] & ~accidental
  return _masked_mean(_row_cross_entropy(corrected, allowed), valid)


def full_softmax_loss(logits: jax.Array, item_ids: jax.Array, candidates: jax.Array,
                      valid: jax.Array) -> jax.Array:
  """Softmax cross-entropy over the whole catalogue (no sampling, so no logQ correction).

  Args:
    logits: [B, N]; row r = user of example r against every item of the catalogue.
    item_ids: [B] the positive item of each row (always allowed, whatever ``candidates`` says).
    candidates: [N] bool, items that may act as negatives. Items never trained on are left out:
      in the cold-start protocols they are the test items, and pushing them down as negatives
      would teach the model that exactly those items are never chosen.
    valid: [B] False for padding rows.

  Returns:
    Mean over valid rows of -log softmax(logits[r, allowed])[item_ids[r]].
  """
  columns = jnp.arange(logits.shape[1])
  is_positive = columns[None, :] == item_ids[:, None]
  masked = jnp.where(candidates[None, :] | is_positive, logits, _MASKED)
  positive = jnp.take_along_axis(logits, item_ids[:, None], axis=1)[:, 0]
  return _masked_mean(jax.nn.logsumexp(masked, axis=1) - positive, valid)


def _row_columns(shape: tuple[int, int], targets: jax.Array, target_mask: jax.Array,
                 candidates: jax.Array, exclude: jax.Array | None,
                 exclude_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """[R, N] masks of the catalogue losses: the columns a row is scored on (candidates minus
  its excluded items, plus its targets) and its real targets."""
  rows, num_items = shape
  row_index = jnp.arange(rows)[:, None]
  keep = jnp.where(target_mask, targets, num_items)              # padding -> out of range
  is_target = jnp.zeros(shape, bool).at[row_index, keep].set(True, mode="drop")
  allowed = jnp.broadcast_to(candidates[None, :], shape)
  if exclude is not None:
    drop = jnp.where(exclude_mask, exclude, num_items)
    allowed = allowed.at[row_index, drop].set(False, mode="drop")
  return allowed | is_target, is_target


def multi_target_softmax_loss(logits: jax.Array, targets: jax.Array, target_mask: jax.Array,
                              candidates: jax.Array, exclude: jax.Array | None = None,
                              exclude_mask: jax.Array | None = None) -> jax.Array:
  """Catalogue softmax cross-entropy of several targets per row (one shared denominator).

  Args:
    logits: [R, N]; row r = one user (state) against every item.
    targets: [R, T] item ids; ``target_mask`` [R, T] says which are real. Each real target is
      one term -log softmax(logits[r, allowed_r])[target] (a multinomial likelihood, as in
      Mult-VAE); a target is always allowed.
    candidates: [N] bool, items that may act as negatives (see ``full_softmax_loss``).
    exclude: optional [R, E] item ids that are not negatives of row r (``exclude_mask`` [R, E]
      marks the real ones): the user's visible history, which evaluation never ranks either.

  Returns:
    Mean over the real targets of all rows (0 when there are none).
  """
  allowed, _ = _row_columns(logits.shape, targets, target_mask, candidates, exclude,
                            exclude_mask)
  lse = jax.nn.logsumexp(jnp.where(allowed, logits, _MASKED), axis=1)
  target_logits = jnp.take_along_axis(logits, jnp.where(target_mask, targets, 0), axis=1)
  return _masked_mean(lse[:, None] - target_logits, target_mask)


def multi_target_squared_loss(logits: jax.Array, targets: jax.Array, target_mask: jax.Array,
                              candidates: jax.Array, exclude: jax.Array | None = None,
                              exclude_mask: jax.Array | None = None,
                              negative_weight: float = 1.0) -> jax.Array:
  """Squared error of a row's scores against its 0/1 target row (the objective EASE and
  EDLAE solve in closed form, here for any scorer trained by gradient).

  Same arguments as ``multi_target_softmax_loss``: the row's allowed columns are the
  candidates minus its excluded items, plus its targets. Each allowed column c adds
  (logits[r, c] - 1)^2 if c is a real target of row r, else ``negative_weight`` *
  logits[r, c]^2 (the unobserved weight of implicit-feedback least squares, Hu et al. 2008).

  Returns:
    Mean over rows with at least one real target of the row's sum (0 when there are none).
  """
  allowed, is_target = _row_columns(logits.shape, targets, target_mask, candidates, exclude,
                                    exclude_mask)
  error = jnp.where(is_target, jnp.square(logits - 1.0), negative_weight * jnp.square(logits))
  per_row = jnp.sum(jnp.where(allowed, error, 0.0), axis=1)
  return _masked_mean(per_row, jnp.any(target_mask, axis=1))


def info_nce(a: jax.Array, b: jax.Array, valid: jax.Array, item_ids: jax.Array,
             inverse_temperature: jax.Array | float) -> jax.Array:
  """Symmetric InfoNCE between paired unit vectors a[i] <-> b[i].

  Rows/columns with ``valid`` False (a modality missing, padding) take no part; pairs of the
  same item at two batch positions are not used as negatives of each other.
  """
  logits = (a @ b.T) * inverse_temperature
  eye = jnp.eye(a.shape[0], dtype=bool)
  allowed = valid[None, :] & ~((item_ids[:, None] == item_ids[None, :]) & ~eye)
  a_to_b = _masked_mean(_row_cross_entropy(logits, allowed), valid)
  # ``allowed`` masks columns by validity and is otherwise symmetric, so the b -> a direction
  # uses it as is (transposing it would mask rows instead and let invalid a's be negatives).
  b_to_a = _masked_mean(_row_cross_entropy(logits.T, allowed), valid)
  return 0.5 * (a_to_b + b_to_a)


def cross_modal_loss(emb: jax.Array, presence: jax.Array, item_ids: jax.Array,
                     valid: jax.Array, inverse_temperature: jax.Array | float) -> jax.Array:
  """Mean of ``info_nce`` over every pair of modalities, each on the items that have both.

  emb [B, M, d] unit vectors, presence [B, M]. A pair with no item in the batch that has both
  modalities contributes nothing (and is not counted in the mean). Returns 0 for M < 2.
  """
  total, count = jnp.zeros(()), jnp.zeros(())
  for m, n in itertools.combinations(range(emb.shape[1]), 2):
    both = presence[:, m] & presence[:, n] & valid
    has_pairs = jnp.any(both).astype(jnp.float32)
    total += has_pairs * info_nce(emb[:, m], emb[:, n], both, item_ids, inverse_temperature)
    count += has_pairs
  return total / jnp.maximum(count, 1.0)


def total_loss(rec_loss: jax.Array, contrastive_loss: jax.Array,
               contrastive_weight: float) -> jax.Array:
  """rec + lambda * contrastive (lambda = 0 is the no-contrastive ablation)."""
  return rec_loss + contrastive_weight * contrastive_loss
