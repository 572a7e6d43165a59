"""Baselines against naive NumPy references and a planted block structure they must recover."""

import numpy as np
import pytest

from recfusion_jax.baselines import (bpr_mf, chance, common, ease, lightgcn, markov,
                                    popularity, sasrec)
from recfusion_jax.data.types import Catalogue, Interactions, RecDataset
from tests.helpers import cyclic_walks


def _interactions(user, item, timestamp=None):
  user, item = np.asarray(user, np.int32), np.asarray(item, np.int32)
  timestamp = np.arange(user.size, dtype=np.int64) if timestamp is None else timestamp
  return Interactions(user, item, np.asarray(timestamp, np.int64), np.ones(user.size, np.float32))


def _dataset(num_users, num_items, train, valid, test, name="planted"):
  has_id = np.zeros(num_items, bool)
  has_id[train.item] = True
  catalogue = Catalogue(None, None, None, None, np.zeros((num_items, 3), bool), has_id)
  return RecDataset(catalogue, num_users, train, valid, test,
                    np.flatnonzero(~has_id).astype(np.int32), np.ones(num_users, bool), name)


def _block_dataset(seed=0, blocks=4, size=12, train_per_user=8, test_per_user=2):
  """Users like only the items of their own block: a structure any CF model must recover."""
  rng = np.random.default_rng(seed)
  n = blocks * size
  parts = {"train": ([], []), "valid": ([], []), "test": ([], [])}
  for u in range(n):
    block = rng.permutation(np.arange(size)) + (u // size) * size
    cut = np.cumsum([train_per_user, 1, test_per_user])
    for name, items in zip(parts, np.split(block[:cut[-1]], cut[:-1])):
      parts[name][0].extend([u] * items.size)
      parts[name][1].extend(items.tolist())
  return _dataset(n, n, *(_interactions(*parts[k]) for k in parts))


def test_popularity_ranks_by_distinct_train_users():
  # Item 2: three users (one of them twice); item 0: two users; item 1: one; item 3: none.
  train = _interactions([0, 1, 2, 2, 0, 1, 2], [2, 2, 2, 2, 0, 0, 1])
  data = _dataset(4, 4, train, _interactions([], []), _interactions([3], [3]))
  ranker = popularity.Popularity(data).ranker()
  scores = np.asarray(ranker.score_fn(ranker.user_reps(np.array([3])), ranker.item_table))
  assert list(np.argsort(-scores[0])) == [2, 0, 1, 3]


def test_ease_closed_form_equals_constrained_ridge_per_column():
  rng = np.random.default_rng(0)
  x = (rng.random((15, 7)) < 0.4).astype(np.float64)
  reg = 2.5
  weights = ease.ease_weights(x, reg)
  # Naive: for each column j, ridge-regress x_j on the other columns (so B_jj = 0 exactly).
  for j in range(x.shape[1]):
    others = np.delete(np.arange(x.shape[1]), j)
    a = x[:, others]
    b = np.linalg.solve(a.T @ a + reg * np.eye(others.size), a.T @ x[:, j])
    np.testing.assert_allclose(weights[others, j], b, rtol=1e-4, atol=1e-6)
    assert weights[j, j] == 0.0


def test_lightgcn_propagation_equals_dense_numpy():
  rng = np.random.default_rng(1)
  num_users, num_items, dim, layers = 6, 9, 5, 3
  pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, 5, 25), rng.integers(0, 9, 25))}
  users, items = (np.asarray(v, np.int32) for v in zip(*sorted(pairs)))  # user 5: no edges
  e0 = rng.normal(size=(num_users + num_items, dim)).astype(np.float32)

  adj = np.zeros((num_users + num_items,) * 2)
  adj[users, num_users + items] = adj[num_users + items, users] = 1.0
  degree = adj.sum(1)
  inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1)), 0.0)
  norm = inv_sqrt[:, None] * adj * inv_sqrt[None, :]
  expected, e = [e0.astype(np.float64)], e0.astype(np.float64)
  for _ in range(layers):
    e = norm @ e
    expected.append(e)

  graph = lightgcn.normalized_edges(users, items, num_users, num_items)
  got = np.asarray(lightgcn.propagate(e0, *graph, layers))
  np.testing.assert_allclose(got, np.mean(expected, axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs", [
    (bpr_mf.BPRMF, dict(dim=16, learning_rate=1e-2, reg=1e-4, batch_size=64)),
    (lightgcn.LightGCN, dict(dim=16, num_layers=2, learning_rate=1e-2, reg=1e-4,
                             batch_size=64)),
])
def test_bpr_models_learn_planted_blocks(cls, kwargs):
  data = _block_dataset()
  model = cls(data, **kwargs)
  losses = model.train(40)
  assert losses[-1] < 0.5 * losses[0]
  got = common.rank_split(model.ranker(), data, data.test)
  rand = common.rank_split(chance.RandomScores(data).ranker(), data, data.test)
  # The 2 test items are among the 3 unseen items of the user's block, out of 39 candidates:
  # recovering the blocks puts both in the top 3 (NDCG >= 0.69); random gets Recall ~0.25.
  assert got["Recall@10"] > 0.95 and got["NDCG@10"] > 0.6
  assert got["NDCG@10"] > 3 * rand["NDCG@10"]


def test_ease_learns_planted_blocks_and_tuning_keeps_the_best_grid_point():
  data = _block_dataset()
  grid = [{"reg": r} for r in (0.1, 10.0, 1000.0)]
  model, tuned = common.tune_and_fit(ease.EASE, data, common.merge_valid_into_train(data), grid)
  best = max(tuned.log, key=lambda row: row["NDCG@10"])
  assert tuned.params == {"reg": best["reg"]} and tuned.valid_ndcg == best["NDCG@10"]
  # The final fit learned from train + valid: valid items are now excluded training items.
  fit = common.merge_valid_into_train(data)
  assert len(fit.train) == len(data.train) + len(data.valid) and len(fit.valid) == 0
  got = common.rank_split(model.ranker(), fit, data.test)
  assert got["Recall@10"] > 0.95 and got["NDCG@10"] > 0.6


def test_sasrec_windows_cover_every_transition_once():
  # User 0: items 0..11 in time order; user 1: a single item (no transition).
  data = _dataset(2, 12, _interactions([0] * 12 + [1], list(range(12)) + [3]),
                  _interactions([], []), _interactions([], []))
  windows = sasrec.training_windows(data, max_len=4)
  assert windows.shape[1] == 5
  pairs = {(int(a), int(b)) for w in windows for a, b in zip(w[:-1], w[1:]) if a > 0}
  assert pairs == {(i + 1, i + 2) for i in range(11)}   # shifted ids: item i is i + 1
  assert sum(int((w[:-1] > 0).sum()) for w in windows) == 11
  for w in windows:   # right-aligned: padding only on the left
    real = w > 0
    assert not np.any(real[:-1] & ~real[1:])


def _cyclic_walks(num_users=64, num_items=30, length=12):
  """Every user walks the catalogue cyclically (item i is followed by i + 1 mod N) from a
  random start; the held-out item is the next step, which only an order-aware model gets."""
  users, items, last = cyclic_walks(num_users, num_items, length)
  return _dataset(num_users, num_items, _interactions(users[~last], items[~last]),
                  _interactions([], []), _interactions(users[last], items[last]))


def test_sasrec_learns_a_planted_next_item_rule():
  data = _cyclic_walks()
  model = sasrec.SASRec(data, max_len=8, dim=16, depth=1, dropout=0.0, learning_rate=1e-2,
                        batch_size=32, num_negatives=16)
  losses = model.train(25)
  assert losses[-1] < 0.5 * losses[0]
  got = common.rank_split(model.ranker(), data, data.test)
  assert got["HR@10"] > 0.9


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_markov_chain_scores_equal_a_loop_over_each_users_timeline(decay):
  # Timestamps out of row order (the timeline is sorted by time), repeated items, a user with a
  # single item (no transition out of it), and an item never followed (an all-zero row).
  rng = np.random.default_rng(0)
  num_users, num_items, window = 6, 9, 3
  users = np.r_[np.repeat(np.arange(5), 7), 5]
  items = np.r_[rng.integers(0, num_items - 1, 35), 4]
  stamps = rng.permutation(users.size)
  data = _dataset(num_users, num_items, _interactions(users, items, stamps),
                  _interactions([], []), _interactions([0], [8]))
  model = markov.MarkovChain(data, decay=decay, window=window)
  timelines = {u: [int(i) for _, i in sorted((t, i) for uu, i, t in zip(users, items, stamps)
                                              if uu == u)] for u in range(num_users)}
  counts = np.zeros((num_items, num_items))
  for seq in timelines.values():
    for a, b in zip(seq[:-1], seq[1:]):
      counts[a, b] += 1
  probs = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  np.testing.assert_allclose(model.probabilities, probs, rtol=1e-6)
  expected = np.zeros((num_users, num_items))
  for u, seq in timelines.items():
    for k, j in enumerate(reversed(seq[-window:])):
      expected[u] += (decay ** k) * probs[j]
  ranker = model.ranker()
  got = np.asarray(ranker.score_fn(ranker.user_reps(np.arange(num_users)), ranker.item_table))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="decay"):
    markov.MarkovChain(data, decay=1.0)


def test_markov_chain_learns_a_planted_next_item_rule():
  # The latest item alone names the next one.
  data = _cyclic_walks()
  got = common.rank_split(markov.MarkovChain(data, decay=0.0).ranker(), data, data.test)
  assert got["HR@10"] == 1.0 and got["NDCG@10"] == 1.0
