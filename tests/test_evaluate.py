"""The evaluators against naive NumPy implementations (and against themselves when sharded)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recfusion_jax import evaluate

NAMES = ("HR", "NDCG", "Recall", "Precision", "MRR")


def dot_score(user_block, item_table):
  return user_block @ item_table.T


def tree_score(user_block, item_table):
  """A pytree model: dot product of embeddings plus a per-item bias."""
  return user_block["emb"] @ item_table["emb"].T + item_table["bias"][None, :]


def _random_ids(rng, num_users, width, num_items, min_count=0):
  """Distinct ids per row, -1 padded, counts in [min_count, width]."""
  ids = np.full((num_users, width), -1, np.int32)
  for u in range(num_users):
    n = rng.integers(min_count, width + 1)
    ids[u, :n] = rng.permutation(num_items)[:n]
  return ids


def _problem(seed=0, num_users=45, num_items=61, dim=16):
  rng = np.random.default_rng(seed)
  users = rng.normal(size=(num_users, dim)).astype(np.float32)
  items = rng.normal(size=(num_items, dim)).astype(np.float32)
  exclude = _random_ids(rng, num_users, 8, num_items)
  relevant = _random_ids(rng, num_users, 14, num_items)  # up to 14 > k relevant items
  relevant[:3] = -1  # users with nothing relevant
  exclude[3:6, 0] = [5, 6, 7]
  relevant[3:6, -2] = [5, 6, 7]  # relevant items that are also excluded...
  relevant[3:6, -1] = [5, 6, 7]  # ...and repeated, which must count once
  return users, items, exclude, relevant


def _naive_full_ranking(scores, exclude, relevant, k, candidates=None):
  """Dense mask, full sort, textbook metrics; float64 throughout. Ties count against the
  relevant items: among equal scores the irrelevant items rank first."""
  scores = np.array(scores, np.float64)
  num_users, num_items = scores.shape
  if candidates is not None:
    allowed = np.zeros(num_items, bool)
    allowed[candidates] = True
    scores[:, ~allowed] = -np.inf
  sums = dict.fromkeys(NAMES, 0.0)
  count = 0
  for u in range(num_users):
    row = scores[u].copy()
    row[[e for e in exclude[u] if e >= 0]] = -np.inf
    rel = {r for r in relevant[u] if r >= 0}
    if candidates is not None:
      rel &= set(np.asarray(candidates).tolist())
    ranked = sorted(range(num_items), key=lambda i: (-row[i], i in rel, i))
    order = [i for i in ranked[:k] if row[i] > -np.inf]
    if not rel:
      continue
    count += 1
    hit = [i in rel for i in order]
    sums["HR"] += float(any(hit))
    sums["NDCG"] += (sum(1 / math.log2(j + 2) for j, h in enumerate(hit) if h)
                     / sum(1 / math.log2(j + 2) for j in range(min(len(rel), k))))
    sums["Recall"] += sum(hit) / len(rel)
    sums["Precision"] += sum(hit) / k
    sums["MRR"] += 1 / (hit.index(True) + 1) if any(hit) else 0.0
  out = {f"{name}@{k}": value / count for name, value in sums.items()}
  out["num_users"] = float(count)
  return out


def _assert_close(got, want, rtol=1e-5):
  assert set(got) == set(want), (got.keys(), want.keys())
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-7, err_msg=name)


def _mesh():
  return jax.make_mesh((4, 2), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize("topk_chunk", [0, 4])  # plain lax.top_k; chunked (61 -> 64 items)
def test_full_ranking_matches_naive(topk_chunk):
  users, items, exclude, relevant = _problem()
  want = _naive_full_ranking(users @ items.T, exclude, relevant, k=10)
  got = evaluate.evaluate_full_ranking(dot_score, users, items, exclude, relevant, k=10,
                                       block_size=16, topk_chunk=topk_chunk)
  _assert_close(got, want)
  assert got["num_users"] == want["num_users"] >= 40


def test_block_size_does_not_matter():
  users, items, exclude, relevant = _problem(seed=1)
  results = [evaluate.evaluate_full_ranking(dot_score, users, items, exclude, relevant, k=5,
                                            block_size=b) for b in (7, 45, 1000)]
  for r in results[1:]:
    _assert_close(r, results[0], rtol=1e-6)


def test_pytree_inputs_and_device_arrays():
  users, items, exclude, relevant = _problem(seed=2)
  bias = np.random.default_rng(9).normal(size=(items.shape[0],)).astype(np.float32)
  want = _naive_full_ranking(users @ items.T + bias, exclude, relevant, k=10)
  got = evaluate.evaluate_full_ranking(
      tree_score, {"emb": jnp.asarray(users)}, {"emb": items, "bias": jnp.asarray(bias)},
      exclude, relevant, k=10, block_size=10)
  _assert_close(got, want)


@pytest.mark.parametrize("item_axes,topk_chunk", [((), None), (("fsdp",), None),
                                                   (("data", "fsdp"), None), (("fsdp",), 3)])
def test_sharded_equals_unsharded(item_axes, topk_chunk):
  assert jax.device_count() == 8
  users, items, exclude, relevant = _problem(seed=3)  # 61 items: not divisible by shards
  unsharded = evaluate.evaluate_full_ranking(dot_score, users, items, exclude, relevant,
                                             k=10, block_size=16)
  sharded = evaluate.evaluate_full_ranking(dot_score, users, items, exclude, relevant, k=10,
                                           block_size=12, mesh=_mesh(), item_axes=item_axes,
                                           topk_chunk=topk_chunk)
  _assert_close(sharded, unsharded)


def test_candidate_items_match_naive():
  users, items, exclude, relevant = _problem(seed=4)
  candidates = np.random.default_rng(5).permutation(items.shape[0])[:20]
  want = _naive_full_ranking(users @ items.T, exclude, relevant, k=10, candidates=candidates)
  for chunk in (0, 2):
    got = evaluate.evaluate_full_ranking(dot_score, users, items, exclude, relevant, k=10,
                                         block_size=16, candidate_items=candidates,
                                         topk_chunk=chunk)
    _assert_close(got, want)
  sharded = evaluate.evaluate_full_ranking(dot_score, users, items, exclude, relevant, k=10,
                                           block_size=16, candidate_items=candidates,
                                           mesh=_mesh(), item_axes=("fsdp",))
  _assert_close(sharded, want)


def test_fewer_candidates_than_k():
  # 6 candidates, k = 10: ranks 6..9 are empty slots (never hits, still in Precision's k).
  users, items, exclude, relevant = _problem(seed=6)
  candidates = np.arange(6)
  relevant[:, 0] = np.arange(users.shape[0]) % 8  # make some relevant ids candidates
  want = _naive_full_ranking(users @ items.T, exclude, relevant, k=10, candidates=candidates)
  got = evaluate.evaluate_full_ranking(dot_score, users, items, exclude, relevant, k=10,
                                       block_size=16, candidate_items=candidates)
  _assert_close(got, want)


@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_chunked_top_k_equals_lax_top_k(chunk):
  rng = np.random.default_rng(chunk)
  # Coarse integer scores: many exact ties, so the tie-break (lowest index) is checked too.
  scores = rng.integers(0, 6, size=(33, 96)).astype(np.float32)
  scores[0] = -np.inf  # a row with nothing rankable
  scores[1, :50] = -np.inf
  want_values, want_ids = jax.lax.top_k(scores, 10)
  values, ids = jax.jit(evaluate.chunked_top_k, static_argnums=(1, 2))(scores, 10, chunk)
  np.testing.assert_array_equal(values, want_values)
  np.testing.assert_array_equal(ids, want_ids)


def test_hand_computed_full_ranking():
  # 1-d embeddings so the ranking is obvious: item scores for user 0 are 4, 3, 2, 1, 0.
  users = np.array([[1.0], [-1.0]], np.float32)
  items = np.array([[4.0], [3.0], [2.0], [1.0], [0.0]], np.float32)
  exclude = np.array([[0, -1], [4, 3]], np.int32)
  relevant = np.array([[2, 4], [0, -1]], np.int32)
  # User 0: item 0 excluded -> top-2 = [1, 2]; hit at rank 1 of |rel| = 2:
  #   HR 1, NDCG (1/log2 3) / (1 + 1/log2 3) = 0.386853, Recall 1/2, Precision 1/2, MRR 1/2.
  # User 1: scores reversed, 4 and 3 excluded -> top-2 = [2, 1]; relevant item 0 missed.
  got = evaluate.evaluate_full_ranking(dot_score, users, items, exclude, relevant, k=2)
  _assert_close(got, {"HR@2": 0.5, "NDCG@2": 0.386853 / 2, "Recall@2": 0.25,
                      "Precision@2": 0.25, "MRR@2": 0.25, "num_users": 2.0})


def _tied_problem(seed, num_users=40, num_items=37):
  """Scores with many exact ties (integers 0..3), given as users @ identity."""
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 4, size=(num_users, num_items)).astype(np.float32)
  scores[0] = 1.0                 # a constant scorer: every item tied
  scores[1, 5:] = scores[1, :5].min() - 1  # the k-th score tied far beyond rank k
  exclude = _random_ids(rng, num_users, 5, num_items)
  relevant = _random_ids(rng, num_users, 6, num_items, min_count=1)
  return scores, np.eye(num_items, dtype=np.float32), exclude, relevant


@pytest.mark.parametrize("k,topk_chunk,item_axes", [
    (5, 0, None), (10, 2, None),
    (5, 0, ()), (5, 0, ("fsdp",))])  # sharded over users; over items (ties straddle shards)
def test_ties_count_against_the_relevant_items(k, topk_chunk, item_axes):
  scores, items, exclude, relevant = _tied_problem(seed=k + topk_chunk)
  want = _naive_full_ranking(scores, exclude, relevant, k=k)
  mesh = None if item_axes is None else _mesh()
  got = evaluate.evaluate_full_ranking(dot_score, scores, items, exclude, relevant, k=k,
                                       block_size=8, topk_chunk=topk_chunk, mesh=mesh,
                                       item_axes=item_axes or ())
  _assert_close(got, want)
  # The same ranking with the lowest id first among ties scores higher: the rule matters here.
  optimistic = _naive_full_ranking(scores - 1e-4 * np.arange(scores.shape[1]), exclude,
                                   relevant, k=k)
  assert optimistic[f"NDCG@{k}"] > want[f"NDCG@{k}"] + 0.01


def test_constant_scores_hit_nothing():
  num_users, num_items = 6, 30
  relevant = np.tile(np.array([[0, 1, 2]], np.int32), (num_users, 1))  # the lowest ids
  got = evaluate.evaluate_full_ranking(lambda u, i: jnp.zeros((u.shape[0], i.shape[0])),
                                       np.zeros((num_users, 1), np.float32),
                                       np.zeros((num_items, 1), np.float32), None, relevant,
                                       k=10)
  assert got["HR@10"] == got["NDCG@10"] == got["MRR@10"] == 0.0
  # With 8 irrelevant items tied (19 excluded), the 3 relevant ones take ranks 9, 10, 11.
  exclude = np.tile(np.arange(11, 30, dtype=np.int32)[None], (num_users, 1))
  got = evaluate.evaluate_full_ranking(dot_score, np.ones((num_users, 1), np.float32),
                                       np.ones((num_items, 1), np.float32), exclude, relevant,
                                       k=10)
  _assert_close(got, {"HR@10": 1.0, "NDCG@10": (1 / math.log2(10) + 1 / math.log2(11))
                      / sum(1 / math.log2(j + 2) for j in range(3)),
                      "Recall@10": 2 / 3, "Precision@10": 0.2, "MRR@10": 1 / 9,
                      "num_users": float(num_users)})


def test_sample_negatives_properties():
  num_items, num_neg = 30, 10
  rng = np.random.default_rng(7)
  exclude = _random_ids(rng, 50, 12, num_items)
  positive = rng.integers(0, num_items, size=50).astype(np.int32)
  neg = evaluate.sample_negatives(exclude, positive, num_items, num_neg, seed=3)
  for u in range(50):
    banned = set(exclude[u][exclude[u] >= 0].tolist()) | {int(positive[u])}
    drawn = neg[u][neg[u] >= 0].tolist()
    assert len(drawn) == min(num_neg, num_items - len(banned))
    assert len(set(drawn)) == len(drawn) and not set(drawn) & banned
    assert all(0 <= i < num_items for i in drawn)
  np.testing.assert_array_equal(
      neg, evaluate.sample_negatives(exclude, positive, num_items, num_neg, seed=3))
  # Too few allowed items: 3 allowed, 10 requested -> all 3 plus 7 empty slots.
  few = evaluate.sample_negatives(np.array([[0, 1, 2, 3, 4, 5]]), np.array([6]), 10, 10)
  assert sorted(few[0][few[0] >= 0].tolist()) == [7, 8, 9]


def test_sample_negatives_uniform():
  # 15 allowed items, 3 draws x 200,000 users: each allowed item is expected 40,000 times with
  # sd ~ 190, so the 2% band (800 = 4.2 sd) is missed by chance with probability < 1e-3 over
  # all 15 items (and the seed is fixed), while a sampler that favours or starves any item by
  # 2% or more fails it. Floyd's algorithm makes a low or high rank the likely victim of a
  # bias; the first and last allowed items are at the edges of the banned ids on purpose.
  num_users, num_items = 200_000, 20
  exclude = np.tile(np.array([[1, 4, 9, 16]], np.int32), (num_users, 1))
  positive = np.full((num_users,), 12, np.int32)
  neg = evaluate.sample_negatives(exclude, positive, num_items, 3, seed=11)
  counts = np.bincount(neg.reshape(-1), minlength=num_items)
  assert counts[[1, 4, 9, 12, 16]].sum() == 0
  allowed = np.setdiff1d(np.arange(num_items), [1, 4, 9, 12, 16])
  expected = num_users * 3 / allowed.size
  assert np.all(np.abs(counts[allowed] / expected - 1) < 0.02), counts[allowed] / expected
  # Distinct within a user: no item drawn twice for anyone.
  assert np.all((neg[:, 0] != neg[:, 1]) & (neg[:, 0] != neg[:, 2]) & (neg[:, 1] != neg[:, 2]))


def test_evaluate_sampled_matches_naive():
  users, items, exclude, _ = _problem(seed=8)
  rng = np.random.default_rng(8)
  positive = rng.integers(0, items.shape[0], size=users.shape[0]).astype(np.int32)
  positive[:4] = -1  # no positive: not evaluated
  num_neg = 20
  neg = evaluate.sample_negatives(exclude, positive, items.shape[0], num_neg, seed=5)
  scores = (users.astype(np.float64) @ items.T.astype(np.float64))
  hr = nd = 0.0
  valid = positive >= 0
  for u in np.flatnonzero(valid):
    pos_score = scores[u, positive[u]]
    rank = sum(scores[u, i] >= pos_score for i in neg[u] if i >= 0)
    hr += rank < 5
    nd += 1 / math.log2(rank + 2) if rank < 5 else 0.0
  want = {"sampled_HR@5": hr / valid.sum(), "sampled_NDCG@5": nd / valid.sum(),
          "num_users": float(valid.sum())}
  got = evaluate.evaluate_sampled(dot_score, users, items, exclude, positive, num_neg, 5, k=5,
                                  block_size=16)
  _assert_close(got, want)
  sharded = evaluate.evaluate_sampled(dot_score, users, items, exclude, positive, num_neg, 5,
                                      k=5, block_size=8, mesh=_mesh())
  _assert_close(sharded, want)


def _naive_retrieval(query, target, ks):
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  t = target / np.linalg.norm(target, axis=1, keepdims=True)
  sims = q.astype(np.float64) @ t.T.astype(np.float64)
  ranks = np.array([np.sum(np.delete(sims[i], i) >= sims[i, i]) for i in range(len(q))])
  return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def test_cross_modal_retrieval_matches_naive():
  rng = np.random.default_rng(10)
  query = rng.normal(size=(70, 12)).astype(np.float32)
  target = (query + 0.8 * rng.normal(size=query.shape)).astype(np.float32)
  got = evaluate.cross_modal_retrieval(query, target, ks=(1, 5, 10), block_size=16)
  _assert_close(got, _naive_retrieval(query, target, (1, 5, 10)))
  assert 0 < got["R@1"] < got["R@5"] < got["R@10"] <= 1


def test_cross_modal_retrieval_hand_computed():
  # Cosines: query 0 -> (1, 0.6, -1): own target first. Query 1 -> (0.981, 0.745, -0.981):
  # own target 2nd. Query 2 -> (0.995, 0.517, -0.995): own target last. Scale is irrelevant.
  query = np.array([[1.0, 0.0], [2.0, 0.4], [1.0, -0.1]], np.float32)
  target = np.array([[2.0, 0.0], [0.6, 0.8], [-3.0, 0.0]], np.float32)
  got = evaluate.cross_modal_retrieval(query, target, ks=(1, 2, 3))
  _assert_close(got, {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})
