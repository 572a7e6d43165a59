"""Item content read record by record from the TFDS ArrayRecord items set, never held whole.

A pod-scale catalogue (``data_prep.synthetic_pod``: 16 x 224 x 224 video per item, ~2.5 MB)
does not fit in a host's memory, and a Grain worker must not receive a pickled copy of it.
``ItemRecords`` is what a streaming ``Catalogue`` holds instead of arrays: the items set's
folder and a small index (record position, presence and largest token id of every item, from
``item_records.tsv``, which data_prep writes next to the manifest). It opens the ArrayRecord
files lazily, in whichever process first reads, so pickling it to a worker sends a path and
the index; each batch reads exactly the records of its rows (TFDS's random-access
``ArrayRecordDataSource``, the source Grain reads), so a process reads only what its block of
the global batch needs.

TFDS writes records in key-hash order (``data_prep.tfds_builders`` explains why), so the dense
item id is not the record position: the index maps one to the other, and every read checks the
record's own ``index`` field against the id it was asked for.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
from etils import epath

from recfusion_jax.data.types import MODALITIES

INDEX_FILE = "item_records.tsv"
_INDEX_COLUMNS = ("index", "record", "has_text", "has_image", "has_video", "max_token")
# Content keys of a record, in batch-key names; ``video``/``has_video`` only where items have it.
CONTENT_KEYS = ("text_ids", "text_mask", "image", "video")
_DTYPES = {"text_ids": np.int32, "text_mask": bool, "image": np.uint8, "video": np.uint8}


def _open_source(items_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  return tfds.builder_from_directory(items_dir).as_data_source()["train"]


def write_record_index(items_dir: str | os.PathLike, out_path: str | os.PathLike,
                       chunk: int = 64) -> dict[str, int]:
  """Writes ``item_records.tsv`` for the items set at ``items_dir`` (one pass, ``chunk``
  records in memory at a time); returns {'items', 'max_token'}.

  Raises ValueError unless the records' ``index`` fields are exactly 0..N-1.
  """
  source = _open_source(os.fspath(items_dir))
  n = len(source)
  rows = np.full((n, len(_INDEX_COLUMNS)), -1, np.int64)
  for start in range(0, n, chunk):
    positions = list(range(start, min(n, start + chunk)))
    for position, record in zip(positions, source.__getitems__(positions)):
      k = int(record["index"])
      if not 0 <= k < n or rows[k, 0] != -1:
        raise ValueError(f"{items_dir}: record {position} has item index {k}, out of 0..{n - 1} "
                         "or repeated")
      tokens = record.get("text_ids")
      rows[k] = (k, position, bool(record.get("has_text", False)),
                 bool(record.get("has_image", False)), bool(record.get("has_video", False)),
                 int(np.max(tokens, initial=0)) if tokens is not None else 0)
  path = epath.Path(out_path)
  with path.open("w") as f:
    f.write("\t".join(_INDEX_COLUMNS) + "\n")
    f.writelines("\t".join(str(v) for v in row) + "\n" for row in rows.tolist())
  return {"items": n, "max_token": int(rows[:, -1].max(initial=0))}


def read_record_index(path: str | os.PathLike) -> np.ndarray:
  """``item_records.tsv`` as an [N, 6] int64 array in ``_INDEX_COLUMNS`` order, row = item."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: streaming (data.streaming=True) needs the record index that "
        "data_prep writes since 2026-12; rebuild the data with python -m data_prep.movielens / "
        "data_prep.synthetic_pod, or set --config.data.streaming=False")
  with path.open() as f:
    header = f.readline().rstrip("\n").split("\t")
    if tuple(header) != _INDEX_COLUMNS:
      raise ValueError(f"{path}: columns {header}, expected {list(_INDEX_COLUMNS)}")
    rows = np.asarray([line.split("\t") for line in f if line.strip()], np.int64)
  rows = rows.reshape(-1, len(_INDEX_COLUMNS))
  if not np.array_equal(rows[:, 0], np.arange(len(rows))):
    raise ValueError(f"{path}: item indices are not 0..{len(rows) - 1} in order")
  return rows


class ItemRecords:
  """Random access to item content by dense item id, one ArrayRecord read per item asked for.

  ``read(ids)`` returns {text_ids [n, Lt], text_mask [n, Lt], image [n, H, W, 3], video
  [n, T, H, W, 3]} for the keys the items set has, texts cut to ``text_len`` tokens when set.
  """

  def __init__(self, items_dir: str | os.PathLike, record_index: np.ndarray,
               text_len: int | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    self.items_dir = os.fspath(items_dir)
    self.record_of = np.ascontiguousarray(record_index[:, _column("record")])
    self.max_token = int(record_index[:, _column("max_token")].max(initial=0))
    self.text_len = text_len
    features = tfds.builder_from_directory(self.items_dir).info.features
    # One item's shape per content key as stored (texts before ``text_len`` is applied).
    self.stored_shapes = {key: tuple(features[key].shape) for key in CONTENT_KEYS
                          if key in features}
    self._local = threading.local()

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(self.stored_shapes)

  @property
  def shapes(self) -> dict[str, tuple[int, ...]]:
    """One item's shape per content key as ``read`` returns it (texts cut to ``text_len``)."""
    shapes = dict(self.stored_shapes)
    if self.text_len and "text_ids" in shapes and shapes["text_ids"][0] > self.text_len:
      shapes["text_ids"] = shapes["text_mask"] = (self.text_len,)
    return shapes

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_local"]   # open readers stay in their process; a worker opens its own
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._local = threading.local()

  def with_text_len(self, text_len: int | None) -> "ItemRecords":
    """The same records with texts cut to ``text_len`` tokens (``sources.truncate_text``)."""
    out = ItemRecords.__new__(ItemRecords)
    out.__setstate__({**self.__getstate__(), "text_len": text_len})
    return out

  @property
  def num_items(self) -> int:
    return int(self.record_of.size)

  def _source(self):
    # One reader per thread: Grain's read threads call ``read`` concurrently.
    source = getattr(self._local, "source", None)
    if source is None:
      source = self._local.source = _open_source(self.items_dir)
    return source

  def read(self, item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Content of ``item_ids`` (any shape of int ids; leading dims kept) under batch keys."""
    item_ids = np.asarray(item_ids)
    flat = item_ids.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= self.num_items):
      raise IndexError(f"item ids out of 0..{self.num_items - 1}: "
                       f"{flat[(flat < 0) | (flat >= self.num_items)][:5].tolist()}")
    unique, inverse = np.unique(flat, return_inverse=True)
    records = self._source().__getitems__(self.record_of[unique].tolist()) if unique.size else []
    got = np.asarray([int(r["index"]) for r in records], np.int64)
    if not np.array_equal(got, unique):
      raise ValueError(f"{self.items_dir}: records hold items {got[got != unique][:5].tolist()} "
                       f"where {unique[got != unique][:5].tolist()} were expected: "
                       f"{INDEX_FILE} does not belong to these records")
    # Ids sorted and distinct (a catalogue chunk): the rows are already in order.
    in_order = np.array_equal(unique, flat)
    out = {}
    for key, shape in self.shapes.items():
      rows = np.empty((unique.size, *shape), _DTYPES[key])
      for j, record in enumerate(records):
        value = record[key]
        rows[j] = value[:shape[0]] if key in ("text_ids", "text_mask") else value
      out[key] = (rows if in_order else rows[inverse]).reshape(*item_ids.shape, *shape)
    return out


def _column(name: str) -> int:
  return _INDEX_COLUMNS.index(name)


def presence_of(record_index: np.ndarray) -> np.ndarray:
  """[N, len(MODALITIES)] bool presence from the record index."""
  return np.stack([record_index[:, _column(f"has_{m}")].astype(bool) for m in MODALITIES],
                  axis=1)
