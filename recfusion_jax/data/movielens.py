"""Loads the MovieLens multimodal data built by ``python -m data_prep.movielens`` as a RecDataset.

The same layout (manifest.json, a TFDS ArrayRecord items set, id maps, split TSVs) is what
``python -m data_prep.synthetic_pod`` writes, with a video per item; configs name such a build
``data.source="tfds"`` and this loader reads it (``video``/``has_video`` when the items have them).

The protocols are read from the exported split TSVs (``recfusion_jax.data.splits`` wrote them),
never re-derived here.

The build output holds raw ML-100k ids everywhere (so other libraries can read the split TSVs);
this loader maps them to dense ids through ``item_map.tsv`` / ``user_map.tsv``: dense item i is
row i of the catalogue and of the TFDS items data set. ``data_dir`` may be local or a URI
(``gs://...``): every file is read through ``etils.epath``.
"""

from __future__ import annotations

import json
import os

import numpy as np
from etils import epath

from recfusion_jax.data import records, splits, types

PROTOCOLS = splits.PROTOCOLS


def _manifest(data_dir: str | os.PathLike) -> dict:
  path = epath.Path(data_dir) / "manifest.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: build it with python -m data_prep.movielens "
                            "(or data_prep.synthetic_pod)")
  return json.loads(path.read_text())


def _read_map(path: epath.Path, column: str) -> np.ndarray:
  with path.open() as f:
    header = f.readline().rstrip("\n").split("\t")
    k_index, k_id = header.index("index"), header.index(column)
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  index = np.asarray([int(r[k_index]) for r in rows], np.int64)
  if not np.array_equal(index, np.arange(len(rows))):
    raise ValueError(f"{path}: indices are not 0..{len(rows) - 1} in order")
  return np.asarray([int(r[k_id]) for r in rows], np.int64)


def read_id_maps(data_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Raw ML-100k (item ids, user ids), position = dense id."""
  manifest = _manifest(data_dir)
  return (_read_map(epath.Path(data_dir) / manifest["item_map"], "item_id"),
          _read_map(epath.Path(data_dir) / manifest["user_map"], "user_id"))


def _to_dense(raw: np.ndarray, raw_sorted: np.ndarray, what: str) -> np.ndarray:
  pos = np.searchsorted(raw_sorted, raw)
  pos = np.minimum(pos, max(raw_sorted.size - 1, 0))
  bad = raw_sorted[pos] != raw if raw_sorted.size else np.ones(raw.shape, bool)
  if bad.any():
    raise ValueError(f"{bad.sum()} {what} ids of the split are not in the id map, e.g. "
                     f"{raw[bad][:5].tolist()}: the split and the build do not belong together")
  return pos.astype(np.int32)


def load_catalogue_arrays(data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every item of the TFDS items data set (random-access ArrayRecord source).

  Returns item_id [N] int64, text_ids [N, Lt] int32, text_mask [N, Lt] bool,
  image [N, H, W, 3] uint8, has_text [N] bool, has_image [N] bool, and where the items have
  videos video [N, T, H, W, 3] uint8, has_video [N] bool; row = dense item id.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  manifest = _manifest(data_dir)
  builder = tfds.builder_from_directory(epath.Path(data_dir) / manifest["items_tfds"])
  source = builder.as_data_source()["train"]
  records = source.__getitems__(list(range(len(source))))
  records.sort(key=lambda r: r["index"])
  if [r["index"] for r in records] != list(range(len(records))):
    raise ValueError(f"{data_dir}: item indices are not 0..{len(records) - 1}")
  arrays = {
      "item_id": np.asarray([r["item_id"] for r in records], np.int64),
      "text_ids": np.stack([r["text_ids"] for r in records]).astype(np.int32),
      "text_mask": np.stack([r["text_mask"] for r in records]).astype(bool),
      "image": np.stack([r["image"] for r in records]).astype(np.uint8),
      "has_text": np.asarray([r["has_text"] for r in records], bool),
      "has_image": np.asarray([r["has_image"] for r in records], bool),
  }
  if records and "video" in records[0]:
    arrays["video"] = np.stack([r["video"] for r in records]).astype(np.uint8)
    arrays["has_video"] = np.asarray([r["has_video"] for r in records], bool)
  return arrays


def load_movielens(data_dir: str | os.PathLike, protocol: str, seed: int = 0, *,
                   streaming: bool = False) -> types.RecDataset:
  """Loads one protocol/seed of the built MovieLens data as a RecDataset.

  Args:
    data_dir: the ``--out_dir`` of ``python -m data_prep.movielens``.
    protocol: one of PROTOCOLS (see recfusion_jax/data/splits.py for their definitions).
    seed: split seed; ``loo`` has only seed 0.
    streaming: keep the content in the ArrayRecord files (``records.ItemRecords``: a batch
      reads its rows) instead of reading every item into memory.

  Returns:
    RecDataset with dense ids; train/valid/test keep only positives (rating >= the protocol's
    ``positive_min_rating`` when it has one), train sorted by (user, time); ``known`` /
    ``known_valid`` hold every train / valid row whatever its rating (what evaluation excludes). ``has_id`` marks
    items with a train positive, ``user_has_id`` users with one. For ``missing_modality`` the
    catalogue has the natural presence; apply ``load_test_presence`` at test time.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
  manifest = _manifest(data_dir)
  base = epath.Path(data_dir) / manifest["splits"] / protocol
  tsv = base / f"seed{seed}.tsv"
  if not tsv.exists():
    raise FileNotFoundError(f"{tsv} not found; built seeds: {manifest['seeds'][protocol]}")
  meta = json.loads((base / f"seed{seed}.json").read_text())
  item_raw, user_raw = read_id_maps(data_dir)
  if streaming:
    record_index = records.read_record_index(
        epath.Path(data_dir) / manifest.get("item_records", records.INDEX_FILE))
    if len(record_index) != item_raw.size:
      raise ValueError(f"{data_dir}: {len(record_index)} items in {records.INDEX_FILE}, "
                       f"{item_raw.size} in item_map.tsv")
    item_records = records.ItemRecords(epath.Path(data_dir) / manifest["items_tfds"],
                                       record_index)
    # Presence from the index, as load_catalogue_arrays gives it (has_video only with videos).
    presence_columns = records.presence_of(record_index)
    arrays = {f"has_{m}": presence_columns[:, k] for k, m in enumerate(types.MODALITIES)
              if m != "video" or "video" in item_records.keys}
  else:
    item_records = None
    arrays = load_catalogue_arrays(data_dir)
    if not np.array_equal(arrays["item_id"], item_raw):
      raise ValueError(f"{data_dir}: item_map.tsv and the TFDS items disagree")

  log, labels = splits.read_split_tsv(tsv)
  # Id maps are written in ascending raw-id order, so a binary search maps raw -> dense.
  user = _to_dense(log.user, user_raw, "user")
  item = _to_dense(log.item, item_raw, "item")
  min_rating = meta.get("positive_min_rating")
  positive = np.ones(labels.shape, bool) if min_rating is None else log.rating >= min_rating
  order = np.lexsort((np.arange(labels.size), log.timestamp, user))

  def part(label: str, only_positives: bool = True) -> types.Interactions:
    keep = order[(labels[order] == label) & (positive[order] | (not only_positives))]
    return types.Interactions(user[keep], item[keep], log.timestamp[keep], log.rating[keep])

  train, valid, test = part("train"), part("valid"), part("test")
  num_items, num_users = item_raw.size, user_raw.size
  has_id = np.zeros(num_items, bool)
  has_id[train.item] = True
  user_has_id = np.zeros(num_users, bool)
  user_has_id[train.user] = True
  presence = np.zeros((num_items, len(types.MODALITIES)), bool)  # no video in MovieLens
  for modality in types.MODALITIES:
    if f"has_{modality}" in arrays:
      presence[:, types.MODALITIES.index(modality)] = arrays[f"has_{modality}"]
  catalogue = types.Catalogue(
      text_ids=arrays.get("text_ids"), text_mask=arrays.get("text_mask"),
      image=arrays.get("image"), video=arrays.get("video"), presence=presence, has_id=has_id,
      records=item_records)
  return types.RecDataset(
      catalogue=catalogue, num_users=int(num_users), train=train, valid=valid, test=test,
      cold_items=np.flatnonzero(~has_id).astype(np.int32), user_has_id=user_has_id,
      name=f"{manifest.get('name', 'movielens100k')}/{protocol}/seed{seed}",
      # Every rating of the fit (and valid) period is known to its user, not only positives.
      known=part("train", only_positives=False), known_valid=part("valid", only_positives=False))


def load_test_presence(data_dir: str | os.PathLike, seed: int = 0) -> np.ndarray:
  """missing_modality: [N, 3] bool presence at test time (natural gaps + dropped modalities)."""
  manifest = _manifest(data_dir)
  path = (epath.Path(data_dir) / manifest["splits"] / "missing_modality" /
          f"seed{seed}_modality_mask.tsv")
  item_raw, _ = read_id_maps(data_dir)
  presence = np.zeros((item_raw.size, len(types.MODALITIES)), bool)
  with path.open() as f:
    header = f.readline().rstrip("\n").split("\t")
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  col = {name: k for k, name in enumerate(header)}
  raw = np.asarray([int(r[col["item"]]) for r in rows], np.int64)
  dense = _to_dense(raw, item_raw, "item")
  presence[dense, types.MODALITIES.index("text")] = [r[col["text"]] == "1" for r in rows]
  presence[dense, types.MODALITIES.index("image")] = [r[col["image"]] == "1" for r in rows]
  return presence


def apply_presence(catalogue: types.Catalogue, presence: np.ndarray) -> types.Catalogue:
  """A copy of ``catalogue`` whose content is zeroed wherever ``presence`` is False.

  Zeroing (not only flagging) guarantees a dropped modality cannot leak into the scores.
  """
  presence = catalogue.presence & presence
  text_on = presence[:, types.MODALITIES.index("text")]
  image_on = presence[:, types.MODALITIES.index("image")]
  video_on = presence[:, types.MODALITIES.index("video")]
  return types.Catalogue(
      text_ids=None if catalogue.text_ids is None else catalogue.text_ids * text_on[:, None],
      text_mask=None if catalogue.text_mask is None else catalogue.text_mask & text_on[:, None],
      image=None if catalogue.image is None else catalogue.image * image_on[:, None, None, None],
      video=None if catalogue.video is None else
      catalogue.video * video_on[:, None, None, None, None],
      presence=presence, has_id=catalogue.has_id, records=catalogue.records,
      features=None if catalogue.features is None else {
          m: value * presence[:, types.MODALITIES.index(m)][:, None]
          for m, value in catalogue.features.items()})
