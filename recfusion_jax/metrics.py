"""Ranking metrics as pure, jit-able jnp functions, batched over users.

Inputs (U = users in the batch):

* ``topk_ids``  [U, k] int32: the ranked item ids, best first. ``-1`` marks an empty slot
  (e.g. fewer than k rankable items); an empty slot is never a hit.
* ``relevant``  [U, R] int32: each user's relevant (held-out) item ids, padded with ``-1``.
  Ids in a row are assumed distinct; a duplicate would be counted twice in |rel|.

With ``hit[u, j] = topk_ids[u, j] in relevant[u]`` (rank j is 0-based) and
``n_u = |rel_u|`` (number of non-padding relevant ids):

  HR@k        = 1 if sum_j hit[u, j] > 0 else 0
  DCG@k       = sum_{j<k} hit[u, j] / log2(j + 2)
  IDCG@k      = sum_{j<min(n_u, k)} 1 / log2(j + 2)
  NDCG@k      = DCG@k / IDCG@k
  Recall@k    = sum_j hit[u, j] / n_u
                (deliberately NOT / min(n_u, k): a user with more relevant items than k
                cannot reach 1, which is the textbook definition and what RecBole reports)
  Precision@k = sum_j hit[u, j] / k
  MRR@k       = 1 / (j* + 1) for the first hit j* within the top k, 0 if there is none
                (truncated at k, so it is MRR@k, not the MRR over the full ranking)

A user with n_u = 0 has no defined metric value: every metric is 0 for it, and the "valid"
entry of ``ranking_metrics`` masks such users out of averages.

Ties (one rule everywhere): an item scored the same as a relevant one ranks before it.
``pessimistic_hits`` applies this to a full-ranking top-k list; the sampled rank below counts
every negative scored >= the positive; retrieval (``evaluate.cross_modal_retrieval``) counts
every target scored >= the correct one.

Sampled protocol (labelled "sampled" everywhere; not comparable to full-ranking numbers):
the positive item is ranked among N sampled negatives (N = 99 gives a list of 100). Its
0-based rank is ``r = #{negatives with score >= positive score}`` -- ties count against the
positive, so a model that scores everything equally gets 0, not a perfect score. Then

  sampled HR@k   = 1 if r < k else 0
  sampled NDCG@k = 1 / log2(r + 2) if r < k else 0
"""

from __future__ import annotations

import jax.numpy as jnp


def num_relevant(relevant: jnp.ndarray) -> jnp.ndarray:
  """[U] int32: number of non-padding relevant ids per user."""
  return jnp.sum(relevant >= 0, axis=-1).astype(jnp.int32)


def hits(topk_ids: jnp.ndarray, relevant: jnp.ndarray) -> jnp.ndarray:
  """[U, k] bool: whether the item at each rank is relevant.

  A [U, k, R] comparison: R is small (held-out items per user), so this is cheaper and
  simpler than sorting, and padding (-1 on either side) can never match a real id.
  """
  match = topk_ids[:, :, None] == relevant[:, None, :]
  return jnp.any(match & (relevant[:, None, :] >= 0), axis=-1) & (topk_ids >= 0)


def _discounts(k: int) -> jnp.ndarray:
  """[k] float32: 1 / log2(rank + 2) for 0-based ranks."""
  return 1.0 / jnp.log2(jnp.arange(k, dtype=jnp.float32) + 2.0)


def ranking_metrics(topk_ids: jnp.ndarray, relevant: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """Per-user HR/NDCG/Recall/Precision/MRR at k = ``topk_ids.shape[-1]`` of a ranked list.

  Returns [U] arrays under "HR@k", "NDCG@k", "Recall@k", "Precision@k", "MRR@k", plus
  "valid" ([U] bool, users with >= 1 relevant item).
  """
  return metrics_from_hits(hits(topk_ids, relevant), num_relevant(relevant))


def metrics_from_hits(hit: jnp.ndarray, n: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """``ranking_metrics`` from the [U, k] hit matrix and the [U] number of relevant items."""
  k = hit.shape[-1]
  valid = n > 0
  num_hits = jnp.sum(hit, axis=-1)
  disc = _discounts(k)
  dcg = jnp.sum(hit * disc, axis=-1)
  # IDCG = prefix sum of discounts up to min(n, k); index 0 of the padded cumsum is n = 0.
  ideal = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(disc)])
  idcg = ideal[jnp.minimum(n, k)]
  first = jnp.argmax(hit, axis=-1)  # first True; 0 when there is none, masked below
  any_hit = num_hits > 0
  return {
      f"HR@{k}": any_hit.astype(jnp.float32),
      f"NDCG@{k}": jnp.where(valid, dcg / jnp.where(valid, idcg, 1.0), 0.0),
      f"Recall@{k}": jnp.where(valid, num_hits / jnp.maximum(n, 1), 0.0).astype(jnp.float32),
      f"Precision@{k}": (num_hits / k).astype(jnp.float32),
      f"MRR@{k}": jnp.where(any_hit, 1.0 / (first + 1.0), 0.0).astype(jnp.float32),
      "valid": valid,
  }


def pessimistic_hits(topk_values: jnp.ndarray, topk_relevant: jnp.ndarray,
                     num_tied: jnp.ndarray, num_relevant_tied: jnp.ndarray) -> jnp.ndarray:
  """[U, k] hits of a top-k list in which ties count against the relevant items.

  Within every group of equal scores the irrelevant items take the earlier ranks, so a model
  that scores everything equally gets no hit, whatever the item ids. A group above the k-th
  score t lies wholly in the list; the group tied at t may reach past rank k, so its size and
  relevant count come from the whole row. No full sort is needed.

  Args:
    topk_values: [U, k] scores, best first; -inf marks an empty slot (never a hit).
    topk_relevant: [U, k] bool, whether the item at each rank is relevant.
    num_tied: [U] rankable items of the whole row scoring exactly t = topk_values[:, -1].
    num_relevant_tied: [U] how many of those are relevant.
  """
  k = topk_values.shape[-1]
  v = topk_values
  same = v[:, :, None] == v[:, None, :]                            # [U, k, k]
  above = jnp.sum(v[:, None, :] > v[:, :, None], axis=-1)         # ranks before the group
  size = jnp.sum(same, axis=-1)
  rel = jnp.sum(same & topk_relevant[:, None, :], axis=-1)
  at_kth = v == v[:, -1:]
  size = jnp.where(at_kth, num_tied[:, None], size)
  rel = jnp.where(at_kth, num_relevant_tied[:, None], rel)
  # The group's relevant items take its last ``rel`` ranks.
  return (jnp.arange(k)[None, :] >= above + size - rel) & (v > -jnp.inf)


def sampled_rank(pos_score: jnp.ndarray, neg_scores: jnp.ndarray,
                 neg_mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """[U] int32: 0-based rank of the positive among its negatives (ties count against it).

  Args:
    pos_score: [U] score of each user's positive item.
    neg_scores: [U, N] scores of the sampled negatives.
    neg_mask: optional [U, N] bool, False for negative slots that could not be filled
      (catalogue smaller than N + excluded items); those never outrank the positive.
  """
  above = neg_scores >= pos_score[:, None]
  if neg_mask is not None:
    above = above & neg_mask
  return jnp.sum(above, axis=-1).astype(jnp.int32)


def sampled_metrics(pos_score: jnp.ndarray, neg_scores: jnp.ndarray, k: int = 10,
                    neg_mask: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Per-user sampled HR@k and NDCG@k (see module docstring); [U] float32 each."""
  rank = sampled_rank(pos_score, neg_scores, neg_mask)
  in_top = rank < k
  return {
      f"sampled_HR@{k}": in_top.astype(jnp.float32),
      f"sampled_NDCG@{k}": jnp.where(in_top, 1.0 / jnp.log2(rank + 2.0), 0.0).astype(
          jnp.float32),
  }
