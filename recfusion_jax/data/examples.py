"""Turns a RecDataset into model inputs: training batches and evaluation inputs.

Shared by every data source (synthetic, MovieLens). Everything here is vectorised numpy so it
can run inside Grain workers without importing JAX.

A training example is one train interaction (the positive) together with the user's history,
most recent last, of one of two kinds (``HISTORY_KINDS``):

  earlier     the user's train items with a strictly earlier timestamp: next-item prediction,
              the right task where the held-out items are each user's latest (``loo``).
              Interactions that share a timestamp are not in each other's history, because
              their true order is unknown and letting one see the other would leak the target.
  all_others  the user's latest ``history_len`` train items other than the target: the right
              task where held-out items are drawn at random from the whole timeline (warm_ratio
              and the cold-start splits), since at evaluation the model sees exactly that
              window (the latest items) and the held-out items may be older than some of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recfusion_jax.data.types import TRAIN_BATCH_SPEC, Interactions, RecDataset

# Items never seen as a train positive get this share of one observation when computing the
# logQ sampling probability, so log_q stays finite (they are never in-batch negatives anyway).
LOG_Q_FLOOR_COUNT = 0.1

# Padding value for item-id lists (known_items_of / heldout_items_of).
PAD_ITEM = -1

HISTORY_KINDS = ("earlier", "all_others")

# Training examples: one interaction per row (with a history of ``HISTORY_KINDS``), or one
# user per row with several targets (``make_user_batch``).
EXAMPLE_KINDS = ("interaction", "cloze", "next")
# Which window of a user's timeline a next-item row reads (``make_user_batch``).
NEXT_WINDOWS = ("latest", "random")


@dataclasses.dataclass(frozen=True)
class TrainExampleIndex:
  """Train interactions sorted by (user, timestamp), with each one's history range.

  Example ``e`` is the ``e``-th interaction in that order. Its history is
  ``item[hist_start[e]:hist_end[e]]`` (the user's strictly earlier train items); callers keep
  the last ``history_len`` of them.
  """

  user: np.ndarray         # [E] int32
  item: np.ndarray         # [E] int32
  timestamp: np.ndarray    # [E] int64
  hist_start: np.ndarray   # [E] int64: first position of the user's train items
  hist_end: np.ndarray     # [E] int64: first position with the example's (user, timestamp)
  user_start: np.ndarray   # [num_users] int64: the user's train items are
  user_end: np.ndarray     # [num_users] int64: item[user_start[u]:user_end[u]], time ordered

  @property
  def num_examples(self) -> int:
    return int(self.user.shape[0])

  @classmethod
  def build(cls, dataset: RecDataset) -> "TrainExampleIndex":
    """Indexes ``dataset.train``; O(E log E) vectorised numpy."""
    train = dataset.train
    _check_interactions(train, dataset.num_users, dataset.catalogue.num_items, "train")
    # Stable sort: equal (user, timestamp) keep input order, which only matters for eval.
    order = np.lexsort((train.timestamp, train.user))
    user = train.user[order].astype(np.int32)
    item = train.item[order].astype(np.int32)
    timestamp = train.timestamp[order].astype(np.int64)
    positions = np.arange(user.size, dtype=np.int64)
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_time = new_user | np.r_[True, timestamp[1:] != timestamp[:-1]]
    # Running maximum of group-start positions = start of the current group, per row.
    hist_start = np.maximum.accumulate(np.where(new_user, positions, 0))
    hist_end = np.maximum.accumulate(np.where(new_time, positions, 0))
    users = np.arange(dataset.num_users)
    user_start = np.searchsorted(user, users, side="left").astype(np.int64)
    user_end = np.searchsorted(user, users, side="right").astype(np.int64)
    return cls(user=user, item=item, timestamp=timestamp, hist_start=hist_start,
               hist_end=hist_end, user_start=user_start, user_end=user_end)

  def history(self, example_ids: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """([B, L] int32 item ids, [B, L] bool mask), left-padded, most recent last."""
    return _window(self.item, self.hist_start[example_ids], self.hist_end[example_ids],
                   history_len)

  def history_without(self, example_ids: np.ndarray, history_len: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The user's latest ``history_len`` train items other than the example itself."""
    if history_len < 1:
      raise ValueError(f"history_len must be >= 1, got {history_len}")
    start = self.user_start[self.user[example_ids]][:, None]
    end = self.user_end[self.user[example_ids]][:, None]
    # The latest history_len + 1 positions: the target's own position is dropped if it is
    # among them, the oldest otherwise.
    positions = end - (history_len + 1) + np.arange(history_len + 1)[None, :]
    keep = (positions >= start) & (positions != example_ids[:, None])
    target_inside = (positions == example_ids[:, None]).any(1)
    keep[:, 0] &= target_inside
    # Right-align the kept slots (a stable sort keeps their time order).
    order = np.argsort(keep, axis=1, kind="stable")[:, 1:]
    positions = np.take_along_axis(positions, order, axis=1)
    mask = np.take_along_axis(keep, order, axis=1)
    items = self.item[np.where(mask, positions, 0)] if self.item.size else np.zeros(mask.shape)
    return np.where(mask, items, 0).astype(np.int32), mask

  def user_history(self, users: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``history_len`` train items of each user (the whole train history)."""
    return _window(self.item, self.user_start[users], self.user_end[users], history_len)


def _window(values: np.ndarray, start: np.ndarray, end: np.ndarray,
            length: int) -> tuple[np.ndarray, np.ndarray]:
  """values[max(start, end - length):end] per row, right-aligned in a [B, length] array."""
  if length < 1:
    raise ValueError(f"history_len must be >= 1, got {length}")
  positions = end[:, None] - length + np.arange(length)[None, :]
  mask = positions >= start[:, None]
  # Padding slots point at a valid row; their value is then zeroed.
  out = values[np.where(mask, positions, 0)] if values.size else np.zeros(mask.shape, np.int32)
  return np.where(mask, out, 0).astype(np.int32), mask


def _check_interactions(interactions: Interactions, num_users: int, num_items: int,
                        name: str):
  n = len(interactions)
  for field in ("item", "timestamp", "rating"):
    if getattr(interactions, field).shape != (n,):
      raise ValueError(f"{name}.{field} must have shape ({n},), "
                       f"got {getattr(interactions, field).shape}")
  if n and (interactions.user.min() < 0 or interactions.user.max() >= num_users):
    raise ValueError(f"{name}.user out of range [0, {num_users})")
  if n and (interactions.item.min() < 0 or interactions.item.max() >= num_items):
    raise ValueError(f"{name}.item out of range [0, {num_items})")


def item_log_q(dataset: RecDataset) -> np.ndarray:
  """[N] float32 log of each item's frequency among train positives.

  This is the probability that an in-batch negative is that item (logQ correction). Items with
  no train positive get ``LOG_Q_FLOOR_COUNT`` of one observation, then all are renormalised so
  ``exp(log_q)`` sums to 1.
  """
  num_items = dataset.catalogue.num_items
  if len(dataset.train) == 0:
    raise ValueError("item_log_q needs at least one train interaction")
  counts = np.bincount(dataset.train.item, minlength=num_items).astype(np.float64)
  counts = np.where(counts > 0, counts, LOG_Q_FLOOR_COUNT)
  return np.log(counts / counts.sum()).astype(np.float32)


def make_train_batch(dataset: RecDataset, index: TrainExampleIndex, example_ids: np.ndarray,
                     history_len: int, log_q: np.ndarray, batch_size: int,
                     history: str = "earlier") -> dict[str, np.ndarray]:
  """Gathers a training batch with the TRAIN_BATCH_SPEC keys for ``example_ids``.

  ``example_ids`` holds at most ``batch_size`` ids in [0, index.num_examples) or -1; -1 entries
  and the rows past ``len(example_ids)`` are padding: example_mask False, every other field
  zero/False. Content keys whose catalogue field is None are omitted.
  """
  example_ids = np.asarray(example_ids)
  if example_ids.ndim != 1 or not np.issubdtype(example_ids.dtype, np.integer):
    raise ValueError(f"example_ids must be a 1-D integer array, got {example_ids.dtype} "
                     f"{example_ids.shape}")
  if example_ids.size > batch_size:
    raise ValueError(f"{example_ids.size} example ids do not fit batch_size={batch_size}")
  if example_ids.size and (example_ids.min() < -1 or example_ids.max() >= index.num_examples):
    raise ValueError(f"example ids must be in [0, {index.num_examples}) or -1 (padding)")
  if log_q.shape != (dataset.catalogue.num_items,):
    raise ValueError(f"log_q must have shape ({dataset.catalogue.num_items},), "
                     f"got {log_q.shape}")
  valid = np.zeros(batch_size, dtype=bool)
  valid[:example_ids.size] = example_ids >= 0
  ids = np.zeros(batch_size, dtype=np.int64)
  ids[:example_ids.size] = np.maximum(example_ids, 0)

  user = index.user[ids]
  item = index.item[ids]
  if history == "earlier":
    history, history_mask = index.history(ids, history_len)
  elif history == "all_others":
    history, history_mask = index.history_without(ids, history_len)
  else:
    raise ValueError(f"history={history!r}; choose from {HISTORY_KINDS}")
  batch = {
      "user_id": user,
      "user_has_id": dataset.user_has_id[user],
      "history": history,
      "history_mask": history_mask,
      "item_id": item,
      "log_q": log_q[item],
      "example_mask": valid,
  }
  return _finish_batch(batch, dataset, item, valid)


def _finish_batch(batch: dict[str, np.ndarray], dataset: RecDataset, item: np.ndarray,
                  valid: np.ndarray) -> dict[str, np.ndarray]:
  """Adds the rows' item content, zeroes padding rows, casts to TRAIN_BATCH_SPEC dtypes."""
  batch.update(dataset.catalogue.content(item))
  if not valid.all():
    # Padding rows would otherwise carry example 0's data; zero them so no consumer can use it.
    for key, value in batch.items():
      if key != "example_mask":
        value[~valid] = 0
  return {key: batch[key].astype(TRAIN_BATCH_SPEC[key][0], copy=False)
          for key in TRAIN_BATCH_SPEC if key in batch}


class TrainBatchFn:
  """Picklable ``example_ids -> batch`` callable for Grain (workers are spawned processes)."""

  def __init__(self, dataset: RecDataset, index: TrainExampleIndex, history_len: int,
               log_q: np.ndarray, batch_size: int, history: str = "earlier"):
    if history not in HISTORY_KINDS:
      raise ValueError(f"history={history!r}; choose from {HISTORY_KINDS}")
    self.history = history
    self.dataset = dataset
    self.index = index
    self.history_len = history_len
    self.log_q = log_q
    self.batch_size = batch_size

  def __call__(self, example_ids: np.ndarray) -> dict[str, np.ndarray]:
    return make_train_batch(self.dataset, self.index, example_ids, self.history_len,
                            self.log_q, self.batch_size, self.history)


def make_user_batch(dataset: RecDataset, index: TrainExampleIndex, users: np.ndarray, *,
                    history_len: int, log_q: np.ndarray, batch_size: int, kind: str,
                    target_share: float, seed: int, epochs: np.ndarray | None = None,
                    next_positions: int = 0,
                    next_window: str = "latest") -> dict[str, np.ndarray]:
  """A batch of whole users, each with several targets (TRAIN_BATCH_SPEC keys).

  One forward pass of the user model serves every target of its row, where an interaction
  batch spends one pass per target; that is the cheaper way to many epochs.

  kind "cloze" (random hold-outs, e.g. warm_ratio): the window is the user's latest
    ``history_len`` train items; each is hidden from the history and made a target with
    probability ``target_share`` (at least one per user), mirroring evaluation, which ranks
    items held out at random from the user's timeline given the rest.
  kind "next" (next-item protocols, e.g. loo): the window is the user's latest
    ``history_len + 1`` items in time order; history slot t holds item t and its target is
    item t + 1, so a causal user model learns every transition of the window at once.
    ``next_positions`` > 0 keeps that many of a row's transitions, drawn at random without
    replacement (all of them when the row has fewer), as ``target_positions`` [B, K] (the
    history slots whose user state is scored) with their ``targets`` / ``target_mask``
    [B, K]: the catalogue term then scores K user states a row instead of ``history_len``,
    its cost in a next-item step (docs/TUNING.md §16).
    ``next_window`` "random" reads any ``history_len + 1`` consecutive items of the user's
    timeline instead of the latest, the start drawn uniformly from the row's generator: over
    epochs every transition of a long timeline is trained, not only the latest window's (a
    window of 51 holds 40% of MovieLens-100k's transitions; SASRec trains on all of them).

  ``item_id`` (whose content the encoder trains on, with the in-batch and contrastive terms)
  is one of the row's targets: a random one (cloze) or the latest (next). ``users`` holds
  user ids or -1 (padding rows). A row's random choices are a pure function of ``seed``, its
  user and its epoch (``epochs``, one per row; default 0): not of the other rows of the batch,
  so a restored pipeline reproduces them and P processes, each building its block of a global
  batch, draw what one process draws for the whole of it.
  """
  if kind not in ("cloze", "next"):
    raise ValueError(f"user batches are 'cloze' or 'next', got {kind!r}")
  if not 0.0 < target_share < 1.0:
    raise ValueError(f"target_share must be in (0, 1), got {target_share}")
  users = np.asarray(users)
  if users.ndim != 1 or users.size > batch_size:
    raise ValueError(f"users must be 1-D with at most {batch_size} entries, got {users.shape}")
  valid = np.zeros(batch_size, dtype=bool)
  valid[:users.size] = users >= 0
  ids = np.zeros(batch_size, dtype=np.int64)
  ids[:users.size] = np.maximum(users, 0)
  if ids.max(initial=0) >= dataset.num_users:
    raise ValueError(f"user ids must be < {dataset.num_users}")
  if next_window not in NEXT_WINDOWS or (next_window != "latest" and kind != "next"):
    raise ValueError(f"data.next_window={next_window!r} must be one of {NEXT_WINDOWS}, and "
                     f"'latest' for rows of kind {kind!r} (a window choice of 'next' rows)")
  if not 0 <= next_positions <= history_len or (next_positions and kind != "next"):
    raise ValueError(f"next_positions must be in 0..history_len ({history_len}) and is for "
                     f"'next' rows only, got {next_positions} with kind {kind!r}")
  epochs = np.zeros(batch_size, np.int64) if epochs is None else np.asarray(epochs)
  if epochs.shape != (batch_size,):
    raise ValueError(f"epochs must have shape ({batch_size},), got {epochs.shape}")

  def row_draws(num: int) -> np.ndarray:
    # [B, num, history_len] uniform draws, from each row's own generator.
    return np.stack([np.random.default_rng([seed, int(e), int(u)]).random((num, history_len))
                     if ok else np.zeros((num, history_len))
                     for u, e, ok in zip(ids.tolist(), epochs.tolist(), valid.tolist())])

  extra = {}
  if kind == "cloze":
    window, in_window = index.user_history(ids, history_len)
    in_window &= valid[:, None]
    draws = row_draws(3)
    hidden = (draws[:, 0] < target_share) & in_window
    # Rows with items but no target get one: every user contributes a target each epoch.
    none = ~hidden.any(1) & in_window.any(1)
    if none.any():
      scores = np.where(in_window[none], draws[none, 1], -1.0)
      hidden[np.flatnonzero(none), np.argmax(scores, 1)] = True
    # A user with a single item has nothing left to read: the learned default user, plus the
    # user's ID embedding, then stands for the history (as for a cold user at evaluation).
    history, history_mask = window, in_window & ~hidden
    targets, target_mask = window, hidden
    pick = np.argmax(np.where(hidden, draws[:, 2], -1.0), axis=1)
    item = window[np.arange(batch_size), pick]
  else:
    # Draw 0 of each row's generator picks its scored transitions, draw 1 its window's start;
    # the rows' generators are built once for both (row_draws(2)[:, 0] == row_draws(1)[:, 0]).
    draws = row_draws(2) if next_window == "random" else None
    if draws is not None:
      start, end = index.user_start[ids], index.user_end[ids]
      slack = np.maximum(end - start - (history_len + 1), 0)
      end = end - np.floor(draws[:, 1, 0] * (slack + 1)).astype(end.dtype)
      window, in_window = _window(index.item, start, end, history_len + 1)
    else:
      window, in_window = index.user_history(ids, history_len + 1)
    in_window &= valid[:, None]
    history, history_mask = window[:, :-1], in_window[:, :-1]
    targets = window[:, 1:]
    target_mask = in_window[:, 1:] & in_window[:, :-1]   # a transition needs both ends
    item = window[:, -1]
    if next_positions:
      # The K transitions with the largest draws; padding slots sort last and stay masked.
      first = (row_draws(1) if draws is None else draws)[:, 0]
      order = np.argsort(-np.where(target_mask, first, -1.0), axis=1, kind="stable")
      positions = order[:, :next_positions]
      targets = np.take_along_axis(targets, positions, axis=1)
      target_mask = np.take_along_axis(target_mask, positions, axis=1)
      extra["target_positions"] = positions
  has_target = target_mask.any(1)
  valid &= has_target
  batch = {
      "user_id": ids,
      "user_has_id": dataset.user_has_id[ids],
      "history": history,
      "history_mask": history_mask & valid[:, None],
      "item_id": item,
      "log_q": log_q[item],
      "targets": targets,
      "target_mask": target_mask & valid[:, None],
      "example_mask": valid,
      **extra,
  }
  return _finish_batch(batch, dataset, item, valid)


class UserBatchFn:
  """Picklable ``user ids -> batch`` callable for Grain (see ``make_user_batch``)."""

  def __init__(self, dataset: RecDataset, index: TrainExampleIndex, users: np.ndarray, *,
               history_len: int, log_q: np.ndarray, batch_size: int, kind: str,
               target_share: float, seed: int, next_positions: int = 0,
               next_window: str = "latest"):
    self.dataset, self.index, self.users = dataset, index, users
    self.kwargs = dict(history_len=history_len, log_q=log_q, batch_size=batch_size, kind=kind,
                       target_share=target_share, seed=seed, next_positions=next_positions,
                       next_window=next_window)

  def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``rows``: [2, B] (position in ``users`` or -1, epoch) from ``example_id_batches(...,
    with_epochs=True)``, or [B] positions (epoch 0)."""
    rows = np.asarray(rows)
    positions, epochs = (rows[0], rows[1]) if rows.ndim == 2 else (rows, None)
    users = np.where(positions >= 0, self.users[np.maximum(positions, 0)], -1)
    return make_user_batch(self.dataset, self.index, users, epochs=epochs, **self.kwargs)


def trained_users(index: TrainExampleIndex) -> np.ndarray:
  """Users with at least one train item (the rows a per-user epoch visits), ascending."""
  return np.flatnonzero(index.user_end > index.user_start).astype(np.int64)


def user_eval_inputs(dataset: RecDataset, users: np.ndarray, history_len: int,
                     index: TrainExampleIndex | None = None) -> dict[str, np.ndarray]:
  """User-side inputs for ranking: user_id, user_has_id, history, history_mask.

  The history is each user's last ``history_len`` train items, most recent last. Pass
  ``index`` to reuse an already built TrainExampleIndex.
  """
  users = _check_users(users, dataset.num_users)
  index = TrainExampleIndex.build(dataset) if index is None else index
  history, history_mask = index.user_history(users, history_len)
  return {
      "user_id": users.astype(np.int32),
      "user_has_id": dataset.user_has_id[users],
      "history": history,
      "history_mask": history_mask,
  }


def known_items_of(dataset: RecDataset, users: np.ndarray) -> np.ndarray:
  """[len(users), max_count] int32 distinct known items per user, -1 padded: what every
  evaluation excludes from the user's ranking (``RecDataset.known``, default ``train``)."""
  return _padded_items(dataset.known_or_train(), users, dataset.num_users)


def heldout_items_of(interactions: Interactions, users: np.ndarray,
                     num_users: int | None = None) -> np.ndarray:
  """[len(users), max_count] int32 distinct items of ``interactions`` per user, -1 padded."""
  if num_users is None:
    num_users = int(max(np.max(users, initial=-1), np.max(interactions.user, initial=-1))) + 1
  return _padded_items(interactions, users, num_users)


def _check_users(users: np.ndarray, num_users: int) -> np.ndarray:
  users = np.asarray(users)
  if users.ndim != 1 or not np.issubdtype(users.dtype, np.integer):
    raise ValueError(f"users must be a 1-D integer array, got {users.dtype} {users.shape}")
  if users.size and (users.min() < 0 or users.max() >= num_users):
    raise ValueError(f"user ids must be in [0, {num_users})")
  return users.astype(np.int64)


def _padded_items(interactions: Interactions, users: np.ndarray, num_users: int) -> np.ndarray:
  users = _check_users(users, num_users)
  if np.unique(users).size != users.size:
    raise ValueError("users must not contain duplicates")
  row_of_user = np.full(num_users, -1, dtype=np.int64)
  row_of_user[users] = np.arange(users.size)
  inter_user = interactions.user.astype(np.int64)
  if inter_user.size and (inter_user.min() < 0 or inter_user.max() >= num_users):
    raise ValueError(f"interaction user ids must be in [0, {num_users})")
  rows = row_of_user[inter_user]
  keep = rows >= 0
  # Distinct (row, item) pairs, sorted by row then item.
  pairs = np.unique((rows[keep] << 32) | interactions.item[keep].astype(np.int64))
  rows, items = pairs >> 32, pairs & 0xFFFFFFFF
  counts = np.bincount(rows, minlength=users.size)
  out = np.full((users.size, max(1, int(counts.max(initial=0)))), PAD_ITEM, dtype=np.int32)
  starts = np.cumsum(counts) - counts
  out[rows, np.arange(rows.size) - starts[rows]] = items
  return out
