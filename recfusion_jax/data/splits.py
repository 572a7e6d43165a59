"""Deterministic evaluation splits of an interaction log (pure NumPy), exported as TSV.

One implementation for every producer: ``python -m data_prep.movielens`` writes the MovieLens
splits with it, the synthetic generator labels its log with ``loo`` and the benchmark's
synthetic suite draws its missing-modality mask with ``choose_dropped_modalities``.

Every protocol labels every (cleaned) interaction row with one of ``SPLIT_LABELS`` and writes
``<out>/<protocol>/seed<k>.tsv`` with columns ``user item rating timestamp split`` (raw data-set
ids), plus ``seed<k>.json`` with the parameters and counts. Another library can therefore score
exactly the same split: train on the ``train`` rows, tune on ``valid``, evaluate on ``test``,
counting as positive only rows with ``rating >= positive_min_rating`` when the json gives one.

``valid`` is always carved out of what would otherwise be training data, never out of ``test``.

Protocols:
  warm_ratio: random 80/20 of all ratings; 10% of the 80% is ``valid``; positives are
    ratings >= 4 (the Cornac ``RatioSplit`` + ``rating_threshold=4`` protocol). Held-out rows
    whose user or item has no ``train`` row are labelled ``excluded`` (Cornac's
    ``exclude_unknowns``), so the protocol stays warm.
  loo: per user, time order (ties: log order; data_prep sorts the log by user, timestamp,
    item); the last interaction is ``test``, the second-last ``valid``, all ratings count as
    positives.
  cold_items: 20% of the items that have both text and poster go to ``test`` with all their
    interactions; a further 10% of them go to ``valid`` the same way. All ratings are positives.
  cold_users: 20% of the users with more than k interactions are test users: their first k
    interactions (time order) stay in ``train``, the rest is ``test``; another 10% are valid
    users, handled the same way into ``valid``. All ratings are positives.
  missing_modality: the warm_ratio split, plus a per-item test-time modality mask
    (``seed<k>_modality_mask.tsv``): of the test items that have both text and poster, a
    fraction (0.3) loses one of the two, chosen at random. Items missing a modality naturally
    are reported separately in the json.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from etils import epath

PROTOCOLS: tuple[str, ...] = ("warm_ratio", "loo", "cold_items", "cold_users", "missing_modality")
SPLIT_LABELS: tuple[str, ...] = ("train", "valid", "test", "excluded")
TSV_HEADER = "user\titem\trating\ttimestamp\tsplit"
MASK_HEADER = "item\ttext\timage\tdropped"


@dataclasses.dataclass
class LogArrays:
  """An interaction log with raw ids (splits break timestamp ties by ``_tie_key``)."""

  user: np.ndarray       # int64 raw user ids
  item: np.ndarray       # int64 raw item ids
  rating: np.ndarray     # float32
  timestamp: np.ndarray  # int64

  def __len__(self) -> int:
    return int(self.user.shape[0])


@dataclasses.dataclass
class Split:
  """One protocol/seed: a label per log row, metadata, and (missing_modality) a modality mask."""

  protocol: str
  seed: int
  labels: np.ndarray                       # [len(log)] str, one of SPLIT_LABELS
  meta: dict
  # missing_modality only: raw item id -> (text available, image available, dropped modality).
  modality_mask: dict[int, tuple[bool, bool, str]] | None = None


def _tie_key(log: LogArrays, seed: int) -> np.ndarray:
  """A pseudo-random uint64 per (seed, user, item): splitmix64 of the three, mixed in turn.

  Why: MovieLens stamps many ratings of a user with one second, so "the last interaction" is
  often a tie. Breaking it by file order broke it by item id once the log was put in a
  canonical (user, timestamp, item) order, and the held-out item of loo was the tied item with
  the highest id for 44% of users (less popular on MovieLens: test scored half of valid). A
  hash of (seed, user, item) is unbiased, independent of row order, and reproducible by any tool.
  """
  def mix(z):
    z = (z + np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))

  with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
    key = mix(np.full(len(log), seed, np.uint64))
    key = mix(key ^ log.user.astype(np.uint64))
    return mix(key ^ log.item.astype(np.uint64))


def _time_order(log: LogArrays, seed: int) -> np.ndarray:
  # Sort on (user, timestamp); equal timestamps in a seeded pseudo-random order (_tie_key), and
  # a (user, item, timestamp) repeated in the log in file order, so the sort is total.
  return np.lexsort((np.arange(len(log)), _tie_key(log, seed), log.timestamp, log.user))


def _counts(labels: np.ndarray, log: LogArrays, min_rating: float | None) -> dict:
  out = {}
  for label in SPLIT_LABELS:
    sel = labels == label
    pos = sel if min_rating is None else sel & (log.rating >= min_rating)
    out[label] = {"rows": int(sel.sum()), "positives": int(pos.sum()),
                  "users": int(np.unique(log.user[pos]).size),
                  "items": int(np.unique(log.item[pos]).size)}
  return out


def warm_ratio(log: LogArrays, seed: int = 0, test_frac: float = 0.2, valid_frac: float = 0.1,
               positive_min_rating: float | None = 4.0) -> Split:
  """Random ratio split of all ratings; see the module docstring."""
  rng = np.random.default_rng(seed)
  n = len(log)
  perm = rng.permutation(n)
  n_test = int(round(test_frac * n))
  n_valid = int(round(valid_frac * (n - n_test)))
  labels = np.full(n, "train", dtype=object)
  labels[perm[:n_test]] = "test"
  labels[perm[n_test:n_test + n_valid]] = "valid"
  train = labels == "train"
  known = np.isin(log.user, log.user[train]) & np.isin(log.item, log.item[train])
  excluded = ~train & ~known
  labels[excluded] = "excluded"
  meta = {"test_frac": test_frac, "valid_frac": valid_frac,
          "positive_min_rating": positive_min_rating,
          "excluded_unknown_user_or_item": int(excluded.sum())}
  return Split("warm_ratio", seed, labels.astype(str), meta)


def loo(log: LogArrays, seed: int = 0) -> Split:
  """Leave-last-one-out by time; ``seed`` orders interactions that share a timestamp."""
  order = _time_order(log, seed)
  users = log.user[order]
  # Position of each row counted from the end of its user's sequence (0 = last).
  is_last = np.r_[users[1:] != users[:-1], True]
  group_end = np.flatnonzero(is_last)
  group_of = np.searchsorted(group_end, np.arange(len(order)))
  from_end = group_end[group_of] - np.arange(len(order))
  group_size = np.diff(np.r_[-1, group_end])[group_of]
  labels_sorted = np.full(len(order), "train", dtype=object)
  labels_sorted[from_end == 0] = "test"
  # A user with only two interactions keeps one for training rather than one for validation.
  labels_sorted[(from_end == 1) & (group_size >= 3)] = "valid"
  labels_sorted[(from_end == 0) & (group_size < 2)] = "train"
  labels = np.empty(len(order), dtype=object)
  labels[order] = labels_sorted
  meta = {"positive_min_rating": None, "tie_break": "splitmix64(seed, user, item)"}
  return Split("loo", seed, labels.astype(str), meta)


def cold_items(log: LogArrays, both_modalities: np.ndarray, seed: int = 0,
               test_frac: float = 0.2, valid_frac: float = 0.1) -> Split:
  """Holds out items (with all their interactions); ``both_modalities`` = raw ids eligible."""
  rng = np.random.default_rng(seed)
  eligible = np.intersect1d(np.asarray(both_modalities, np.int64), np.unique(log.item))
  perm = rng.permutation(eligible)
  n_test = int(round(test_frac * eligible.size))
  n_valid = int(round(valid_frac * eligible.size))
  test_items = np.sort(perm[:n_test])
  valid_items = np.sort(perm[n_test:n_test + n_valid])
  labels = np.full(len(log), "train", dtype=object)
  labels[np.isin(log.item, test_items)] = "test"
  labels[np.isin(log.item, valid_items)] = "valid"
  train_users = np.unique(log.user[labels == "train"])
  meta = {"test_frac": test_frac, "valid_frac": valid_frac, "positive_min_rating": None,
          "eligible_items": int(eligible.size), "test_items": test_items.tolist(),
          "valid_items": valid_items.tolist(),
          "heldout_rows_with_user_not_in_train": int(
              ((labels != "train") & ~np.isin(log.user, train_users)).sum())}
  return Split("cold_items", seed, labels.astype(str), meta)


def cold_users(log: LogArrays, seed: int = 0, test_frac: float = 0.2, valid_frac: float = 0.1,
               k: int = 3) -> Split:
  """Holds out users except for their first ``k`` interactions in time order."""
  rng = np.random.default_rng(seed)
  users, counts = np.unique(log.user, return_counts=True)
  eligible = users[counts > k]  # a held-out user needs at least one interaction to predict
  perm = rng.permutation(eligible)
  n_test = int(round(test_frac * eligible.size))
  n_valid = int(round(valid_frac * eligible.size))
  test_users = np.sort(perm[:n_test])
  valid_users = np.sort(perm[n_test:n_test + n_valid])
  order = _time_order(log, seed)
  sorted_users = log.user[order]
  first = np.r_[True, sorted_users[1:] != sorted_users[:-1]]
  start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
  rank = np.arange(len(order)) - start  # 0 = user's earliest interaction
  labels_sorted = np.full(len(order), "train", dtype=object)
  late = rank >= k
  labels_sorted[late & np.isin(sorted_users, test_users)] = "test"
  labels_sorted[late & np.isin(sorted_users, valid_users)] = "valid"
  labels = np.empty(len(order), dtype=object)
  labels[order] = labels_sorted
  meta = {"test_frac": test_frac, "valid_frac": valid_frac, "k": k, "positive_min_rating": None,
          "eligible_users": int(eligible.size), "test_users": test_users.tolist(),
          "valid_users": valid_users.tolist()}
  return Split("cold_users", seed, labels.astype(str), meta)


def choose_dropped_modalities(complete_items: np.ndarray, drop_frac: float,
                              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(items that lose a modality, whether each loses its text rather than its image).

  ``round(drop_frac * len(complete_items))`` of the items (those with text and image) are
  chosen at random; each loses text or image with equal probability.
  """
  n_drop = int(round(drop_frac * np.size(complete_items)))
  chosen = rng.permutation(complete_items)[:n_drop]
  return chosen, rng.random(n_drop) < 0.5


def missing_modality(log: LogArrays, has_text: dict[int, bool], has_image: dict[int, bool],
                     seed: int = 0, drop_frac: float = 0.3, **warm_kwargs) -> Split:
  """warm_ratio plus a test-time mask that drops one modality of ``drop_frac`` test items."""
  split = warm_ratio(log, seed=seed, **warm_kwargs)
  min_rating = split.meta["positive_min_rating"]
  test = split.labels == "test"
  if min_rating is not None:
    test &= log.rating >= min_rating
  test_items = np.unique(log.item[test])
  complete = np.asarray([i for i in test_items if has_text[int(i)] and has_image[int(i)]], np.int64)
  # A separate stream, so the mask does not shift if warm_ratio draws more numbers one day.
  chosen, drop_text = choose_dropped_modalities(complete, drop_frac,
                                                np.random.default_rng([seed, 1]))
  n_drop = chosen.size
  mask = {int(i): (bool(has_text[int(i)]), bool(has_image[int(i)]), "") for i in has_text}
  for item, text_dropped in zip(chosen.tolist(), drop_text.tolist()):
    t, v, _ = mask[item]
    mask[item] = (False, v, "text") if text_dropped else (t, False, "image")
  natural = {
      "test_items": int(test_items.size),
      "test_items_complete": int(complete.size),
      "test_items_natural_no_text": int(sum(not has_text[int(i)] for i in test_items)),
      "test_items_natural_no_image": int(sum(not has_image[int(i)] for i in test_items)),
      "test_items_natural_neither": int(
          sum(not has_text[int(i)] and not has_image[int(i)] for i in test_items)),
  }
  split.meta.update({"drop_frac": drop_frac, "natural_missing": natural,
                     "dropped_text": int(drop_text.sum()),
                     "dropped_image": int(n_drop - drop_text.sum())})
  return Split("missing_modality", seed, split.labels, split.meta, mask)


def make_split(protocol: str, log: LogArrays, has_text: dict[int, bool],
               has_image: dict[int, bool], seed: int = 0, **kwargs) -> Split:
  """Dispatches to one protocol; ``has_text``/``has_image`` map raw item id -> presence."""
  if protocol == "warm_ratio":
    split = warm_ratio(log, seed, **kwargs)
  elif protocol == "loo":
    split = loo(log, seed)
  elif protocol == "cold_items":
    both = np.asarray([i for i in has_text if has_text[i] and has_image[i]], np.int64)
    split = cold_items(log, both, seed, **kwargs)
  elif protocol == "cold_users":
    split = cold_users(log, seed, **kwargs)
  elif protocol == "missing_modality":
    split = missing_modality(log, has_text, has_image, seed, **kwargs)
  else:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
  split.meta["counts"] = _counts(split.labels, log, split.meta["positive_min_rating"])
  split.meta.update({"protocol": protocol, "seed": seed})
  return split


def split_paths(split_dir: str | os.PathLike, protocol: str, seed: int) -> dict[str, str]:
  """Where one protocol/seed lives: tsv, json and (missing_modality) mask files (local or URI)."""
  base = epath.Path(split_dir) / protocol
  return {"tsv": os.fspath(base / f"seed{seed}.tsv"), "json": os.fspath(base / f"seed{seed}.json"),
          "mask": os.fspath(base / f"seed{seed}_modality_mask.tsv")}


def write_split(split: Split, log: LogArrays, split_dir: str | os.PathLike) -> dict[str, str]:
  """Writes the TSV (+ json, + mask) of one split; returns the paths written."""
  paths = split_paths(split_dir, split.protocol, split.seed)
  epath.Path(paths["tsv"]).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(paths["tsv"]).open("w") as f:
    f.write(TSV_HEADER + "\n")
    # Ratings are written as %g so "4.0" round-trips as "4" and equals the original file.
    for u, i, r, t, s in zip(log.user.tolist(), log.item.tolist(), log.rating.tolist(),
                             log.timestamp.tolist(), split.labels.tolist()):
      f.write(f"{u}\t{i}\t{r:g}\t{t}\t{s}\n")
  epath.Path(paths["json"]).write_text(json.dumps(split.meta, indent=1))
  written = {"tsv": paths["tsv"], "json": paths["json"]}
  if split.modality_mask is not None:
    with epath.Path(paths["mask"]).open("w") as f:
      f.write(MASK_HEADER + "\n")
      for item in sorted(split.modality_mask):
        text, image, dropped = split.modality_mask[item]
        f.write(f"{item}\t{int(text)}\t{int(image)}\t{dropped}\n")
    written["mask"] = paths["mask"]
  return written


def read_split_tsv(path: str | os.PathLike) -> tuple[LogArrays, np.ndarray]:
  """Reads a split TSV back into (log, labels)."""
  with epath.Path(path).open() as f:
    header = f.readline().rstrip("\n")
    if header != TSV_HEADER:
      raise ValueError(f"{path}: unexpected header {header!r}")
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
  log = LogArrays(np.asarray(cols[0], np.int64), np.asarray(cols[1], np.int64),
                  np.asarray(cols[2], np.float32), np.asarray(cols[3], np.int64))
  return log, np.asarray(cols[4], dtype=str)
