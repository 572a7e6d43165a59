"""Serve recommendations from an export directory with NumPy and JAX alone.

This module imports nothing from the project (a test runs it as a lone file): copy it next to
an export directory written by ``python -m recfusion_jax.export`` and

  from serving import Recommendations
  rec = Recommendations.load("export")
  out = rec.for_users([3, 7], k=10)          # {'items', 'scores', 'weights'}: [U, k], [U, k, S]
  out = rec.for_histories([[12, 40, 41]])    # a user given by the items they liked
  new = rec.for_new_items(content)           # cold start: nearest items and likely users

Export directory (every array one ``.npy`` file, so a large one is memory-mapped, not copied):

  manifest.json            format, programs, parameter list, k, sources, sizes, input specs
  programs/<name>.bin      ``jax.export`` programs (platforms in the manifest), each taking the
                           parameters as its first input (never baked in as constants):
                           encode_items, item_table, encode_users, rank_items, rank_users
  weights/<name>.npy       the parameters (and the item cache user histories are read from)
  item_table/<key>.npy     the catalogue's fusion table (precomputed; rank_items' second input)
  user_table/<key>.npy     the training users' representations (precomputed)
  catalogue/content_vector.npy   [N, d] each item's mean content embedding (nearest items)
  known/indptr.npy, known/items.npy   each training user's known items (CSR), never recommended
  items.tsv                index<TAB>name (MovieLens titles, MMRec asins, or "item <i>")
  tokenizer.json           the WordPiece tokenizer of the data build, when items have text

The in-process recommend CLI builds the same ``Recommendations`` from a model (programs jitted
instead of deserialized), so both paths share everything below.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

FORMAT = "recfusion-serving/1"
PROGRAMS = ("encode_items", "item_table", "encode_users", "rank_items", "rank_users")
USER_BATCH = 256        # users scored per program call
PAD = -1                # padding of item-id lists


def save_arrays(directory: str | os.PathLike, arrays: Mapping[str, Any]
                ) -> dict[str, dict[str, Any]]:
  """One ``.npy`` per array (name '/' -> '.'); returns {name: {file, shape, dtype}}.

  ``directory``: a local path, or any pathlib-like object (``mkdir``, ``/``, ``open``) such as
  an ``etils.epath.Path`` for ``gs://`` -- duck-typed so this module needs no etils.
  """
  if isinstance(directory, str):
    _require_local(directory, "pass a URI as an etils.epath.Path (a str is a local path)")
    directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  index = {}
  for name, value in arrays.items():
    value = np.asarray(value)
    filename = name.replace("/", ".") + ".npy"
    with (directory / filename).open("wb") as f:
      np.save(f, value)
    index[name] = {"file": filename, "shape": list(value.shape), "dtype": str(value.dtype)}
  return index


_LOCAL_ONLY = ("the loader memory-maps local files: copy the export to a local folder first "
               "(gsutil -m cp -r)")


def _require_local(path: str | os.PathLike, why: str) -> None:
  # os and np.load would take gs://b/x for a local folder "gs:" and fail with a confusing error.
  if "://" in os.fspath(path):
    raise ValueError(f"{path}: {why}")


def load_arrays(directory: str, index: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """The arrays of ``save_arrays``' index, memory-mapped (so ``directory`` is local); shapes
  and dtypes checked."""
  _require_local(directory, _LOCAL_ONLY)
  out = {}
  for name, entry in index.items():
    value = np.load(os.path.join(directory, entry["file"]), mmap_mode="r")
    if list(value.shape) != list(entry["shape"]) or str(value.dtype) != entry["dtype"]:
      raise ValueError(f"{directory}/{entry['file']}: {value.dtype}{list(value.shape)} but the "
                       f"manifest says {entry['dtype']}{entry['shape']}")
    out[name] = value
  return out


def content_vectors(emb: np.ndarray, presence: np.ndarray) -> np.ndarray:
  """[N, d]: the unit mean of each item's present modality embeddings (zero if none).

  The modalities share one space (contrastive alignment), so the mean compares items whatever
  modalities each has.
  """
  weights = np.asarray(presence, np.float32)[..., None]
  mean = (np.asarray(emb, np.float32) * weights).sum(1) / np.maximum(weights.sum(1), 1.0)
  norm = np.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / np.maximum(norm, 1e-12)


def known_csr(user: np.ndarray, item: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
  """(indptr [U + 1], items): each user's distinct items, ascending."""
  pairs = np.unique(np.asarray(user, np.int64) * (2**32) + np.asarray(item, np.int64))
  users, items = pairs // (2**32), pairs % (2**32)
  indptr = np.zeros(num_users + 1, np.int64)
  np.add.at(indptr, users + 1, 1)
  return np.cumsum(indptr), items.astype(np.int32)


def pad_lists(lists: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
  """[len(lists), width] int32, right-padded with PAD; width defaults to a power of two >= the
  longest list (few distinct shapes, few compilations)."""
  longest = max((len(x) for x in lists), default=0)
  width = width or 1 << max(longest - 1, 0).bit_length()
  out = np.full((len(lists), width), PAD, np.int32)
  for row, values in enumerate(lists):
    out[row, :len(values)] = values
  return out


def history_inputs(histories: Sequence[Sequence[int]], history_len: int) -> dict[str, np.ndarray]:
  """User-encoder inputs of users given as item lists (oldest first; no trained user ID): the
  latest ``history_len`` items, right-aligned, most recent last (as training histories)."""
  history = np.zeros((len(histories), history_len), np.int32)
  mask = np.zeros((len(histories), history_len), bool)
  for row, items in enumerate(histories):
    items = list(items)[-history_len:]
    if items:
      history[row, -len(items):] = items
      mask[row, -len(items):] = True
  return {"user_id": np.zeros(len(histories), np.int32),
          "user_has_id": np.zeros(len(histories), bool), "history": history,
          "history_mask": mask}


def _bucket(n: int) -> int:
  return min(USER_BATCH, 1 << max(n - 1, 0).bit_length())


def _rows(tree: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
  return {key: np.asarray(value[index]) for key, value in tree.items()}


def pad_rows(tree: Mapping[str, Any], rows: int) -> dict[str, np.ndarray]:
  """Each array of ``tree`` zero-padded along its first axis to ``rows`` rows."""
  out = {}
  for key, value in tree.items():
    value = np.asarray(value)
    pad = rows - value.shape[0]
    out[key] = np.concatenate([value, np.zeros((pad,) + value.shape[1:], value.dtype)]) if pad else value
  return out


class Recommendations:
  """Top-k items for users, and new items' nearest items and likely users.

  ``programs`` maps PROGRAMS to callables ``(params, ...)`` (deserialized exports or jitted
  functions); ``params`` is their first input. Arrays: ``item_table`` and ``user_table``
  (dicts of arrays, leading dim items / users), ``content_vector`` [N, d], ``known_indptr`` /
  ``known_items`` (CSR of each user's known items).
  """

  def __init__(self, programs: Mapping[str, Callable[..., Any]], params: Any, *,
               item_table: Mapping[str, np.ndarray], user_table: Mapping[str, np.ndarray],
               content_vector: np.ndarray, known_indptr: np.ndarray, known_items: np.ndarray,
               k: int, history_len: int, sources: Sequence[str],
               item_names: Sequence[str] | None = None, manifest: Mapping[str, Any] | None = None):
    missing = [p for p in PROGRAMS if p not in programs]
    if missing:
      raise KeyError(f"programs {missing} missing")
    self.programs = dict(programs)
    self.params = params
    self.item_table = dict(item_table)
    self.user_table = dict(user_table)
    self.content_vector = np.asarray(content_vector)
    self.known_indptr, self.known_items = np.asarray(known_indptr), np.asarray(known_items)
    self.k, self.history_len, self.sources = int(k), int(history_len), tuple(sources)
    self.num_items = int(self.content_vector.shape[0])
    self.num_users = int(self.known_indptr.shape[0] - 1)
    self.item_names = list(item_names) if item_names is not None else None
    self.manifest = dict(manifest or {})

  # ---- loading -----------------------------------------------------------------------------

  @classmethod
  def load(cls, export_dir: str, device: jax.Device | None = None) -> "Recommendations":
    """Reads an export directory; parameters are placed on ``device`` (default: the first).

    ``export_dir`` is local: the arrays are memory-mapped (``gsutil cp -r`` a gs:// export).
    """
    _require_local(export_dir, _LOCAL_ONLY)
    with open(os.path.join(export_dir, "manifest.json"), encoding="utf-8") as f:
      manifest = json.load(f)
    if manifest.get("format") != FORMAT:
      raise ValueError(f"{export_dir}: format {manifest.get('format')!r}, this loader reads {FORMAT}")
    platform = (device or jax.devices()[0]).platform
    # A device says "gpu" for CUDA and ROCm alike; jax.export names them "cuda" / "rocm".
    if platform not in manifest["platforms"] and not (
        platform == "gpu" and {"cuda", "rocm"} & set(manifest["platforms"])):
      wanted = ",".join(manifest["platforms"] + [{"gpu": "cuda"}.get(platform, platform)])
      raise ValueError(f"{export_dir} was exported for {manifest['platforms']}, not {platform!r}: "
                       f"re-export with --platforms={wanted}")
    programs = {}
    for name in PROGRAMS:
      with open(os.path.join(export_dir, "programs", f"{name}.bin"), "rb") as f:
        programs[name] = jax.export.deserialize(bytearray(f.read())).call
    params = jax.device_put(load_arrays(os.path.join(export_dir, "weights"), manifest["params"]),
                            device or jax.devices()[0])
    tables = {name: load_arrays(os.path.join(export_dir, name), manifest[name])
              for name in ("item_table", "user_table", "catalogue", "known")}
    for name in ("item_table", "user_table"):   # program inputs: on the device once
      tables[name] = jax.device_put(tables[name], device or jax.devices()[0])
    names = None
    names_path = os.path.join(export_dir, "items.tsv")
    if os.path.exists(names_path):
      with open(names_path, encoding="utf-8") as f:
        next(f)
        names = [line.rstrip("\n").split("\t", 1)[1] for line in f]
    return cls(programs, params, item_table=tables["item_table"],
               user_table=tables["user_table"],
               content_vector=tables["catalogue"]["content_vector"],
               known_indptr=tables["known"]["indptr"], known_items=tables["known"]["items"],
               k=manifest["k"], history_len=manifest["history_len"],
               sources=manifest["sources"], item_names=names, manifest=manifest)

  # ---- queries -----------------------------------------------------------------------------

  def item_name(self, item: int) -> str:
    return self.item_names[item] if self.item_names is not None else f"item {item}"

  def _k(self, k: int | None) -> int:
    k = self.k if k is None else int(k)
    if not 1 <= k <= self.k:
      raise ValueError(f"k={k}: these programs return at most k={self.k} (export with a larger --k)")
    return k

  def known(self, user: int) -> np.ndarray:
    return self.known_items[self.known_indptr[user]:self.known_indptr[user + 1]]

  def _rank(self, reps: Mapping[str, np.ndarray], exclude: Sequence[Sequence[int]], k: int
            ) -> dict[str, np.ndarray]:
    outs = []
    for start in range(0, len(exclude), USER_BATCH):
      part = {key: value[start:start + USER_BATCH] for key, value in reps.items()}
      rows = len(exclude[start:start + USER_BATCH])
      bucket = _bucket(rows)
      out = self.programs["rank_items"](self.params, pad_rows(part, bucket), self.item_table,
                                        pad_lists(list(exclude[start:start + USER_BATCH])
                                                  + [[]] * (bucket - rows)))
      outs.append({key: np.asarray(value)[:rows, :k] for key, value in out.items()})
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}

  def for_users(self, user_ids: Sequence[int], k: int | None = None) -> dict[str, np.ndarray]:
    """Top-k items of training users (their known items excluded): {'items' [U, k] int32,
    'scores' [U, k] (-inf where fewer than k items were left), 'weights' [U, k, S]}."""
    k = self._k(k)
    users = np.asarray(user_ids, np.int64)
    if users.size and (users.min() < 0 or users.max() >= self.num_users):
      raise ValueError(f"user ids must be in [0, {self.num_users})")
    return self._rank(_rows(self.user_table, users), [self.known(u) for u in users], k)

  def for_histories(self, histories: Sequence[Sequence[int]], k: int | None = None
                    ) -> dict[str, np.ndarray]:
    """Top-k items of users given by the items they liked (oldest first), those excluded."""
    k = self._k(k)
    for items in histories:
      if not len(items):
        raise ValueError("a user given by liked items needs at least one item")
      if min(items) < 0 or max(items) >= self.num_items:
        raise ValueError(f"liked item ids must be in [0, {self.num_items})")
    reps = self._encode_users(history_inputs(histories, self.history_len))
    return self._rank(reps, [sorted(set(items)) for items in histories], k)

  def _encode_users(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = len(inputs["user_id"])
    out = self.programs["encode_users"](self.params, pad_rows(inputs, _bucket(rows)))
    return {key: np.asarray(value)[:rows] for key, value in out.items()}

  def encode_new_items(self, content: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-modality embeddings [J, M, d] and presence [J, M] of new items' content."""
    rows = len(content["presence"])
    out = self.programs["encode_items"](self.params, pad_rows(content, _bucket(rows)))
    return np.asarray(out["emb"])[:rows], np.asarray(out["presence"])[:rows]

  def for_new_items(self, content: Mapping[str, np.ndarray], k: int | None = None
                    ) -> dict[str, np.ndarray]:
    """Cold start: new items (content only, no ID) -> {'nearest' [J, k] catalogue items by
    content similarity, 'similarity' [J, k], 'users' [J, k] the users most likely to want each,
    'user_scores' [J, k], 'user_weights' [J, k, S], 'presence' [J, M]}."""
    k = self._k(k)
    emb, presence = self.encode_new_items(content)
    similarity = content_vectors(emb, presence) @ self.content_vector.T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    rows = len(presence)
    bucket = _bucket(rows)
    table = self.programs["item_table"](self.params, pad_rows({
        "item_id": np.zeros(rows, np.int32), "has_id": np.zeros(rows, bool),
        "emb": emb, "presence": presence}, bucket))
    out = self.programs["rank_users"](self.params, self.user_table, table)
    return {"nearest": nearest.astype(np.int32),
            "similarity": np.take_along_axis(similarity, nearest, 1),
            "users": np.asarray(out["users"])[:rows, :k],
            "user_scores": np.asarray(out["scores"])[:rows, :k],
            "user_weights": np.asarray(out["weights"])[:rows, :k], "presence": presence}
