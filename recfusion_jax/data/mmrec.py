"""MMRec-format data as a RecDataset: the Amazon Baby / Sports / Clothing sets as MMRec ships them.

One data set is one directory (MMRec's ``data/<name>/``) holding

  <name>.inter      tab-separated, header ``userID itemID rating timestamp x_label``: dense
                    0-based ids, ``x_label`` 0 = train, 1 = valid, 2 = test (MMRec splits by
                    time); ``rating`` and ``timestamp`` may be absent (MMRec reads neither)
  text_feat.npy     [num_items, Ft] float: row = itemID (sentence-transformer text features)
  image_feat.npy    [num_items, Fi] float: row = itemID (CNN image features)
  i_id_mapping.csv  tab-separated, header ``asin itemID`` (Amazon product id of each item)
  u_id_mapping.csv  tab-separated, header ``user_id userID`` (Amazon reviewer id of each user)

Like MMRec (``filter_out_cod_start_users``), valid/test interactions of users with no train
interaction are dropped; every interaction is a positive whatever its rating. Items with no
train interaction are cold items (scored from their features alone). An all-zero or
non-finite feature row means the item lacks that modality. Every drop and every missing row is
counted in the report that ``read_mmrec`` returns. The directory may be local or a URI
(``gs://...``): every file goes through ``etils.epath``.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import numpy as np
from etils import epath

from recfusion_jax import paths
from recfusion_jax.data import types

INTER_COLUMNS = ("userID", "itemID", "rating", "timestamp", "x_label")
REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
LABELS = {"train": 0, "valid": 1, "test": 2}
FEATURE_FILES = {"text": "text_feat.npy", "image": "image_feat.npy"}
ITEM_MAP = ("i_id_mapping.csv", "asin", "itemID")
USER_MAP = ("u_id_mapping.csv", "user_id", "userID")


def _dir_name(data_dir: str | os.PathLike) -> str:
  return paths.resolve(data_dir).name   # resolved: "." or "run/.." name a real folder


def inter_path(data_dir: str | os.PathLike, name: str | None = None) -> str:
  """``<data_dir>/<name>.inter``; ``name`` defaults to the directory's own name (MMRec's layout)."""
  return os.fspath(epath.Path(data_dir) / f"{name or _dir_name(data_dir)}.inter")


def _tsv_reader(path: epath.Path) -> Any:
  """csv rows of a tab-separated file, read as ``open(path, newline="")`` would read it."""
  # epath's open() takes no newline=; decoding the bytes keeps "\r\n" for csv to handle.
  return csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline=""), delimiter="\t")


def read_inter(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The columns of an ``.inter`` file (rating 1.0 / timestamp = row order where absent)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} not found (MMRec layout: <dir>/<name>.inter)")
  reader = _tsv_reader(path)
  header = next(reader, None)
  if header is None:
    raise ValueError(f"{path} is empty")
  # RecBole-style typed headers ("userID:token") name the same columns.
  header = [h.split(":", 1)[0].strip() for h in header]
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  if missing:
    raise ValueError(f"{path}: columns {missing} missing; header is {header}, MMRec's is "
                     f"{list(INTER_COLUMNS)}")
  col = {name: header.index(name) for name in INTER_COLUMNS if name in header}
  rows = [r for r in reader if r]
  bad = [k + 2 for k, r in enumerate(rows) if len(r) != len(header)]
  if bad:
    raise ValueError(f"{path}: {len(bad)} rows do not have {len(header)} fields, e.g. lines "
                     f"{bad[:5]}")

  def column(name, dtype):
    try:
      return np.asarray([float(r[col[name]]) for r in rows]).astype(dtype)
    except ValueError as e:
      raise ValueError(f"{path}: non-numeric {name}: {e}") from e

  out = {"user": column("userID", np.int64), "item": column("itemID", np.int64),
         "label": column("x_label", np.int64)}
  out["rating"] = (column("rating", np.float32) if "rating" in col
                   else np.ones(len(rows), np.float32))
  out["timestamp"] = (column("timestamp", np.int64) if "timestamp" in col
                      else np.arange(len(rows), dtype=np.int64))
  unknown = np.setdiff1d(out["label"], list(LABELS.values()))
  if unknown.size:
    raise ValueError(f"{path}: x_label values {unknown.tolist()} (expected 0, 1, 2)")
  for key in ("user", "item"):
    if out[key].size and out[key].min() < 0:
      raise ValueError(f"{path}: negative {key} ids")
  return out


def read_id_map(data_dir: str | os.PathLike, spec: tuple[str, str, str]) -> list[str] | None:
  """Raw ids (position = dense id) of ``i_id_mapping.csv`` / ``u_id_mapping.csv``; None if absent."""
  filename, raw_col, id_col = spec
  path = epath.Path(data_dir) / filename
  if not path.exists():
    return None
  reader = _tsv_reader(path)
  header = next(reader, [])
  if raw_col not in header or id_col not in header:
    raise ValueError(f"{path}: header {header}, expected columns {raw_col!r} and {id_col!r}")
  rows = [r for r in reader if r]
  ids = np.asarray([int(r[header.index(id_col)]) for r in rows], np.int64)
  names = [r[header.index(raw_col)] for r in rows]
  if not np.array_equal(np.sort(ids), np.arange(len(rows))):
    raise ValueError(f"{path}: {id_col} is not a permutation of 0..{len(rows) - 1}")
  out = [""] * len(rows)
  for dense, name in zip(ids.tolist(), names):
    out[dense] = name
  return out


def read_item_names(data_dir: str | os.PathLike) -> list[str] | None:
  """The Amazon product id (asin) of every item, or None without ``i_id_mapping.csv``."""
  return read_id_map(data_dir, ITEM_MAP)


def read_features(data_dir: str | os.PathLike, modalities: tuple[str, ...]
                  ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """{modality: [N, F] float32} with non-finite rows zeroed, and per-modality counts of them."""
  features, non_finite = {}, {}
  for modality in modalities:
    if modality not in FEATURE_FILES:
      raise ValueError(f"MMRec data has no {modality!r} features; it has {sorted(FEATURE_FILES)}")
    path = epath.Path(data_dir) / FEATURE_FILES[modality]
    if not path.exists():
      raise FileNotFoundError(f"{path} not found")
    with path.open("rb") as f:
      value = np.load(f)
    if value.ndim != 2:
      raise ValueError(f"{path}: expected [num_items, dim], got shape {value.shape}")
    value = value.astype(np.float32)
    bad = ~np.isfinite(value).all(axis=1)
    value[bad] = 0.0
    features[modality], non_finite[modality] = value, int(bad.sum())
  return features, non_finite


def read_mmrec(data_dir: str | os.PathLike, name: str | None = None, *,
               modalities: tuple[str, ...] = ("text", "image"),
               filter_cold_users: bool = True) -> tuple[types.RecDataset, dict[str, Any]]:
  """One MMRec data set as (RecDataset, report of everything dropped or missing)."""
  log = read_inter(inter_path(data_dir, name))
  features, non_finite = read_features(data_dir, modalities)
  item_names = read_item_names(data_dir)
  user_names = read_id_map(data_dir, USER_MAP)

  sizes = {f"{m} features": v.shape[0] for m, v in features.items()}
  if item_names is not None:
    sizes["i_id_mapping.csv"] = len(item_names)
  if len(set(sizes.values())) > 1:
    raise ValueError(f"{data_dir}: item counts disagree: {sizes}")
  num_items = next(iter(sizes.values()))
  if log["item"].size and log["item"].max() >= num_items:
    raise ValueError(f"{data_dir}: itemID {log['item'].max()} out of range for {num_items} items")
  num_users = int(log["user"].max(initial=-1)) + 1
  if user_names is not None:
    if num_users > len(user_names):
      raise ValueError(f"{data_dir}: userID {num_users - 1} not in u_id_mapping.csv")
    num_users = len(user_names)

  label = log["label"]
  user_in_train = np.zeros(num_users, bool)
  user_in_train[log["user"][label == LABELS["train"]]] = True
  cold_user_rows = (label != LABELS["train"]) & ~user_in_train[log["user"]]
  keep = ~cold_user_rows if filter_cold_users else np.ones(label.shape, bool)
  order = np.lexsort((np.arange(label.size), log["timestamp"], log["user"]))

  def part(which: str) -> types.Interactions:
    rows = order[(label[order] == LABELS[which]) & keep[order]]
    return types.Interactions(log["user"][rows].astype(np.int32),
                              log["item"][rows].astype(np.int32),
                              log["timestamp"][rows], log["rating"][rows])

  train, valid, test = part("train"), part("valid"), part("test")
  has_id = np.zeros(num_items, bool)
  has_id[train.item] = True
  presence = np.zeros((num_items, len(types.MODALITIES)), bool)
  for modality, value in features.items():
    presence[:, types.MODALITIES.index(modality)] = np.any(value != 0.0, axis=1)
  pairs = log["user"] * num_items + log["item"]
  report = {
      "interactions": int(label.size),
      "train": len(train), "valid": len(valid), "test": len(test),
      "users": num_users, "items": num_items,
      "dropped_cold_user_interactions": {
          "valid": int((cold_user_rows & (label == LABELS["valid"])).sum()) if filter_cold_users else 0,
          "test": int((cold_user_rows & (label == LABELS["test"])).sum()) if filter_cold_users else 0},
      "duplicate_user_item_pairs_kept": int(pairs.size - np.unique(pairs).size),
      "items_without_train_interaction": int((~has_id).sum()),
      "items_missing": {m: int((~presence[:, types.MODALITIES.index(m)]).sum())
                        for m in features},
      "non_finite_feature_rows": non_finite,
      "feature_dims": {m: int(v.shape[1]) for m, v in features.items()},
  }
  catalogue = types.Catalogue(text_ids=None, text_mask=None, image=None, video=None,
                              presence=presence, has_id=has_id, features=features)
  dataset = types.RecDataset(
      catalogue=catalogue, num_users=num_users, train=train, valid=valid, test=test,
      cold_items=np.flatnonzero(~has_id).astype(np.int32), user_has_id=user_in_train,
      name=f"mmrec/{name or _dir_name(data_dir)}")
  return dataset, report


def write_mmrec(data_dir: str | os.PathLike, name: str, log: dict[str, np.ndarray],
                features: dict[str, np.ndarray], item_names: list[str] | None = None,
                user_names: list[str] | None = None) -> None:
  """Writes a data set in MMRec's layout (the exact files and headers MMRec's loader reads).

  ``log`` holds user, item, rating, timestamp, label arrays. Used by tests and to hand data to
  MMRec itself.
  """
  out = epath.Path(data_dir)
  out.mkdir(parents=True, exist_ok=True)
  with epath.Path(inter_path(data_dir, name)).open("w") as f:
    f.write("\t".join(INTER_COLUMNS) + "\n")
    for row in zip(log["user"].tolist(), log["item"].tolist(), log["rating"].tolist(),
                   log["timestamp"].tolist(), log["label"].tolist()):
      f.write("%d\t%d\t%.1f\t%d\t%d\n" % row)
  for modality, value in features.items():
    with (out / FEATURE_FILES[modality]).open("wb") as f:
      np.save(f, value.astype(np.float32))
  for names, (filename, raw_col, id_col) in ((item_names, ITEM_MAP), (user_names, USER_MAP)):
    if names is None:
      continue
    with (out / filename).open("w") as f:
      f.write(f"{raw_col}\t{id_col}\n")
      for dense, raw in enumerate(names):
        f.write(f"{raw}\t{dense}\n")
