"""Tests of training-example and evaluation-input construction."""

import dataclasses

import numpy as np
import pytest

from recfusion_jax.data.synthetic import make_synthetic
from recfusion_jax.data import examples
from recfusion_jax.data.types import (MODALITIES, PER_USER_KEYS, TRAIN_BATCH_SPEC, Catalogue,
                                      Interactions, RecDataset, feature_key)

HISTORY_LEN = 6
# Keys a raw-content interaction batch does not carry: per-user targets, precomputed features.
NOT_IN_INTERACTION_BATCH = set(PER_USER_KEYS) | {feature_key(m) for m in MODALITIES}


@pytest.fixture(scope="module")
def small() -> RecDataset:
  return make_synthetic(num_items=60, num_users=15, num_topics=4, min_interactions=4,
                        max_interactions=14, seed=1)


def _dataset_from_events(events: list[tuple[int, int, int]], num_items: int = 10,
                         num_users: int = 3) -> RecDataset:
  """A tiny data set with only text content; events are (user, item, timestamp)."""
  user, item, ts = (np.array(x) for x in zip(*events))
  train = Interactions(user.astype(np.int32), item.astype(np.int32), ts.astype(np.int64),
                       np.ones(len(events), np.float32))
  empty = train.select(np.zeros(len(events), bool))
  text_ids = np.arange(num_items * 3, dtype=np.int32).reshape(num_items, 3) + 1
  catalogue = Catalogue(text_ids=text_ids, text_mask=np.ones_like(text_ids, bool), image=None,
                        video=None, presence=np.tile([True, False, False], (num_items, 1)),
                        has_id=np.bincount(item, minlength=num_items) > 0)
  return RecDataset(catalogue, num_users, train, empty, empty,
                    np.flatnonzero(~catalogue.has_id).astype(np.int32),
                    np.ones(num_users, bool))


def _reference_history(train: Interactions, user: int, timestamp: int,
                       history_len: int) -> tuple[list[int], list[bool]]:
  """Naive: the user's train items strictly earlier in time, in (time, input) order."""
  rows = [i for i in range(len(train)) if train.user[i] == user and train.timestamp[i] < timestamp]
  rows.sort(key=lambda i: (train.timestamp[i], i))
  items = [int(train.item[i]) for i in rows][-history_len:]
  pad = history_len - len(items)
  return [0] * pad + items, [False] * pad + [True] * len(items)


def test_history_matches_naive_reference(small):
  index = examples.TrainExampleIndex.build(small)
  assert index.num_examples == len(small.train)
  ids = np.arange(index.num_examples)
  history, mask = index.history(ids, HISTORY_LEN)
  for e in ids:
    ref_items, ref_mask = _reference_history(small.train, index.user[e], index.timestamp[e],
                                             HISTORY_LEN)
    assert history[e].tolist() == ref_items and mask[e].tolist() == ref_mask, e
  # Examples are the train interactions, sorted by (user, time).
  order = np.lexsort((small.train.timestamp, small.train.user))
  np.testing.assert_array_equal(index.item, small.train.item[order])
  assert (np.diff(index.user) >= 0).all()


def test_history_is_strictly_earlier_with_ties():
  # User 0: items 2 and 3 share t=20, so neither is in the other's history.
  dataset = _dataset_from_events([(0, 4, 30), (0, 2, 20), (0, 1, 10), (0, 3, 20), (1, 5, 5),
                                  (1, 6, 7), (2, 7, 1)])
  index = examples.TrainExampleIndex.build(dataset)
  history, mask = index.history(np.arange(index.num_examples), 3)
  got = {(int(u), int(i)): [int(h) for h, m in zip(hh, mm) if m]
         for u, i, hh, mm in zip(index.user, index.item, history, mask)}
  assert got == {(0, 1): [], (0, 2): [1], (0, 3): [1], (0, 4): [1, 2, 3], (1, 5): [],
                 (1, 6): [5], (2, 7): []}
  # Left padding, most recent last.
  e = int(np.flatnonzero(index.item == 6)[0])
  assert history[e].tolist() == [0, 0, 5] and mask[e].tolist() == [False, False, True]
  # Truncated to the most recent items.
  e = int(np.flatnonzero(index.item == 4)[0])
  assert index.history(np.array([e]), 2)[0].tolist() == [[2, 3]]


def test_make_train_batch_contract_and_padding(small):
  index = examples.TrainExampleIndex.build(small)
  log_q = examples.item_log_q(small)
  ids = np.array([3, -1, 0, 7])
  batch = examples.make_train_batch(small, index, ids, HISTORY_LEN, log_q, batch_size=6)
  assert set(batch) == set(TRAIN_BATCH_SPEC) - NOT_IN_INTERACTION_BATCH
  c = small.catalogue
  dims = {"B": 6, "L": HISTORY_LEN, "Lt": c.text_ids.shape[1], "H": c.image.shape[1],
          "W": c.image.shape[2], "T": c.video.shape[1], "M": 3}
  for key, (dtype, shape) in TRAIN_BATCH_SPEC.items():
    if key in NOT_IN_INTERACTION_BATCH:
      continue
    expected = tuple(3 if d == "3" else dims[d] for d in shape.strip("[]").split(", "))
    assert batch[key].dtype == np.dtype(dtype) and batch[key].shape == expected, key
  valid = np.array([True, False, True, True, False, False])
  np.testing.assert_array_equal(batch["example_mask"], valid)
  real = np.array([3, 0, 7])
  item = index.item[real]
  np.testing.assert_array_equal(batch["item_id"][valid], item)
  np.testing.assert_array_equal(batch["user_id"][valid], index.user[real])
  np.testing.assert_array_equal(batch["log_q"][valid], log_q[item])
  np.testing.assert_array_equal(batch["image"][valid], c.image[item])
  np.testing.assert_array_equal(batch["video"][valid], c.video[item])
  np.testing.assert_array_equal(batch["text_ids"][valid], c.text_ids[item])
  np.testing.assert_array_equal(batch["presence"][valid], c.presence[item])
  np.testing.assert_array_equal(batch["item_has_id"][valid], c.has_id[item])
  history, _ = index.history(real, HISTORY_LEN)
  np.testing.assert_array_equal(batch["history"][valid], history)
  for key, value in batch.items():
    if key != "example_mask":
      assert not value[~valid].any(), key


def test_make_train_batch_omits_absent_modalities(small):
  catalogue = dataclasses.replace(small.catalogue, video=None)
  dataset = dataclasses.replace(small, catalogue=catalogue)
  index = examples.TrainExampleIndex.build(dataset)
  batch = examples.make_train_batch(dataset, index, np.arange(4), HISTORY_LEN,
                                    examples.item_log_q(dataset), 4)
  assert set(batch) == set(TRAIN_BATCH_SPEC) - {"video", *NOT_IN_INTERACTION_BATCH}


def test_make_train_batch_rejects_bad_ids(small):
  index = examples.TrainExampleIndex.build(small)
  log_q = examples.item_log_q(small)
  with pytest.raises(ValueError, match="example ids"):
    examples.make_train_batch(small, index, np.array([index.num_examples]), 4, log_q, 4)
  with pytest.raises(ValueError, match="example ids"):
    examples.make_train_batch(small, index, np.array([-2]), 4, log_q, 4)
  with pytest.raises(ValueError, match="batch_size"):
    examples.make_train_batch(small, index, np.arange(5), 4, log_q, 4)
  with pytest.raises(ValueError, match="history_len"):
    examples.make_train_batch(small, index, np.arange(2), 0, log_q, 4)
  with pytest.raises(ValueError, match="log_q"):
    examples.make_train_batch(small, index, np.arange(2), 4, log_q[:-1], 4)


def test_item_log_q(small):
  log_q = examples.item_log_q(small)
  assert log_q.dtype == np.float32 and log_q.shape == (small.catalogue.num_items,)
  assert abs(np.exp(log_q.astype(np.float64)).sum() - 1.0) < 1e-5
  counts = np.bincount(small.train.item, minlength=small.catalogue.num_items)
  seen = counts > 0
  # Proportional to counts among seen items; unseen get the floor share.
  ratio = np.exp(log_q[seen]) / counts[seen]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  np.testing.assert_allclose(np.exp(log_q[~seen]), ratio[0] * examples.LOG_Q_FLOOR_COUNT,
                             rtol=1e-5)


def test_user_eval_inputs(small):
  users = np.array([4, 0, 9])
  inputs = examples.user_eval_inputs(small, users, HISTORY_LEN)
  assert set(inputs) == {"user_id", "user_has_id", "history", "history_mask"}
  assert inputs["user_id"].dtype == np.int32 and inputs["history"].dtype == np.int32
  train = small.train
  for row, u in enumerate(users):
    rows = np.flatnonzero(train.user == u)
    rows = rows[np.argsort(train.timestamp[rows], kind="stable")]
    expected = train.item[rows][-HISTORY_LEN:].tolist()
    got = inputs["history"][row][inputs["history_mask"][row]].tolist()
    assert got == expected
    assert inputs["history_mask"][row].tolist() == sorted(inputs["history_mask"][row].tolist())


def test_user_without_train_items_has_empty_history():
  dataset = _dataset_from_events([(0, 1, 1), (2, 3, 1)])
  inputs = examples.user_eval_inputs(dataset, np.array([1, 2]), 3)
  assert inputs["history_mask"].tolist() == [[False] * 3, [False, False, True]]
  assert examples.known_items_of(dataset, np.array([1])).tolist() == [[-1]]


def test_known_and_heldout_item_lists(small):
  users = np.array([5, 2, 11, 0])
  # known=None means train; a set known (e.g. MovieLens' low ratings) replaces it.
  known_items = examples.known_items_of(small, users)
  extra = dataclasses.replace(small, known=small.test)
  for lists, inter in ((known_items, small.train),
                       (examples.known_items_of(extra, users), small.test),
                       (examples.heldout_items_of(small.test, users), small.test)):
    assert lists.dtype == np.int32
    for row, u in enumerate(users):
      got = lists[row][lists[row] >= 0]
      assert sorted(got.tolist()) == sorted(set(inter.item[inter.user == u].tolist()))
      # -1 padding only at the end.
      assert (lists[row][got.size:] == -1).all()
  with pytest.raises(ValueError, match="duplicates"):
    examples.known_items_of(small, np.array([1, 1]))
  with pytest.raises(ValueError, match="user ids"):
    examples.known_items_of(small, np.array([small.num_users]))


def test_index_at_100k_with_ties_matches_reference():
  # Vectorised build: 100k examples of 5k users with many equal timestamps.
  rng = np.random.default_rng(0)
  n, num_users, num_items = 100_000, 5_000, 3_000
  train = Interactions(rng.integers(0, num_users, n).astype(np.int32),
                       rng.integers(0, num_items, n).astype(np.int32),
                       rng.integers(0, 10_000, n).astype(np.int64), np.ones(n, np.float32))
  empty = train.select(np.zeros(n, bool))
  catalogue = Catalogue(None, None, None, None, np.zeros((num_items, 3), bool),
                        np.ones(num_items, bool))
  dataset = RecDataset(catalogue, num_users, train, empty, empty, np.zeros(0, np.int32),
                       np.ones(num_users, bool))
  index = examples.TrainExampleIndex.build(dataset)
  history, mask = index.history(np.arange(n), 50)
  # Spot-check ties against the reference on a few examples.
  for e in rng.integers(0, n, 20):
    u, t = index.user[e], index.timestamp[e]
    rows = np.flatnonzero((train.user == u) & (train.timestamp < t))
    rows = rows[np.lexsort((rows, train.timestamp[rows]))][-50:]
    assert history[e][mask[e]].tolist() == train.item[rows].tolist()


def test_history_without_target_matches_naive_reference(small):
  index = examples.TrainExampleIndex.build(small)
  ids = np.arange(index.num_examples)
  for length in (1, HISTORY_LEN, 500):
    history, mask = index.history_without(ids, length)
    assert history.shape == (ids.size, length)
    for e in ids:
      u = index.user[e]
      # Naive: the user's train items in (time, input) order, minus the example, latest last.
      rows = [i for i in range(len(small.train)) if small.train.user[i] == u]
      rows.sort(key=lambda i: (small.train.timestamp[i], i))
      own = np.flatnonzero(index.user == u)   # the index's order of the same rows
      items = [int(small.train.item[i]) for k, i in enumerate(rows) if own[k] != e][-length:]
      pad = length - len(items)
      assert history[e].tolist() == [0] * pad + items, (length, e)
      assert mask[e].tolist() == [False] * pad + [True] * len(items), (length, e)


def test_train_batch_history_kinds(small):
  index = examples.TrainExampleIndex.build(small)
  log_q = examples.item_log_q(small)
  ids = np.arange(min(8, index.num_examples))
  earlier = examples.make_train_batch(small, index, ids, HISTORY_LEN, log_q, 8)
  others = examples.make_train_batch(small, index, ids, HISTORY_LEN, log_q, 8,
                                     history="all_others")
  np.testing.assert_array_equal(earlier["item_id"], others["item_id"])
  # The user's first interaction has no earlier items but does have other ones.
  first = int(np.flatnonzero(index.hist_end[ids] == index.hist_start[ids])[0])
  assert not earlier["history_mask"][first].any() and others["history_mask"][first].any()
  with pytest.raises(ValueError, match="history"):
    examples.make_train_batch(small, index, ids, HISTORY_LEN, log_q, 8, history="future")


def _timeline(train: Interactions, user: int) -> list[int]:
  """Naive: the user's train items in (time, input) order."""
  rows = sorted((i for i in range(len(train)) if train.user[i] == user),
                key=lambda i: (train.timestamp[i], i))
  return [int(train.item[i]) for i in rows]


def _user_batch(small, users, kind, seed=0, batch_size=8, share=0.3):
  index = examples.TrainExampleIndex.build(small)
  return examples.make_user_batch(small, index, np.asarray(users), history_len=HISTORY_LEN,
                                  log_q=examples.item_log_q(small), batch_size=batch_size,
                                  kind=kind, target_share=share, seed=seed)


def test_cloze_user_batch_hides_targets_from_the_history(small):
  users = np.array([0, 3, 5, 7, 11, -1])
  batch = _user_batch(small, users, "cloze")
  interaction = examples.make_train_batch(small, examples.TrainExampleIndex.build(small),
                                          np.array([0]), HISTORY_LEN,
                                          examples.item_log_q(small), batch_size=1)
  assert set(batch) == set(interaction) | {"targets", "target_mask"}
  for key, (dtype, _) in TRAIN_BATCH_SPEC.items():
    if key in batch:
      assert batch[key].dtype == np.dtype(dtype), key
  for row, user in enumerate(users):
    if user < 0:
      assert not batch["example_mask"][row] and not batch["target_mask"][row].any()
      continue
    window = _timeline(small.train, user)[-HISTORY_LEN:]
    slots = batch["history_mask"][row] | batch["target_mask"][row]
    # Every window item is either visible history or a target, never both, never neither.
    assert not (batch["history_mask"][row] & batch["target_mask"][row]).any()
    assert batch["history"][row][slots].tolist() == window
    assert batch["targets"][row][batch["target_mask"][row]].tolist() == [
        i for i, t in zip(batch["history"][row][slots], batch["target_mask"][row][slots]) if t]
    assert batch["target_mask"][row].any()
    assert batch["item_id"][row] in batch["targets"][row][batch["target_mask"][row]]
  # Rows 6, 7 are padding of the partial batch.
  assert not batch["example_mask"][6:].any()
  # A pure function of (seed, users): a restored pipeline rebuilds the same batch.
  again = _user_batch(small, users, "cloze")
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])
  other = _user_batch(small, users, "cloze", seed=1)
  assert not np.array_equal(batch["target_mask"], other["target_mask"])


def test_cloze_target_share_is_respected(small):
  users = np.arange(small.num_users)
  shares = []
  for seed in range(40):
    b = _user_batch(small, users, "cloze", seed=seed, batch_size=small.num_users, share=0.3)
    shares.append(b["target_mask"].sum() / (b["target_mask"] | b["history_mask"]).sum())
  # Windows of 6 with >= 1 forced target: expected share a little above 0.3.
  assert 0.3 < np.mean(shares) < 0.4


def test_next_item_user_batch_pairs_each_position_with_its_successor(small):
  users = np.array([2, 4, 9])
  batch = _user_batch(small, users, "next")
  for row, user in enumerate(users):
    window = _timeline(small.train, user)[-(HISTORY_LEN + 1):]
    pairs = [(h, t) for h, t, m in zip(batch["history"][row], batch["targets"][row],
                                       batch["target_mask"][row]) if m]
    assert pairs == list(zip(window[:-1], window[1:]))
    assert batch["item_id"][row] == window[-1]


def test_user_batch_rejects_bad_arguments(small):
  with pytest.raises(ValueError, match="cloze"):
    _user_batch(small, [0], "interaction")
  with pytest.raises(ValueError, match="target_share"):
    _user_batch(small, [0], "cloze", share=1.0)
  with pytest.raises(ValueError, match="user ids"):
    _user_batch(small, [small.num_users], "cloze")


def test_next_item_sampled_positions_are_distinct_transitions_of_the_row(small):
  """``next_positions`` = K keeps K of a row's transitions (all when it has fewer), drawn
  from the row's own generator: a pure function of seed, user and epoch."""
  users = np.arange(small.num_users)
  every = _user_batch(small, users, "next", batch_size=small.num_users)
  index = examples.TrainExampleIndex.build(small)

  def sampled(k, epochs=None, seed=0):
    return examples.make_user_batch(
        small, index, users, history_len=HISTORY_LEN, log_q=examples.item_log_q(small),
        batch_size=small.num_users, kind="next", target_share=0.3, seed=seed, epochs=epochs,
        next_positions=k)

  batch = sampled(3)
  slots, mask = batch["target_positions"], batch["target_mask"]
  assert slots.shape == mask.shape == batch["targets"].shape == (small.num_users, 3)
  for row in range(small.num_users):
    transitions = set(np.flatnonzero(every["target_mask"][row]).tolist())
    kept = slots[row][mask[row]].tolist()
    assert len(set(kept)) == len(kept) == min(3, len(transitions))
    assert set(kept) <= transitions
    np.testing.assert_array_equal(batch["targets"][row][mask[row]],
                                  every["targets"][row][kept])
  np.testing.assert_array_equal(sampled(3)["target_positions"], slots)
  assert not np.array_equal(sampled(3, epochs=np.ones(small.num_users, np.int64))
                            ["target_positions"], slots)
  # Every transition drawn: the same pairs as the unsampled row, in another order.
  whole = sampled(HISTORY_LEN)
  for row in range(small.num_users):
    assert (sorted(whole["targets"][row][whole["target_mask"][row]].tolist())
            == sorted(every["targets"][row][every["target_mask"][row]].tolist()))
  with pytest.raises(ValueError, match="next_positions"):
    sampled(HISTORY_LEN + 1)
  with pytest.raises(ValueError, match="next_positions"):
    examples.make_user_batch(small, index, users, history_len=HISTORY_LEN,
                             log_q=examples.item_log_q(small), batch_size=small.num_users,
                             kind="cloze", target_share=0.3, seed=0, next_positions=2)


def test_next_item_random_windows_cover_every_transition_of_a_long_timeline(small):
  """``next_window='random'``: a row reads ``history_len + 1`` consecutive items from anywhere
  in the user's timeline (a pure function of seed, user and epoch); over epochs the windows
  cover every transition, where the latest window covers only its own. Timelines no longer
  than a window read the same row as ``'latest'``."""
  index = examples.TrainExampleIndex.build(small)
  users = np.arange(small.num_users)

  def batch(window, epoch, seed=0, positions=0):
    return examples.make_user_batch(
        small, index, users, history_len=HISTORY_LEN, log_q=examples.item_log_q(small),
        batch_size=small.num_users, kind="next", target_share=0.3, seed=seed,
        epochs=np.full(small.num_users, epoch, np.int64), next_positions=positions,
        next_window=window)

  latest = batch("latest", 0)
  covered = {int(u): set() for u in users}
  for epoch in range(60):
    rows = batch("random", epoch)
    for row, user in enumerate(users):
      timeline = _timeline(small.train, user)
      pairs = [(int(h), int(t)) for h, t, m in zip(rows["history"][row], rows["targets"][row],
                                                   rows["target_mask"][row]) if m]
      window = [pairs[0][0]] + [t for _, t in pairs]
      # Consecutive items of the timeline, as long as the window allows.
      assert len(window) == min(len(timeline), HISTORY_LEN + 1)
      starts = [s for s in range(len(timeline) - len(window) + 1)
                if timeline[s:s + len(window)] == window]
      assert starts, (user, window)
      assert rows["item_id"][row] == window[-1]
      covered[int(user)].update(pairs)
      if len(timeline) <= HISTORY_LEN + 1:
        for key in ("history", "targets", "target_mask", "item_id"):
          np.testing.assert_array_equal(rows[key][row], latest[key][row])
  long_users = [u for u in covered if len(_timeline(small.train, u)) > HISTORY_LEN + 1]
  assert long_users   # the fixture has timelines longer than a window
  for user in covered:
    timeline = _timeline(small.train, user)
    assert covered[user] == set(zip(timeline, timeline[1:])), user
  # Seeded per row and epoch, and the scored transitions drawn as before (draw 0).
  np.testing.assert_array_equal(batch("random", 3)["history"], batch("random", 3)["history"])
  assert not np.array_equal(batch("random", 3)["history"], batch("random", 4)["history"])
  np.testing.assert_array_equal(batch("random", 5, positions=2)["target_positions"],
                                batch("latest", 5, positions=2)["target_positions"])
  with pytest.raises(ValueError, match="next_window"):
    batch("oldest", 0)
  with pytest.raises(ValueError, match="next_window"):
    examples.make_user_batch(small, index, users, history_len=HISTORY_LEN,
                             log_q=examples.item_log_q(small), batch_size=small.num_users,
                             kind="cloze", target_share=0.3, seed=0, next_window="random")
