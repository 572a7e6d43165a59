"""The data contract between input pipelines and the model.

Everything that reaches the model is a flat dict of arrays (a "batch"); everything on the
host side is one of the dataclasses below. Keeping the contract in one file lets the synthetic
generator, the MovieLens builder and the Grain pipeline agree without importing each other.

Item ids and user ids are dense: 0..num_items-1 and 0..num_users-1. Whether an id has a learned
embedding is a separate boolean (``*_has_id``), so a cold item or user is just a row whose flag
is False -- there is no magic "unknown" id.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Order of the content modalities everywhere (presence columns, fusion sources, configs).
MODALITIES: tuple[str, ...] = ("text", "image", "video")



def feature_key(modality: str) -> str:
  """Batch key of a modality given as a precomputed feature vector: ``text_features`` etc."""
  return f"{modality}_features"


# Keys of a training batch, with dtype and shape (B = batch, L = history length,
# Lt = text length, H/W = image size, T = video frames, M = len(MODALITIES)).
TRAIN_BATCH_SPEC: dict[str, tuple[str, str]] = {
    "user_id": ("int32", "[B]"),
    "user_has_id": ("bool", "[B]"),
    "history": ("int32", "[B, L]"),          # item ids of the user's previous items, most recent last
    "history_mask": ("bool", "[B, L]"),
    "item_id": ("int32", "[B]"),             # the positive (target) item
    "item_has_id": ("bool", "[B]"),
    "log_q": ("float32", "[B]"),             # log sampling probability of item_id (logQ correction)
    "text_ids": ("int32", "[B, Lt]"),        # content of the positive item
    "text_mask": ("bool", "[B, Lt]"),
    "image": ("uint8", "[B, H, W, 3]"),
    "video": ("uint8", "[B, T, H, W, 3]"),
    # Precomputed feature vectors (MMRec-style data: ``<modality>_features``), one per item.
    "text_features": ("float32", "[B, Ft]"),
    "image_features": ("float32", "[B, Fi]"),
    "video_features": ("float32", "[B, Fv]"),
    "presence": ("bool", "[B, M]"),          # which modalities the positive item has
    "example_mask": ("bool", "[B]"),         # False on padding rows of a partial batch
    # Per-user examples only (``examples.make_user_batch``): several targets per row.
    "targets": ("int32", "[B, L]"),          # cloze: the hidden history items; next: item t + 1
    "target_mask": ("bool", "[B, L]"),
    # next rows with ``data.next_positions`` = K: the history slots whose next item is scored
    # (targets and target_mask are then [B, K]).
    "target_positions": ("int32", "[B, K]"),
}
# The keys only per-user batches carry; an interaction batch has every other key.
PER_USER_KEYS = ("targets", "target_mask", "target_positions")


@dataclasses.dataclass
class Catalogue:
  """Host-side content of every item; row i belongs to item i.

  A modality that a data set does not have at all (video for MovieLens) is None;
  a modality that one item lacks has presence False and zeros in its row.

  A streaming catalogue (``data.streaming``) holds ``records`` in place of the content arrays:
  ``content`` reads the rows it is asked for, and the catalogue itself is a few numbers an item.

  ``features`` holds modalities given as precomputed vectors instead of raw content (MMRec's
  ``text_feat.npy`` / ``image_feat.npy``): {modality: [N, F] float32}; the encoder's
  ``features`` stem reads them under the batch key ``feature_key(modality)``.
  """

  text_ids: np.ndarray | None      # [N, Lt] int32, 0 = padding
  text_mask: np.ndarray | None     # [N, Lt] bool
  image: np.ndarray | None         # [N, H, W, 3] uint8
  video: np.ndarray | None         # [N, T, H, W, 3] uint8
  presence: np.ndarray             # [N, M] bool, columns in MODALITIES order
  has_id: np.ndarray               # [N] bool: item has a trained ID embedding (seen in training)
  features: dict[str, np.ndarray] | None = None  # {modality: [N, F] float32}, see above
  # Streaming: content read record by record (``records.ItemRecords``) instead of the four
  # arrays above, which are then None; ``content`` zeroes what ``presence`` marks absent.
  records: Any = None

  def __post_init__(self):
    for modality, value in (self.features or {}).items():
      if modality not in MODALITIES:
        raise ValueError(f"features of unknown modality {modality!r}; known: {MODALITIES}")
      if value.ndim != 2 or value.shape[0] != self.presence.shape[0]:
        raise ValueError(f"features[{modality!r}] has shape {value.shape}; expected "
                         f"[{self.presence.shape[0]}, F]")

  @property
  def num_items(self) -> int:
    return int(self.presence.shape[0])

  def content(self, item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Content arrays of ``item_ids`` under their batch keys (absent modalities omitted)."""
    out = {"presence": self.presence[item_ids], "item_has_id": self.has_id[item_ids]}
    if self.records is not None:
      out.update(self.records.read(item_ids))
      # The stored content of a modality marked absent here (missing_modality's test-time
      # mask, ``movielens.apply_presence``) must not reach the scores: zero it on read.
      for key, modality in (("text_ids", "text"), ("text_mask", "text"), ("image", "image"),
                            ("video", "video")):
        if key in out:   # ``read`` returns fresh arrays: zero in place, no copy of videos
          out[key][~out["presence"][..., MODALITIES.index(modality)]] = 0
    for key in ("text_ids", "text_mask", "image", "video"):
      value = getattr(self, key)
      if value is not None:
        out[key] = value[item_ids]
    for modality, value in (self.features or {}).items():
      out[feature_key(modality)] = value[item_ids]
    return out


@dataclasses.dataclass
class Interactions:
  """A set of (user, item) events; parallel 1-D arrays."""

  user: np.ndarray        # int32
  item: np.ndarray        # int32
  timestamp: np.ndarray   # int64, larger = later
  rating: np.ndarray      # float32 (1.0 for implicit data)

  def __len__(self) -> int:
    return int(self.user.shape[0])

  def select(self, keep: np.ndarray) -> "Interactions":
    return Interactions(self.user[keep], self.item[keep], self.timestamp[keep], self.rating[keep])


@dataclasses.dataclass
class RecDataset:
  """One split of a data set, ready for training and evaluation.

  ``train`` holds the positives the model learns from (and, in time order, each user's history);
  ``valid``/``test`` hold held-out positives. ``cold_items`` are items with no training
  interaction: they are scored from content alone.

  ``known`` is what every evaluation excludes from a user's ranking: the interactions of the fit
  period whatever their rating (MovieLens: a movie rated 1-3 is known to the user, and since a
  pair occurs once it can never be a held-out positive). None means ``train`` (data with no
  negative ratings). ``known_valid`` is the same for the valid period (None: ``valid``); it
  joins ``known`` when valid is merged into train for a final fit.
  """

  catalogue: Catalogue
  num_users: int
  train: Interactions
  valid: Interactions
  test: Interactions
  cold_items: np.ndarray                  # int32 item ids never seen in training
  user_has_id: np.ndarray                 # [num_users] bool: user has a trained ID embedding
  name: str = ""
  known: Interactions | None = None       # fit-period interactions, any rating (None: train)
  known_valid: Interactions | None = None  # valid-period interactions, any rating (None: valid)

  def known_or_train(self) -> Interactions:
    """The interactions excluded from every user's ranking (see the class docstring)."""
    return self.train if self.known is None else self.known
