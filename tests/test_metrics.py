"""Ranking metrics against a naive per-user Python reference and a hand-computed example."""

import math

import jax
import numpy as np
import pytest

from recfusion_jax import metrics


def _reference(topk: np.ndarray, relevant: np.ndarray) -> dict[str, np.ndarray]:
  """Textbook definitions, one user at a time."""
  k = topk.shape[1]
  out = {name: [] for name in ("HR", "NDCG", "Recall", "Precision", "MRR", "valid")}
  for ranked, rel in zip(topk.tolist(), relevant.tolist()):
    rel_set = {r for r in rel if r >= 0}
    hit = [item >= 0 and item in rel_set for item in ranked]
    n = len(rel_set)
    dcg = sum(1.0 / math.log2(j + 2) for j, h in enumerate(hit) if h)
    idcg = sum(1.0 / math.log2(j + 2) for j in range(min(n, k)))
    out["valid"].append(n > 0)
    out["HR"].append(float(any(hit)))
    out["NDCG"].append(dcg / idcg if n else 0.0)
    out["Recall"].append(sum(hit) / n if n else 0.0)
    out["Precision"].append(sum(hit) / k)
    out["MRR"].append(1.0 / (hit.index(True) + 1) if any(hit) else 0.0)
  return {name: np.asarray(v) for name, v in out.items()}


def _random_case(rng: np.random.Generator, num_users: int, num_items: int, k: int,
                 max_relevant: int) -> tuple[np.ndarray, np.ndarray]:
  """Distinct top-k ids (some empty -1 slots) and distinct relevant ids with -1 padding
  scattered anywhere in the row; relevant counts range over 0..max_relevant (> k too)."""
  topk = np.stack([rng.permutation(num_items)[:k] for _ in range(num_users)]).astype(np.int32)
  topk[rng.random(topk.shape) < 0.1] = -1
  relevant = np.full((num_users, max_relevant), -1, np.int32)
  for u in range(num_users):
    n = rng.integers(0, max_relevant + 1)
    relevant[u, :n] = rng.permutation(num_items)[:n]
    relevant[u] = rng.permutation(relevant[u])
  relevant[0] = -1  # at least one user with nothing relevant
  return topk, relevant


@pytest.mark.parametrize("k,max_relevant", [(1, 3), (5, 12), (10, 4), (20, 25)])
def test_matches_reference_on_random_cases(k: int, max_relevant: int) -> None:
  rng = np.random.default_rng(k)
  topk, relevant = _random_case(rng, num_users=64, num_items=40, k=k,
                                max_relevant=max_relevant)
  ref = _reference(topk, relevant)
  got = jax.jit(metrics.ranking_metrics)(topk, relevant)
  np.testing.assert_array_equal(np.asarray(got["valid"]), ref["valid"])
  for name in ("HR", "NDCG", "Recall", "Precision", "MRR"):
    np.testing.assert_allclose(np.asarray(got[f"{name}@{k}"]), ref[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)


def test_hand_computed_example() -> None:
  topk = np.array([[3, 7, 1, 9],
                   [3, 7, 1, 9],
                   [5, 6, 7, 8],
                   [2, -1, 4, 0]], np.int32)
  relevant = np.array([[7, 9, 4, -1],     # hits at 0-based ranks 1 and 3, |rel| = 3
                       [-1, -1, -1, -1],  # nothing relevant: excluded from averages
                       [-1, 5, -1, -1],   # hit at rank 0, |rel| = 1
                       [8, 11, 12, 13]],  # no hit, |rel| = 4
                      np.int32)
  got = {name: np.asarray(v) for name, v in metrics.ranking_metrics(topk, relevant).items()}
  np.testing.assert_array_equal(got["valid"], [True, False, True, True])
  np.testing.assert_allclose(got["HR@4"], [1.0, 0.0, 1.0, 0.0])
  # User 0: DCG = 1/log2(3) + 1/log2(5) = 0.630930 + 0.430677 = 1.061606;
  # IDCG over min(3, 4) = 3 ranks = 1 + 0.630930 + 0.5 = 2.130930; NDCG = 0.498189.
  np.testing.assert_allclose(got["NDCG@4"], [0.49818926, 0.0, 1.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(got["Recall@4"], [2 / 3, 0.0, 1.0, 0.0], rtol=1e-6)  # hits/|rel|
  np.testing.assert_allclose(got["Precision@4"], [0.5, 0.0, 0.25, 0.0])  # hits / k
  np.testing.assert_allclose(got["MRR@4"], [0.5, 0.0, 1.0, 0.0])  # first hit at rank 1 -> 1/2


def test_recall_uses_full_relevant_count() -> None:
  # 3 relevant, k = 2, both slots hit: Recall@2 = 2/3 (not 2/min(3, 2) = 1); NDCG@2 = 1.
  got = metrics.ranking_metrics(np.array([[4, 5]], np.int32), np.array([[5, 6, 4]], np.int32))
  np.testing.assert_allclose(got["Recall@2"], [2 / 3], rtol=1e-6)
  np.testing.assert_allclose(got["NDCG@2"], [1.0], rtol=1e-6)


def _pessimistic_reference(values, relevant_at, num_tied, num_relevant_tied):
  """Hits of the list rearranged so that irrelevant items come first within each score."""
  out = np.zeros(values.shape, bool)
  for u in range(values.shape[0]):
    v, k = values[u], values.shape[1]
    kth = v[-1]
    order = []
    for score in sorted(set(v[v > -np.inf].tolist()), reverse=True):
      in_list = relevant_at[u][v == score]
      n_rel, n = (num_relevant_tied[u], num_tied[u]) if score == kth else (in_list.sum(),
                                                                             in_list.size)
      order += [False] * (n - n_rel) + [True] * n_rel
    order = (order + [False] * k)[:k]
    out[u] = np.asarray(order) & (v > -np.inf)
  return out


def test_pessimistic_hits_match_reference() -> None:
  rng = np.random.default_rng(0)
  k = 6
  values = -np.sort(-rng.integers(0, 4, size=(200, k)).astype(np.float32), axis=1)
  values[:10, 3:] = -np.inf                       # fewer rankable items than k
  relevant_at = rng.random((200, k)) < 0.4
  relevant_at &= values > -np.inf
  at_kth = values == values[:, -1:]
  # The group tied at the k-th score extends past the list by 0..3 more items.
  extra_rel = rng.integers(0, 3, 200)
  num_relevant_tied = np.sum(relevant_at & at_kth, 1) + extra_rel
  num_tied = np.sum(at_kth, 1) + extra_rel + rng.integers(0, 2, 200)
  got = metrics.pessimistic_hits(values, relevant_at, num_tied, num_relevant_tied)
  want = _pessimistic_reference(values, relevant_at, num_tied, num_relevant_tied)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Distinct scores: nothing moves.
  distinct = -np.sort(-rng.permutation(50)[:k].astype(np.float32))[None]
  rel = np.array([[True, False, True, False, False, True]])
  np.testing.assert_array_equal(metrics.pessimistic_hits(distinct, rel, np.array([1]),
                                                         np.array([1])), rel)


def _sampled_reference(pos, neg, mask, k):
  ranks = [sum(1 for s, m in zip(n, ms) if m and s >= p) for p, n, ms in zip(pos, neg, mask)]
  hr = [float(r < k) for r in ranks]
  nd = [1.0 / math.log2(r + 2) if r < k else 0.0 for r in ranks]
  return np.asarray(hr), np.asarray(nd)


def test_sampled_metrics_match_reference() -> None:
  rng = np.random.default_rng(3)
  pos = rng.normal(size=(200,)).astype(np.float32) + 1.5
  neg = rng.normal(size=(200, 99)).astype(np.float32)
  neg[:5, :3] = pos[:5, None]  # exact ties count against the positive
  mask = rng.random((200, 99)) > 0.05
  got = jax.jit(metrics.sampled_metrics, static_argnums=2)(pos, neg, 10, mask)
  hr, nd = _sampled_reference(pos, neg, mask, 10)
  np.testing.assert_allclose(got["sampled_HR@10"], hr)
  np.testing.assert_allclose(got["sampled_NDCG@10"], nd, rtol=1e-6)


def test_sampled_hand_computed() -> None:
  pos = np.array([0.5, 0.5, 2.0], np.float32)
  neg = np.array([[0.9, 0.5, 0.1, 0.0],   # 0.9 and the tie 0.5 are above: rank 2
                  [0.9, 0.8, 0.7, 0.6],   # rank 4 >= k = 3: a miss
                  [1.0, 1.0, 1.0, 1.0]],  # rank 0
                 np.float32)
  got = metrics.sampled_metrics(pos, neg, k=3)
  np.testing.assert_allclose(got["sampled_HR@3"], [1.0, 0.0, 1.0])
  # rank 2 -> 1/log2(4) = 0.5; rank 0 -> 1.
  np.testing.assert_allclose(got["sampled_NDCG@3"], [0.5, 0.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(metrics.sampled_rank(pos, neg), [2, 4, 0])
